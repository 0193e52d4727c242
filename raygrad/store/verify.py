"""Checking a store against its state file, and repairing or sealing it: a missing chunk (which Zarr
would read back as its fill value), a truncated one or an edited array stops any reader with one line
(DamagedStore) instead of yielding a number; derived statistics that fail are rebuilt from sums that
verify (`rebuild_means`); a store written in one go, or from before digests, gets its digests (`seal`,
`seal_unrecorded`)."""

from __future__ import annotations

import json

from .. import constants as names
from ..errors import RaygradError, first_line
from .digests import digest, inputs_digest, read_state, record
from .layout import consolidate
from .means import derived_names, write_means
from .reading import StoreReader


class DamagedStore(RaygradError):
    """A store whose arrays do not match their recorded digests, or cannot be read."""


def verify(store: StoreReader, means: bool = True) -> None:
    """Every recorded array reads back to its digest, and the configuration and plan
    are the ones the checkpoints were made for; else one line naming the part.
    `means`: also the derived means of a complete run."""
    state = store.verified_state = read_state(store.path)
    _check_state(store, state, means)
    complete = store.attrs.get(names.ATTR_STATUS) == names.STATUS_COMPLETE
    mean_names = derived_names()
    # The committed redo file is checked by np.load (zip CRC) as it reads; means
    # count only once the run is complete (a kill mid-finalize leaves stale ones).
    checked = [name for name in state["arrays"]
               if name not in store.committed and (name not in mean_names or (complete and means))]
    _check_arrays(store, {name: state["arrays"][name] for name in checked})


def rebuild_means(store: StoreReader) -> list[str]:
    """A complete run whose sums verify: write its means again; returns their names."""
    verify(store, means=False)
    if store.attrs.get(names.ATTR_STATUS) != names.STATUS_COMPLETE:
        raise RaygradError(f"{store.path}: the run is not complete; finish it with raygrad run --resume "
                           f"{store.run_dir}")
    means = write_means(store)
    record(store.path, store.attrs, means)
    return list(means)


def seal(store: StoreReader) -> None:
    """Record the digest of every array (a store written in one go, like a comparison's)."""
    consolidate(store.path)
    record(store.path, store.attrs, {name: array[...] for name, array in store.group.arrays()})


def seal_unrecorded(store: StoreReader) -> None:
    """A store from before digests were recorded: take what it holds as its state."""
    if read_state(store.path) is not None:
        raise RaygradError(f"--trust-unrecorded: {store.path} has a {names.CHECKPOINT_STATE}; its digests "
                           "are checked, not replaced")
    record(store.path, store.attrs, {name: store.array(name)[...] for name in store.recorded_arrays()})


def _check_state(store: StoreReader, state: dict | None, means: bool) -> None:
    """The state file is there, made for this configuration and plan, and (a complete run's) records the means."""
    where = store.path
    if state is None:
        raise DamagedStore(f"{where}: {names.CHECKPOINT_STATE} is missing or unreadable, so no number in "
                           "this store can be vouched for; re-run it (a store written before raygrad recorded "
                           f"digests: raygrad repair --trust-unrecorded {store.run_dir})")
    if state.get("inputs") != inputs_digest(store.attrs):
        raise DamagedStore(f"{where}/zarr.json: the run's configuration or plan changed since its last "
                           "checkpoint; re-run it")
    complete = store.attrs.get(names.ATTR_STATUS) == names.STATUS_COMPLETE
    is_run = names.ATTR_CONFIG in store.attrs  # a compare store has no derived statistics of its own
    if is_run and complete and means and not derived_names() & set(state["arrays"]):
        raise DamagedStore(f"{where}: marked complete, but its statistics were never recorded; re-run it")


def _check_arrays(store: StoreReader, recorded: dict[str, str]) -> None:
    """Each of these arrays reads back to its recorded digest, and its own metadata parses."""
    where = store.path
    try:
        values = store.read_many(list(recorded))
    except Exception:  # read one by one below: the array that cannot be read names itself
        values = {}
    for name, expected in recorded.items():
        try:
            actual = digest(values[name] if name in values else store.read(name))
            # Readers may go around the consolidated copy in the root (zarr.open_array, xarray
            # with consolidated=False): each array's own metadata must parse too.
            json.loads((where / name / "zarr.json").read_text())
        except Exception as err:  # a truncated chunk or array metadata, a deleted array
            raise DamagedStore(f"{where}/{name}: cannot be read ({first_line(err)}); {_remedy(store, name)}") from None
        if actual != expected:
            raise DamagedStore(f"{where}/{name}: does not match its checkpoint digest (a chunk is missing, "
                               f"truncated or changed); {_remedy(store, name)}")


def _remedy(store: StoreReader, name: str) -> str:
    if name in derived_names():
        return f"the sums are intact: rebuild the derived statistics with raygrad repair {store.run_dir}"
    return "no number from this run can be vouched for: re-run it"

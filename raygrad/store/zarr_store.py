"""The Zarr store of one run: running totals, checkpoint/resume, final means.

Checkpoints use a redo log so that a kill at any instant never counts a
shard twice nor loses a finished one: the new totals and `shards_done` are
first written together to one file, which is atomically renamed into place
(the commit point), then copied into the arrays, flushed to disk, recorded
(digests) in the state file, and only then is the redo file removed.
Opening a store for writing replays a committed file that was not yet
applied; opening it for reading shows that committed state without writing.

Every array's digest is kept in `checkpoint_state.json` beside the arrays,
with a digest of the run's configuration and plan: a missing chunk (which
Zarr would read back as its fill value), a truncated one or an edited array
stops any reader with one line instead of yielding a number.

A run whose lock this process has lost to another (raygrad.store.lock) writes nothing
more: a checkpoint or the derived statistics raise first, one line naming the
new holder, and the last checkpoint stands.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import zarr

from .. import constants as names
from ..errors import RaygradError, first_line
from . import stats, topk
from .files import fsync_dir, replacing, sync_tree
from .lock import ensure_held
from .partial import Partial
from .zarr_batch import create_arrays, open_arrays, read_arrays, write_arrays

# Zarr warns, when it lists a group, about files it does not know; these are raygrad's own
# (the redo log and the digests beside the arrays), so that note is noise to a user.
warnings.filterwarnings("ignore", message=r"Object at \.?(checkpoint_state|pending_checkpoint)\S* is not recognized",
                        module="zarr")

FEATURE_CHUNK = 65536  # values per chunk: one layer of a 65k-feature SAE, several layers of a narrow site


def _chunks(num_layers: int, width: int) -> tuple[int, int]:
    """Whole layers per chunk up to FEATURE_CHUNK values: few files to write and flush per checkpoint."""
    return max(1, min(num_layers, FEATURE_CHUNK // width)), min(width, FEATURE_CHUNK)


class DamagedStore(RaygradError):
    """A store whose arrays do not match their recorded digests, or cannot be read."""


class ResultStore:
    def __init__(self, path: Path, group: zarr.Group, committed: dict[str, np.ndarray] | None = None):
        self.path = Path(path)
        self.group = group
        # A committed checkpoint not yet applied to the arrays (read-only opens of a
        # run being checkpointed, or killed mid-apply): it overrides what the arrays hold.
        self.committed = committed or {}
        self.verified_state: dict | None = None  # the state file as `verify` last read it
        # Each `name in group` and `group[name]` is a round trip through Zarr's event loop (most of
        # a small run's store time): the arrays are listed and opened once, together (zarr_batch).
        self._arrays: dict[str, zarr.Array] | None = None

    def _members(self) -> dict[str, zarr.Array]:
        if self._arrays is None:
            try:
                self._arrays = open_arrays(self.group)
            except Exception:  # one array's metadata is damaged: `array` opens each by name, and that one fails
                self._arrays = {name: None for name in self.group.array_keys()}
        return self._arrays

    def has(self, name: str) -> bool:
        """Whether the store holds an array `name`."""
        return name in self._members()

    def array(self, name: str) -> zarr.Array:
        """The Zarr array `name` (its data read from the store at each access)."""
        members = self._members()
        if members.get(name) is None:
            members[name] = self.group[name]  # KeyError: not in the store
        return members[name]

    # --- creating and opening

    @classmethod
    def create(cls, path: Path, prefixes: dict[str, int], num_shards: int, layers: list[int],
               attrs: dict, layer_sums: tuple[str, ...] = (), top_k: int = 0, ranked: tuple[str, ...] = (),
               score_dtype: np.dtype = np.dtype(np.float32)) -> "ResultStore":
        """`prefixes`: statistic prefix -> width; each gets {prefix}_sum/_abs_sum/_sq_sum.
        `layer_sums`: per-layer float64 scalar totals (constants.LAYER_SUMS), summed like the others.
        `top_k` > 0: the prefixes `ranked` get their --top-examples tables (raygrad.store.topk), empty."""
        group = zarr.open_group(str(path), mode="w-")
        num_layers = len(layers)
        target = attrs.get(names.ATTR_PLAN, {}).get("target", "mlp")
        per_layer = {"dimension_names": (names.LAYER_COORD,)}
        specs = {}  # name -> Group.create_array options
        for prefix, width in prefixes.items():
            for name, stat in zip(names.sum_names(prefix), names.STATS):
                specs[name] = {"shape": (num_layers, width), "chunks": _chunks(num_layers, width), "dtype": "float64",
                               "fill_value": 0.0, "attributes": stats.array_attrs(prefix, stat),
                               "dimension_names": (names.LAYER_COORD, dimension_name(prefix, target))}
        for prefix in ranked if top_k else ():
            specs.update(_example_specs(prefix, num_layers, prefixes[prefix], top_k, score_dtype,
                                        dimension_name(prefix, target)))
        for name in layer_sums:  # per-layer scalar totals (SAE quality)
            specs[name] = {"shape": (num_layers,), "dtype": "float64", "fill_value": 0.0, **per_layer}
        for name in (names.LAYERS, names.LAYER_COORD):  # `layer`: the coordinate xarray reads
            specs[name] = {"data": np.asarray(layers, dtype=np.int32), **per_layer,
                           "attributes": {"units": "layer index", "description": "model layer of each row"}}
        specs[names.TOKENS] = {"shape": (num_layers,), "dtype": "int64", "fill_value": 0, **per_layer, "attributes": {
            "units": "positions", "description": "positions aggregated per layer (n)"}}
        specs[names.SHARDS_DONE] = {"shape": (num_shards,), "dtype": "bool", "fill_value": False,
                                    "dimension_names": ("shard",)}
        specs[names.LOSS_SUM] = {"shape": (), "dtype": "float64", "fill_value": 0.0}
        specs[names.LOSS_TOKENS] = {"shape": (), "dtype": "int64", "fill_value": 0}
        group.attrs.update({names.ATTR_VERSION: names.VERSION, names.ATTR_STATUS: names.STATUS_RUNNING, **attrs})
        store = cls(path, group)
        store._arrays = create_arrays(group, specs)
        sync_tree(store.path)
        # What each array holds now: its data, or its fill value everywhere (no chunk is written yet).
        initial = {name: spec["data"] if "data" in spec else np.full(spec["shape"], spec["fill_value"], spec["dtype"])
                   for name, spec in specs.items()}
        store._record({name: initial[name] for name in store.recorded_arrays()})
        return store

    @classmethod
    def open(cls, path: Path, writable: bool = False, verify: bool = True, retries: int = 3) -> "ResultStore":
        """Open for reading (the last committed state, never written to) or for writing
        (a committed checkpoint is applied first). `verify` checks every digest."""
        path = Path(path)
        try:
            if writable:
                _replay_pending(path)
            group = zarr.open_group(str(path), mode="r+" if writable else "r")
            committed = {} if writable else _pending_arrays(path)
        except DamagedStore:
            raise
        except Exception as err:  # truncated zarr.json, unreadable redo file: one line, not a traceback
            raise DamagedStore(f"{path}: cannot be read ({first_line(err)}); the run cannot be vouched for, "
                               "re-run it") from None
        store = cls(path, group, committed)
        if verify:
            try:
                store.verify()
            except DamagedStore:
                # A live run may have checkpointed while we read: then read again.
                if writable or _read_state(path) == store.verified_state or retries == 0:
                    raise
                return cls.open(path, writable, verify, retries - 1)
        return store

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    def read(self, name: str) -> np.ndarray:
        """One array as last committed."""
        if name in self.committed:
            return self.committed[name]
        return self.array(name)[...]

    def read_many(self, wanted: list[str]) -> dict[str, np.ndarray]:
        """These arrays as last committed, read together (one round trip)."""
        stored = read_arrays({name: self.array(name) for name in wanted if name not in self.committed})
        return {name: self.committed[name] if name in self.committed else stored[name] for name in wanted}

    # --- totals and checkpoints

    def totals(self) -> tuple[Partial, np.ndarray]:
        sums, examples = self.sum_array_names(), self.example_array_names()
        values = self.read_many([*sums, *examples, names.TOKENS, names.LOSS_SUM, names.LOSS_TOKENS, names.SHARDS_DONE])
        partial = Partial(
            sums={name: values[name] for name in sums},
            tokens=values[names.TOKENS],
            loss_sum=float(values[names.LOSS_SUM]),
            loss_tokens=int(values[names.LOSS_TOKENS]),
            examples={name: values[name] for name in examples},
        )
        return partial, values[names.SHARDS_DONE]

    def shards_done(self) -> np.ndarray:
        return self.read(names.SHARDS_DONE)

    def example_prefixes(self) -> list[str]:
        """The prefixes whose --top-examples tables this store keeps (none: the run kept no examples)."""
        return [prefix for prefix in topk.RANKED_PREFIXES if self.has(topk.array_names(prefix)[0])]

    def example_array_names(self) -> list[str]:
        return [name for prefix in self.example_prefixes() for name in topk.array_names(prefix)]

    def checkpoint(self, totals: Partial, shards_done: np.ndarray) -> None:
        ensure_held(self.path)  # a run whose lock another process took over writes nothing more (raygrad.store.lock)
        pending = self.path / names.PENDING_CHECKPOINT
        _stage(pending, _checkpoint_arrays(totals, shards_done))
        _commit(pending)
        _apply_pending(self, pending)

    def prefixes(self) -> list[str]:
        """The statistic prefixes this store keeps (grad, value, attr, site_grad)."""
        return [prefix for prefix in names.MEAN_ARRAYS if self.has(f"{prefix}_sum")]

    def sum_array_names(self) -> list[str]:
        """Every running total added shard by shard: the prefixes' sums and the per-layer scalars."""
        return ([name for prefix in self.prefixes() for name in names.sum_names(prefix)]
                + [name for name in names.LAYER_SUMS if self.has(name)])

    def recorded_arrays(self) -> list[str]:
        """Every array a checkpoint vouches for (the derived statistics only once the run is complete)."""
        return [*self.sum_array_names(), *self.example_array_names(), names.LAYERS, names.LAYER_COORD, names.TOKENS,
                names.SHARDS_DONE, names.LOSS_SUM, names.LOSS_TOKENS]

    def finalize(self, timing: dict) -> None:
        """Write the derived statistics and mark the run complete (in that order: a kill
        in between leaves a running store that a resume finalizes again)."""
        self._record(self.write_means())
        self.group.attrs.update({names.ATTR_STATUS: names.STATUS_COMPLETE, names.ATTR_TIMING: timing})
        consolidate(self.path)

    def write_means(self) -> dict[str, np.ndarray]:
        """Every derived statistic ({prefix}_{statistic}, float32, for xarray and lazy readers; the
        exports derive theirs from the sums in float64) from the sums; returns them by name."""
        ensure_held(self.path)  # finalize and repair start here
        totals, _ = self.totals()
        count = totals.tokens[:, None]  # a layer with no tokens has statistics 0, not NaN
        written, attributes, new = {}, {}, {}
        for prefix in self.prefixes():
            source = self.array(names.sum_names(prefix)[0])
            for statistic in names.STATISTICS:
                name = names.store_name(prefix, statistic)
                values = stats.derive(statistic, *(totals.sums[n] for n in names.sum_names(prefix)), count)
                written[name] = values.astype(np.float32)
                attributes[name] = stats.array_attrs(prefix, statistic)
                if not self.has(name):
                    new[name] = {"shape": values.shape, "chunks": source.chunks, "dtype": "float32",
                                 "dimension_names": source.metadata.dimension_names, "attributes": attributes[name]}
        self._members().update(create_arrays(self.group, new))
        for name in written.keys() - new.keys():  # a repair, or a finalize again after a kill: as new ones have them
            self.array(name).attrs.update(attributes[name])
        write_arrays({name: (self.array(name), values) for name, values in written.items()})
        sync_tree(self.path, only=tuple(written))
        return written

    # --- digests

    def _record(self, arrays: dict[str, np.ndarray]) -> None:
        """Add these arrays' digests (and the inputs') to the state file, atomically."""
        self._record_digests({name: _digest(value) for name, value in arrays.items()})

    def _record_digests(self, digests: dict[str, str]) -> None:
        state = _read_state(self.path) or {"arrays": {}}
        state["arrays"].update(digests)
        state["inputs"] = _inputs_digest(self.attrs)
        _write_state(self.path, state)

    def seal(self) -> None:
        """Record the digest of every array (a store written in one go, like a comparison's)."""
        consolidate(self.path)
        self._record({name: array[...] for name, array in self.group.arrays()})

    def seal_unrecorded(self) -> None:
        """A store from before digests were recorded: take what it holds as its state."""
        if _read_state(self.path) is not None:
            raise RaygradError(f"--trust-unrecorded: {self.path} has a {names.CHECKPOINT_STATE}; its digests "
                               "are checked, not replaced")
        self._record({name: self.array(name)[...] for name in self.recorded_arrays()})

    def committed_group(self) -> zarr.Group:
        """The Zarr group as last committed: the group itself, or (while a committed
        checkpoint waits to be applied) an in-memory copy with it applied."""
        if not self.committed:
            return self.group
        view = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
        view.attrs.update(self.attrs)
        with warnings.catch_warnings():  # Zarr notes the redo file as "not a component"; it is ours
            warnings.simplefilter("ignore")
            members = list(self.group.arrays())
        for name, array in members:
            copy = view.create_array(name, shape=array.shape, chunks=array.chunks, dtype=array.dtype,
                                     fill_value=array.fill_value, dimension_names=array.metadata.dimension_names)
            copy[...] = self.read(name)
            copy.attrs.update(dict(array.attrs))
        return view

    def rebuild_means(self) -> list[str]:
        """A complete run whose sums verify: write its means again; returns their names."""
        self.verify(means=False)
        if self.attrs.get(names.ATTR_STATUS) != names.STATUS_COMPLETE:
            raise RaygradError(f"{self.path}: the run is not complete; finish it with raygrad run --resume "
                               f"{self.run_dir}")
        means = self.write_means()
        self._record(means)
        return list(means)

    def verify(self, means: bool = True) -> None:
        """Every recorded array reads back to its digest, and the configuration and plan
        are the ones the checkpoints were made for; else one line naming the part.
        `means`: also the derived means of a complete run."""
        where = self.path
        state = self.verified_state = _read_state(where)
        if state is None:
            raise DamagedStore(f"{where}: {names.CHECKPOINT_STATE} is missing or unreadable, so no number in "
                               "this store can be vouched for; re-run it (a store written before raygrad recorded "
                               f"digests: raygrad repair --trust-unrecorded {self.run_dir})")
        if state.get("inputs") != _inputs_digest(self.attrs):
            raise DamagedStore(f"{where}/zarr.json: the run's configuration or plan changed since its last "
                               "checkpoint; re-run it")
        complete = self.attrs.get(names.ATTR_STATUS) == names.STATUS_COMPLETE
        mean_names = _derived_names()
        is_run = names.ATTR_CONFIG in self.attrs  # a compare store has no derived statistics of its own
        if is_run and complete and means and not mean_names & set(state["arrays"]):
            raise DamagedStore(f"{where}: marked complete, but its statistics were never recorded; re-run it")
        # The committed redo file is checked by np.load (zip CRC) as it reads; means
        # count only once the run is complete (a kill mid-finalize leaves stale ones).
        checked = [name for name in state["arrays"]
                   if name not in self.committed and (name not in mean_names or (complete and means))]
        try:
            values = self.read_many(checked)
        except Exception:  # read one by one below: the array that cannot be read names itself
            values = {}
        for name in checked:
            recorded = state["arrays"][name]
            try:
                actual = _digest(values[name] if name in values else self.read(name))
                # Readers may go around the consolidated copy in the root (zarr.open_array, xarray
                # with consolidated=False): each array's own metadata must parse too.
                json.loads((where / name / "zarr.json").read_text())
            except Exception as err:  # a truncated chunk or array metadata, a deleted array
                raise DamagedStore(f"{where}/{name}: cannot be read ({first_line(err)}); "
                                   f"{self._remedy(name)}") from None
            if actual != recorded:
                raise DamagedStore(f"{where}/{name}: does not match its checkpoint digest (a chunk is missing, "
                                   f"truncated or changed); {self._remedy(name)}")

    def _remedy(self, name: str) -> str:
        if name in _derived_names():
            return f"the sums are intact: rebuild the derived statistics with raygrad repair {self.run_dir}"
        return "no number from this run can be vouched for: re-run it"


def consolidate(path: Path) -> None:
    """Every array's metadata in the root zarr.json (a finished store is opened in one read, and
    xarray.open_zarr does not warn), flushed to disk."""
    with warnings.catch_warnings():  # Zarr notes our own files (the state file) as "not a component"
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))
    sync_tree(path, only=("zarr.json",))


def dimension_name(prefix: str, target: str) -> str:
    """`feature` for an SAE's features, `dim` for a site's own dimensions: xarray needs distinct names
    for the two widths of an SAE run."""
    site = prefix in (names.SITE_PREFIX, names.SITE_VALUE_PREFIX)
    return names.DIM_FEATURE if target == "sae" and not site else names.DIM_SITE


def _derived_names() -> set[str]:
    """Names of the statistics finalize derives (a complete run's; rebuilt by `raygrad repair`)."""
    return {names.store_name(prefix, statistic) for prefix in names.MEAN_ARRAYS for statistic in names.STATISTICS}


def _example_specs(prefix: str, num_layers: int, width: int, k: int, score_dtype: np.dtype, dim: str) -> dict:
    """{prefix}_top_score / _top_row / _top_position, (layer, dim|feature, k), one chunk per layer, empty:
    name -> Group.create_array options."""
    kind = names.kind_of(prefix)
    described = {"score": ("same units as the kind", f"the signed {kind} of each example, best |score| first"),
                 "row": ("dataset row", "0-based row of the example's text in the dataset as read, before "
                                        "filtering; -1: an empty slot"),
                 "position": ("token position", "0-based index of the token in its tokenized text; -1: an "
                                                "empty slot")}
    dtypes = topk.table_dtypes(score_dtype)
    specs = {}
    for table, name in zip(topk.TABLES, topk.array_names(prefix)):
        units, description = described[table]
        specs[name] = {"shape": (num_layers, width, k), "chunks": (1, width, k), "dtype": dtypes[table],
                       "fill_value": topk.FILL[table], "dimension_names": (names.LAYER_COORD, dim, names.EXAMPLE_DIM),
                       "attributes": {"units": units, "description": description, "kind": kind,
                                      "order": "|score| descending, then row, then position ascending"}}
    return specs


def _checkpoint_arrays(totals: Partial, shards_done: np.ndarray) -> dict[str, np.ndarray]:
    return {
        **totals.sums,
        **totals.examples,
        names.TOKENS: totals.tokens,
        names.LOSS_SUM: np.float64(totals.loss_sum),
        names.LOSS_TOKENS: np.int64(totals.loss_tokens),
        names.SHARDS_DONE: shards_done,
    }


# The steps of a checkpoint, each its own function (the fault-injection tests stop at each).

def _stage(pending: Path, arrays: dict[str, np.ndarray]) -> None:
    staging = pending.with_suffix(".tmp.npz")
    # A killed writer's leftover (or a link planted there) is removed, never written through: the new
    # file is created where nothing is (O_EXCL), and a link made there meanwhile is refused (O_NOFOLLOW).
    staging.unlink(missing_ok=True)
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())


def _commit(pending: Path) -> None:
    os.replace(pending.with_suffix(".tmp.npz"), pending)  # the commit point
    fsync_dir(pending.parent)


def _apply_pending(store: ResultStore, pending: Path) -> None:
    """Copy a committed checkpoint into the arrays, flush them, record their digests,
    then drop the redo file (in that order: a kill anywhere replays it). The redo file is read one
    array at a time, each dropped once written and digested: the head holds one array of it beside
    the totals, not a whole extra copy of them (with --top-examples tables, hundreds of MB)."""
    digests = {}
    with np.load(pending, allow_pickle=False) as data:
        for name in data.files:  # one at a time: a kill between two leaves some written (fault tests)
            value = data[name]
            _write_array(store, name, value)
            digests[name] = _digest(value)
            del value
    sync_tree(store.path, only=tuple(digests))
    store._record_digests(digests)
    _drop_redo(pending)


def _drop_redo(pending: Path) -> None:
    pending.unlink()
    fsync_dir(pending.parent)


def _write_array(store: ResultStore, name: str, value: np.ndarray) -> None:
    store.array(name)[...] = value


def _replay_pending(path: Path) -> None:
    pending = path / names.PENDING_CHECKPOINT
    for leftover in path.glob("*.tmp.npz"):
        leftover.unlink()  # an uncommitted write: the arrays still hold the last checkpoint
    if pending.exists():
        _apply_pending(ResultStore(path, zarr.open_group(str(path), mode="r+")), pending)


def _pending_arrays(path: Path) -> dict[str, np.ndarray]:
    pending = path / names.PENDING_CHECKPOINT
    try:
        with np.load(pending, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:  # none, or the writer applied and dropped it meanwhile
        return {}


# --- digests and the state file

def _digest(value: np.ndarray) -> str:
    value = np.asarray(value)  # a 0-d array may come back from Zarr as a NumPy scalar
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{value.dtype.str}{value.shape}".encode())
    h.update(value.tobytes())  # C order whatever the layout
    return h.hexdigest()


def _inputs_digest(attrs: dict) -> str:
    """The whole saved configuration and plan, recorded when the store is created and checked on every open
    (a resume's too): it binds the store to what it measures (the configuration's measured part) and to the
    pinned revisions it was computed on (the plan's model_revision, sae_revisions, dataset_revision)."""
    inputs = {key: attrs.get(key) for key in (names.ATTR_CONFIG, names.ATTR_PLAN)}
    return hashlib.blake2b(json.dumps(inputs, sort_keys=True).encode(), digest_size=16).hexdigest()


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads((path / names.CHECKPOINT_STATE).read_text())
    except (OSError, ValueError):
        return None


def _write_state(path: Path, state: dict) -> None:
    with replacing(path / names.CHECKPOINT_STATE) as handle:
        handle.write(json.dumps(state, indent=1, sort_keys=True).encode())


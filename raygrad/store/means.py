"""The derived statistics ({prefix}_{statistic}, float32, for xarray and lazy readers): written from the
sums when a run finishes (`finalize`, which also marks it complete) and again by `raygrad repair`."""

from __future__ import annotations

import numpy as np

from .. import constants as names
from . import stats
from .digests import record
from .files import sync_tree
from .layout import consolidate
from .lock import ensure_held
from .reading import StoreReader
from .zarr_batch import create_arrays, write_arrays


def derived_names() -> set[str]:
    """Names of the statistics finalize derives (a complete run's; rebuilt by `raygrad repair`)."""
    return {names.store_name(prefix, statistic) for prefix in names.MEAN_ARRAYS for statistic in names.STATISTICS}


def finalize(store: StoreReader, timing: dict) -> None:
    """Write the derived statistics and mark the run complete (in that order: a kill
    in between leaves a running store that a resume finalizes again)."""
    record(store.path, store.attrs, write_means(store))
    store.group.attrs.update({names.ATTR_STATUS: names.STATUS_COMPLETE, names.ATTR_TIMING: timing})
    consolidate(store.path)


def write_means(store: StoreReader) -> dict[str, np.ndarray]:
    """Every derived statistic (the exports derive theirs from the sums in float64) from the sums;
    returns them by name."""
    ensure_held(store.path)  # finalize and repair start here
    totals, _ = store.totals()
    count = totals.tokens[:, None]  # a layer with no tokens has statistics 0, not NaN
    written, attributes, new = {}, {}, {}
    for prefix in store.prefixes():
        source = store.array(names.sum_names(prefix)[0])
        for statistic in names.STATISTICS:
            name = names.store_name(prefix, statistic)
            values = stats.derive(statistic, *(totals.sums[n] for n in names.sum_names(prefix)), count)
            written[name] = values.astype(np.float32)
            attributes[name] = stats.array_attrs(prefix, statistic)
            if not store.has(name):
                new[name] = {"shape": values.shape, "chunks": source.chunks, "dtype": "float32",
                             "dimension_names": source.metadata.dimension_names, "attributes": attributes[name]}
    store.add_arrays(create_arrays(store.group, new))
    for name in written.keys() - new.keys():  # a repair, or a finalize again after a kill: as new ones have them
        store.array(name).attrs.update(attributes[name])
    write_arrays({name: (store.array(name), values) for name, values in written.items()})
    sync_tree(store.path, only=tuple(written))
    return written

"""The Zarr store (layout, checkpoint + redo log, verify, reads), the reducer, the run lock, durable
file writes, and the reduction's data: Partial, the top-K merge, statistics derived from the sums."""

"""The per-batch math (gradients, statistics, top-K candidates) and the Ray-free worker that turns a
shard into a Partial."""

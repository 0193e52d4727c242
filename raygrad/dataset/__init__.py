"""Datasets as rows: formats (local files, hub datasets, the bundled corpus), what a usable text is,
shard planning by row range, and reading one shard's rows."""

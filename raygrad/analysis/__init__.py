"""What is read from a finished store: exports, plots, compare, top, examples with their texts, the
report, results for analysis code, SAE quality."""

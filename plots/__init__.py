"""Accuracy-FLOPs curves and tables regenerated from stored results (never imports torch).

Not implemented yet: tracked by the results-and-plots issue. Results live in the run directory's summary.csv and
samples.jsonl (see results/README.md).
"""

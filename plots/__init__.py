"""Curves and tables regenerated from stored results (`python -m plots RESULTS_DIR`); never imports torch.

So far: accuracy vs prefill FLOPs per task (`plots.pareto`). Latency curves, tables and token-selection pictures
are tracked by the results-and-plots issue.
"""

"""Commands built on the sweep, not part of it: the speed benchmarks (`python -m benchmarks.tools.speed`), the
controller trainer (`python -m benchmarks.tools.train_adaptive`) and the comparison of two result folders
(`python -m benchmarks.tools.paired_runs`)."""

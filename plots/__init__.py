"""Figures and tables regenerated from stored results (`python -m plots RESULTS_DIR`); never imports torch.

`plots.data` reads and combines results directories, `plots.curves` draws accuracy against prefill FLOPs and
latency (with the Pareto frontier), the average relative to `full` and visual tokens per LLM layer,
`plots.tables` writes Markdown / CSV / LaTeX tables, `plots.pictures` the token-selection pictures.
"""

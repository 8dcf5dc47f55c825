"""FLOPs accounting for LLaVA-style models: an analytic counter (`analytic.py`, its conventions in its docstring)
driven by each sample's token trace (`methods.trace.TokenTrace`), traces from shapes alone for any config
(`shapes.py`), and the cross-checks against fvcore and torch's FlopCounterMode (`measured.py`); `python -m flops`
prints a table.
"""

"""FLOPs accounting for LLaVA-style models (analytic counter checked against fvcore).

Not implemented yet: tracked by the efficiency-accounting issue. The runner already records the per-sample token
trace (`methods.llava.TokenTrace`) that the analytic counter will be driven by.
"""

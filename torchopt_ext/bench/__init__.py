"""Microbenchmarks printed as side-by-side ratios (``python -m torchopt_ext bench``)."""

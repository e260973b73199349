"""Side-by-side measurements of xp against hand-written PyTorch (``python -m benchmarks``)."""

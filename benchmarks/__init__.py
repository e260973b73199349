"""Side-by-side measurements of xp against hand-written PyTorch (``python -m benchmarks``)."""


class Skipped(Exception):
    """A case cannot run here; the message says why (printed in its row)."""

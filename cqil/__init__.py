"""cqil: Concurrent Computation of Quasi-Independent Layers for LLaMA-family models."""
__version__ = "0.1.0"


class CqilError(Exception):
    """A user-facing error: the message is one line saying what is wrong and how to fix it."""

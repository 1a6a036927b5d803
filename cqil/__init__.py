"""cqil: Concurrent Computation of Quasi-Independent Layers for LLaMA-family models."""
__version__ = "0.1.0"


class CqilError(Exception):
    """A user-facing error: the message is one line saying what is wrong and how to fix it."""


class JobFailed(Exception):
    """A failure that is not bad input (a rank died, a peer never joined): one line, exit 1."""

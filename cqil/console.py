"""What a job shows: `-q` (errors only: silence on success), the default, `-v` (the libraries' info too).

cqil's own lines go to stdout and its notes and progress bars to stderr; while a job runs both streams pass through
a gate on the `cqil` logger (Python logging): stdout at INFO, stderr at WARNING, so one logger level decides what
reaches the terminal, whether a line came from `LOG.info` or a job's print, a tqdm bar (tqdm writes to the stderr
of the moment it starts) or a Python warning. The libraries' own loggers and progress bars (transformers, datasets,
huggingface_hub, tqdm) are set through their environment variables, which the ranks of a torchrun job and every
other subprocess inherit. The one error line of a failed job (cqil.cli) is written outside the gate: always shown.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator, TextIO

LOG = logging.getLogger("cqil")
LIBRARIES = ("transformers", "datasets", "huggingface_hub", "peft", "accelerate")  # their loggers follow -q/-v
LEVELS = {-1: logging.ERROR, 0: logging.INFO, 1: logging.DEBUG}
# verbosity -> environment for the libraries (read when they are imported, here or in a subprocess)
LIBRARY_ENV = {
    -1: {"TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error", "HF_HUB_VERBOSITY": "error",
         "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
         "PYTHONWARNINGS": "ignore"},
    0: {},
    1: {"TRANSFORMERS_VERBOSITY": "info", "DATASETS_VERBOSITY": "info", "HF_HUB_VERBOSITY": "info"},
}


class Gate:
    """A text stream that passes writes on to `stream` while LOG is enabled for `level` (and drops them otherwise)."""

    def __init__(self, stream: TextIO, level: int):
        self.stream, self.level = stream, level

    def write(self, text: str) -> int:
        return self.stream.write(text) if LOG.isEnabledFor(self.level) else len(text)

    def __getattr__(self, name: str):  # flush, fileno, isatty, encoding, ...: the stream's own
        return getattr(self.stream, name)


class _Stdout:
    """sys.stdout as it is at each write (a test's capture, the gate of `shown`), for the handler of LOG."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


def product() -> contextlib.AbstractContextManager:
    """stdout past the gate for the body: what a job is run for (cqil generate's completions) shows even with -q,
    as `cat -q` would still print the file."""
    out = sys.stdout
    return contextlib.redirect_stdout(out.stream if isinstance(out, Gate) else out)


@contextlib.contextmanager
def shown(verbosity: int) -> Iterator[None]:
    """Run the body at `verbosity` (-1 quiet, 0 default, 1 verbose): see the module docstring."""
    LOG.setLevel(LEVELS[verbosity])
    if not LOG.handlers:  # cqil's own records: their message alone, on stdout
        handler = logging.StreamHandler(_Stdout())
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(handler)
        LOG.propagate = False
    saved = {k: os.environ.get(k) for k in LIBRARY_ENV[verbosity]}
    os.environ.update(LIBRARY_ENV[verbosity])
    levels = {name: logging.getLogger(name).level for name in LIBRARIES}  # (their env is read once, at import)
    for name in LIBRARIES if verbosity else ():
        logging.getLogger(name).setLevel(logging.ERROR if verbosity < 0 else logging.INFO)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(Gate(sys.stdout, logging.INFO)), \
                contextlib.redirect_stderr(Gate(sys.stderr, logging.WARNING)):
            if verbosity < 0:
                warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v

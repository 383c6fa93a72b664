"""Logging set-up: one logger tree under ``capsid``, levels from -q/-v/-d."""

from __future__ import annotations

import logging
import sys

QUIET, NORMAL, VERBOSE, DEBUG = logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG


def configure(level: int) -> None:
    """Send capsid's log records to stderr at *level*, as ``LEVEL: message``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("capsid")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def get(name: str) -> logging.Logger:
    """The logger for module *name* (pass ``__name__``)."""
    return logging.getLogger(name)

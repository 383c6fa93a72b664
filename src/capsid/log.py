"""Diagnostics on stderr, with levels from -q/-v/-d: ``WARNING: message``.

Deliberately not the ``logging`` module: importing it costs ~8 ms on every
container start (an MPI job starts one per rank), and the runtime may emit a
warning after the container's root has replaced the host's, when the standard
library can no longer be imported. This writes the same format directly.
"""

from __future__ import annotations

import sys

QUIET, NORMAL, VERBOSE, DEBUG = 40, 30, 20, 10
_NAMES = {DEBUG: "DEBUG", VERBOSE: "INFO", NORMAL: "WARNING", QUIET: "ERROR"}
_level = NORMAL


class Logger:
    """What capsid's modules log through; the interface of ``logging.Logger``'s basics."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _emit(self, level: int, msg: str, args: tuple[object, ...]) -> None:
        if level >= _level:
            sys.stderr.write(f"{_NAMES[level]}: {msg % args if args else msg}\n")

    def debug(self, msg: str, *args: object) -> None:
        self._emit(DEBUG, msg, args)

    def info(self, msg: str, *args: object) -> None:
        self._emit(VERBOSE, msg, args)

    def warning(self, msg: str, *args: object) -> None:
        self._emit(NORMAL, msg, args)

    def error(self, msg: str, *args: object) -> None:
        self._emit(QUIET, msg, args)


def configure(level: int) -> None:
    """Show records at *level* and above."""
    global _level
    _level = level


def enabled(level: int) -> bool:
    return level >= _level


def get(name: str) -> Logger:
    """The logger for module *name* (pass ``__name__``)."""
    return Logger(name)

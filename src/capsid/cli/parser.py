"""argparse set-up shared by the verb modules."""

from __future__ import annotations

import argparse
from typing import NoReturn

from capsid.errors import UsageError


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are capsid's one-line UsageError."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, f"see '{self.prog} --help'")


def from_variables(p: argparse.ArgumentParser, args: argparse.Namespace,
                   variables: dict[str, tuple[str, ...]]) -> argparse.Namespace:
    """Apptainer's variables for flags not given (``APPTAINER_PULLDIR`` for ``--dir``):
    *variables* maps a flag's destination to its names, without the prefix."""
    from capsid import config

    for dest, names in variables.items():
        if getattr(args, dest) != p.get_default(dest):
            continue  # given on the command line: it wins
        if isinstance(p.get_default(dest), bool):
            setattr(args, dest, any(config.env_flag(name) for name in names))
            continue
        value = next((v for v in map(config.env, names) if v), None)
        if value is not None:
            setattr(args, dest, value.split("\n") if isinstance(p.get_default(dest), list)
                    else value)
    return args


def parser(verb: str, usage: str, description: str) -> Parser:
    from capsid.cli.main import PROG

    return Parser(prog=f"{PROG[0]} {verb}", usage=f"{PROG[0]} {verb} {usage}",
                  description=description, allow_abbrev=False)

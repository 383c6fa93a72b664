"""argparse set-up shared by the verb modules."""

from __future__ import annotations

import argparse
from typing import NoReturn

from capsid.errors import UsageError


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are capsid's one-line UsageError."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, f"see '{self.prog} --help'")


def parser(verb: str, usage: str, description: str) -> Parser:
    from capsid.cli.main import PROG

    return Parser(prog=f"{PROG[0]} {verb}", usage=f"{PROG[0]} {verb} {usage}",
                  description=description, allow_abbrev=False)

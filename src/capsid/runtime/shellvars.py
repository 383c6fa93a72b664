"""Shell variable expansion and assignments, worked out without a shell.

Apptainer passes ``--env``, ``--env-file`` and ``APPTAINERENV_*`` values through its
shell interpreter: an env file is run as a script on the host (variables only, no
commands), and each value is then evaluated again in the container, as the body of a
double-quoted word, after the image's scripts (``--env 'PATH=$PATH:/opt/bin'`` extends
the image's ``PATH``). This module does both for what a shell does without running
anything: ``$NAME``, ``${NAME}``, ``${NAME:-word}`` and the other default forms,
``${#NAME}``, quotes and backslashes. A command substitution (``$(...)``, backquotes)
or another expansion raises :class:`NeedsShell`: in the container the value is then
left to ``/bin/sh``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=")
#: ``${NAME<op>word}`` operators capsid evaluates
_OPERATORS = (":-", ":=", ":+", ":?", "-", "=", "+", "?")


class NeedsShell(Exception):
    """The text holds an expansion only a shell can do (a command substitution...)."""


def evaluate(value: str, env: Mapping[str, str]) -> str:
    """*value* as the body of a double-quoted word (``"`` in it taken literally, as
    Apptainer escapes them), expanded against *env*."""
    try:
        return _scan(value, 0, env, "", False)[0]
    except RecursionError:
        raise ValueError("expansions nested too deeply") from None


def _scan(text: str, i: int, env: Mapping[str, str], stop: str, bare: bool
          ) -> tuple[str, int]:
    """From *i* to the first of *stop*: a bare word's rules (quotes, any escape) or,
    not *bare*, a double-quoted word's (a backslash escapes only ``$ ` " \\``)."""
    out: list[str] = []
    while i < len(text) and text[i] not in stop:
        char = text[i]
        escaped = text[i + 1:i + 2] if char == "\\" else ""
        if char == "\\" and (bare or (escaped and escaped in '$`"\\\n')):
            if escaped != "\n":  # a backslash-newline joins lines
                out.append(escaped or "\\")  # a backslash that ends the text stays
            i += 1 + len(escaped)
        elif char in "$`":
            expanded, i = _dollar(text, i, env)
            out.append(expanded)
        elif bare and char == "'":
            close = text.find("'", i + 1)
            if close < 0:
                raise ValueError("an unclosed single quote")
            out.append(text[i + 1:close])
            i = close + 1
        elif bare and char == '"':
            part, i = _scan(text, i + 1, env, '"', False)
            if i == len(text):
                raise ValueError("an unclosed double quote")
            out.append(part)
            i += 1
        else:
            out.append(char)
            i += 1
    return "".join(out), i


def _dollar(text: str, i: int, env: Mapping[str, str]) -> tuple[str, int]:
    """The expansion that starts with the ``$`` (or backquote) at *i*."""
    rest = text[i + 1:]
    if text[i] == "`" or rest.startswith("("):
        raise NeedsShell("a command substitution")
    if rest.startswith("{"):
        close = _closing_brace(text, i + 2)
        return _braced(text[i + 2:close], env), close + 1
    name = _NAME.match(rest)
    if name:
        return env.get(name.group(), ""), i + 1 + name.end()
    if rest[:1] and (rest[0].isdigit() or rest[0] in "@*#?$!-"):
        raise NeedsShell("a special parameter")
    return "$", i + 1


def _closing_brace(text: str, i: int) -> int:
    depth = 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
        i += 1
    raise ValueError("an unclosed ${")


def _braced(inner: str, env: Mapping[str, str]) -> str:
    """``${inner}``."""
    if inner.startswith("#") and _NAME.fullmatch(inner[1:]):
        return str(len(env.get(inner[1:], "")))
    name = _NAME.match(inner)
    if not name:
        raise NeedsShell(f"${{{inner}}}")
    key, tail = name.group(), inner[name.end():]
    if not tail:
        return env.get(key, "")
    op = next((o for o in _OPERATORS if tail.startswith(o)), None)
    if op is None:  # ${NAME%pattern} and the like
        raise NeedsShell(f"${{{inner}}}")
    word = _scan(tail[len(op):], 0, env, "", False)[0]
    value = env.get(key)
    unset = value is None or (op.startswith(":") and value == "")
    if op.endswith("+"):
        return "" if unset else word
    if not unset:
        return value or ""
    if op.endswith("?"):
        raise NeedsShell(f"${{{inner}}}")  # the shell reports it
    if op.endswith("=") and isinstance(env, MutableMapping):
        env[key] = word
    return word


def assignments(text: str, host: Mapping[str, str]) -> dict[str, str]:
    """The variables an env file sets, run as a script of assignments, ``export`` and
    ``unset`` with *host*'s variables to expand (commands are not run).

    Raises ValueError naming the line for anything else.
    """
    scope = dict(host)
    result: dict[str, str] = {}
    i, line = 0, 1
    words: list[tuple[str, str | None]] = []  # (value, NAME of a NAME=value word)
    while True:
        while i < len(text) and text[i] in " \t":
            i += 1
        if i == len(text) or text[i] in "\n;":
            _run(words, scope, result, line)
            words = []
            if i == len(text):
                return result
            line += text[i] == "\n"
            i += 1
            continue
        if text[i] == "#":
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        start = i
        match = _ASSIGNMENT.match(text, i)
        # NAME=value assigns while every word before it did, and after export
        assigning = not words or words[0] == ("export", None) \
            or all(name is not None for _, name in words)
        name = match.group(1) if match and assigning else None
        if match and assigning:
            i = match.end()
        try:
            value, i = _word(text, i, scope)
        except RecursionError:
            raise ValueError(f"line {line}: expansions nested too deeply") from None
        except NeedsShell as err:
            raise ValueError(f"line {line}: {err} is not allowed in an env file, which may "
                             "only set variables") from None
        except ValueError as err:
            raise ValueError(f"line {line}: {err}") from None
        line += text.count("\n", start, i)
        if name is not None:
            scope[name] = value  # visible to the words after it
        words.append((value, name))


def _run(words: list[tuple[str, str | None]], scope: dict[str, str],
         result: dict[str, str], line: int) -> None:
    """One command of an env file."""
    if not words:
        return
    if words[0] == ("export", None):
        for value, name in words[1:]:
            if name is not None:
                result[name] = value
            elif _NAME.fullmatch(value):
                if value in scope:
                    result[value] = scope[value]  # export NAME
            else:
                raise ValueError(f"line {line}: {value!r} is not a variable to export")
        return
    if words[0] == ("unset", None):
        for value, _ in words[1:]:
            result.pop(value, None)
            scope.pop(value, None)
        return
    command = next((value for value, name in words if name is None), None)
    if command is not None:
        raise ValueError(f"line {line}: {command!r} is a command, and an env file may only "
                         "set variables (NAME=VALUE)")
    for value, name in words:
        result[str(name)] = value


def _word(text: str, i: int, env: Mapping[str, str]) -> tuple[str, int]:
    """One shell word from *i*: quotes removed, backslashes and ``$`` applied."""
    return _scan(text, i, env, " \t\n;", True)

"""Dockerfile words: splitting on blanks with quotes, and ``$VAR`` expansion as BuildKit does.

``${VAR}``, ``$VAR``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:+alt}``,
``${VAR+alt}`` and ``${VAR:?message}``; single quotes keep everything literal,
double quotes allow expansion, the escape character (``\\`` or a backquote) takes the
next character literally.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from capsid.errors import UsageError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def split(text: str, escape: str = "\\") -> list[str]:
    """Split *text* on blanks outside quotes; quotes and escapes are kept for :func:`expand`."""
    words: list[str] = []
    current: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == escape and i + 1 < len(text) and quote != "'":
            current.append(ch + text[i + 1])
            i += 2
            continue
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch.isspace():
            if current:
                words.append("".join(current))
                current = []
            i += 1
            continue
        current.append(ch)
        i += 1
    if current:
        words.append("".join(current))
    return words


def expand(word: str, env: Mapping[str, str], escape: str = "\\", *,
           where: str = "") -> str:
    """*word* with its quotes removed, escapes applied and variables expanded from *env*."""
    out: list[str] = []
    quote = ""
    i = 0
    while i < len(word):
        ch = word[i]
        if quote == "'":
            if ch == "'":
                quote = ""
            else:
                out.append(ch)
            i += 1
            continue
        if ch == escape and i + 1 < len(word):
            nxt = word[i + 1]
            if quote == '"' and nxt not in ('"', "$", escape):
                out.append(ch)  # inside double quotes only \" \$ \\ are escapes
            out.append(nxt)
            i += 2
            continue
        if ch == '"':
            quote = "" if quote == '"' else '"'
            i += 1
            continue
        if ch == "'" and not quote:
            quote = "'"
            i += 1
            continue
        if ch == "$":
            value, i = _variable(word, i + 1, env, escape, where)
            out.append(value)
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _variable(word: str, i: int, env: Mapping[str, str], escape: str,
              where: str) -> tuple[str, int]:
    """The value of the variable reference starting at *word[i]* (after ``$``)."""
    if i < len(word) and word[i] == "{":
        end = _closing(word, i + 1)
        if end < 0:
            raise UsageError(f"{where}: missing '}}' in {word!r}", "close the ${...} reference")
        body = word[i + 1:end]
        match = _NAME.match(body)
        if not match:
            raise UsageError(f"{where}: bad variable reference ${{{body}}}",
                             "write ${NAME} or ${NAME:-default}")
        name, rest = match.group(), body[match.end():]
        value = env.get(name)
        if not rest:
            return value or "", end + 1
        for op in (":-", ":+", ":?", "-", "+", "?"):
            if rest.startswith(op):
                arg = expand(rest[len(op):], env, escape, where=where)
                empty = value is None or (op.startswith(":") and value == "")
                if op.endswith("-"):
                    return (arg if empty else value or ""), end + 1
                if op.endswith("+"):
                    return ("" if empty else arg), end + 1
                if empty:
                    raise UsageError(f"{where}: {name}: {arg or 'is not set'}",
                                     f"pass --build-arg {name}=VALUE")
                return value or "", end + 1
        raise UsageError(f"{where}: unsupported modifier in ${{{body}}}",
                         "use ${NAME:-default}, ${NAME:+alternative} or ${NAME:?message}")
    match = _NAME.match(word, i)
    if not match:
        return "$", i
    return env.get(match.group(), ""), match.end()


def _closing(word: str, i: int) -> int:
    depth = 1
    while i < len(word):
        if word[i] == "{":
            depth += 1
        elif word[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1

"""Shell expansion without a shell: Apptainer's evaluation of --env values and env files."""

from __future__ import annotations

import pytest

from capsid.runtime.shellvars import NeedsShell, assignments, evaluate

ENV = {"PATH": "/usr/bin:/bin", "HOME": "/h", "EMPTY": ""}


@pytest.mark.parametrize(("value", "expected"), [
    ("$PATH:/foo", "/usr/bin:/bin:/foo"),
    ("${PATH}x", "/usr/bin:/binx"),
    ("\\$PATH", "$PATH"),
    ('say "hi"', 'say "hi"'),  # Apptainer escapes the quotes it wraps values in
    ("'single'", "'single'"),
    ("${NOPE:-def}", "def"), ("${EMPTY:-d}", "d"), ("${EMPTY-d}", ""),
    ("${PATH:+set}", "set"), ("${NOPE:+set}", ""), ("${NOPE:-$HOME/x}", "/h/x"),
    ("${#HOME}", "2"), ("$", "$"), ("a$ b", "a$ b"), ("x\\y", "x\\y"), ("end\\", "end\\"),
])
def test_values_are_evaluated_as_a_double_quoted_word(value: str, expected: str) -> None:
    assert evaluate(value, ENV) == expected


@pytest.mark.parametrize("value", ["$(id -u)", "`id -u`", "$1", "$@", "${PATH%%:*}",
                                   "${NOPE:?unset}"])
def test_what_needs_a_shell_says_so(value: str) -> None:
    with pytest.raises(NeedsShell):
        evaluate(value, ENV)


def test_an_env_file_is_a_script_of_assignments() -> None:
    text = ("# a comment\nA=1\nexport B=\"two words\" C='$lit'\n"
            "D=$A-$HOME E=\"\\$PATH:/\" # trailing\nexport HOME\nF=x\\ y\n"
            "G=\"multi\nline\"\nunset A\n")
    assert assignments(text, {"HOME": "/hh"}) == {
        "B": "two words", "C": "$lit", "D": "1-/hh", "E": "$PATH:/", "HOME": "/hh",
        "F": "x y", "G": "multi\nline"}


@pytest.mark.parametrize(("text", "message"), [
    ("rm -rf /\n", "line 1: 'rm' is a command"),
    ("A=1\nB=2 cmd\n", "line 2: 'cmd' is a command"),
    ("X=$(id)\n", "a command substitution is not allowed"),
    ("Y='open\n", "an unclosed single quote"),
    ('Z="open\n', "an unclosed double quote"),
    ("W=" + "${a:-" * 3000 + "}" * 3000, "nested too deeply"),
])
def test_an_env_file_that_is_more_is_one_error(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        assignments(text, {})

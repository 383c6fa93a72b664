"""The CLI's contract: version, help, one-line errors with a hint, exit 255."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from capsid.cli.main import COMMANDS, main


def test_version(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("capsid version ")


def test_help_lists_every_command(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


#: commands with actions of their own, each with its own --help
ACTIONS = {"instance": ("start", "run", "list", "stop"), "cache": ("list", "clean"),
           "sif": ("list", "info", "header", "dump"), "overlay": ("create",),
           "key": ("newpair", "list", "import", "export", "remove"),
           "registry": ("login", "logout", "list")}


@pytest.mark.parametrize("words", [[verb] for verb, (module, _) in COMMANDS.items()
                                   if module and verb != "keyserver"]
                         + [[verb, action] for verb, actions in ACTIONS.items()
                            for action in actions])
def test_every_help_prints_usage(words: list[str], capsys) -> None:  # type: ignore[no-untyped-def]
    """Help texts are formatted with %: one unescaped '%post' broke a whole verb's help."""
    try:
        code = main([*words, "--help"])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    assert code == 0 and err == "", err
    assert out.lower().startswith("usage: capsid"), out


def test_an_actions_error_names_its_help(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["sif", "list"]) == 255
    assert capsys.readouterr().err == ("capsid: error: the following arguments are required: "
                                       "image; see 'capsid sif list --help'\n")


def test_unknown_command_is_one_line_with_a_hint(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["frobnicate"]) == 255
    err = capsys.readouterr().err
    assert err == "capsid: error: unknown command 'frobnicate'; see 'capsid --help' for the " \
                  "commands\n"


def test_bad_option_is_one_line(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["inspect", "--bogus", "x"]) == 255
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("capsid: error: unrecognized arguments")
    assert "Traceback" not in err


def test_missing_image_error(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["inspect", str(tmp_path / "nope.sif")]) == 255
    err = capsys.readouterr().err
    assert err == f"capsid: error: image {tmp_path}/nope.sif does not exist; check the path " \
                  "and try again\n"


def test_version_imports_no_command_module() -> None:
    code = ("import sys; from capsid.cli.main import main; main(['--version']); "
            "print(sorted(m for m in sys.modules if m.startswith('capsid')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines()[-1] == "['capsid', 'capsid.cli', 'capsid.cli.main']"


def test_readme_shows_every_compatibility_flag() -> None:
    """The README's table of Apptainer's accepted and refused flags is the code's."""
    from capsid.cli import compat

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert compat.markdown() in readme, "run python -m capsid.cli.compat into the README"

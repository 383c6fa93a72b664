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


@pytest.mark.parametrize("words", [[verb] for verb in COMMANDS if verb != "keyserver"]
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


def test_key_newpair_push_is_a_switch(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["key", "newpair", "--push", "--name", "x"]) == 255
    assert "capsid has no keyserver to push to" in capsys.readouterr().err


def test_registry_login_without_input_is_one_error(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["registry", "login", "--password-stdin", "registry.example"]) == 255
    assert "standard input ended" in capsys.readouterr().err


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


@pytest.mark.parametrize(("variable", "value", "field", "expected"), [
    ("APPTAINER_PWD", "/usr", "pwd", "/usr"),
    ("SINGULARITY_TARGET_PWD", "/srv", "pwd", "/srv"),
    ("APPTAINER_CWD", "/opt", "pwd", "/opt"),
    ("APPTAINER_HOSTNAME", "node", "hostname", "node"),
    ("APPTAINER_ENV_FILE", "/a,/b", "env_files", ("/a", "/b")),
    ("APPTAINER_SHELL", "/bin/bash", "shell", "/bin/bash"),
    ("APPTAINER_NO_MOUNT", "tmp,home", "no_mount", ("tmp", "home")),
    ("APPTAINER_APP", "tool", "app", "tool"),
    ("SINGULARITY_OVERLAYIMAGE", "/o.img", "overlay", "/o.img"),
    ("APPTAINER_SCRATCHDIR", "/s", "scratch", ("/s",)),
    ("APPTAINER_IPC", "1", "ipc", True),
    ("APPTAINER_UNSHARE_UTS", "true", "uts", True),
    ("APPTAINER_NET", "1", "net", True),
    ("APPTAINER_UNSHARE_PID", "1", "pid", True),
    ("APPTAINER_WRITABLE", "1", "writable", True),
    ("APPTAINER_NV_OFF", "1", "no_nv", True),
    ("APPTAINER_ROCM_OFF", "1", "no_rocm", True),
    ("APPTAINER_NOENV", "A,B", "no_env", ("A", "B")),
    ("APPTAINER_IPC", "0", "ipc", False),
])
def test_apptainers_variables_stand_in_for_flags(variable: str, value: str, field: str,
                                                 expected: object,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Each flag's APPTAINER_/SINGULARITY_ variables, as Apptainer's flags name them."""
    from capsid.cli import actions

    monkeypatch.setenv(variable, value)
    values, _image, _args = actions.parse("exec", ["image.sif", "true"])
    assert getattr(actions.options(values), field) == expected


def test_apptainers_variables_stand_in_for_other_commands_flags(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """APPTAINER_PULLFOLDER is pull --dir, unless --dir is given; bools and lists too."""
    import argparse

    from capsid.cli.parser import from_variables

    monkeypatch.setenv("APPTAINER_PULLFOLDER", str(tmp_path / "absent"))
    assert main(["pull", "docker-archive:/nonexistent.tar"]) == 255
    assert f"--dir {tmp_path}/absent: no such directory" in capsys.readouterr().err
    p = argparse.ArgumentParser()
    p.add_argument("--dir")
    p.add_argument("--sandbox", action="store_true")
    p.add_argument("--mount", action="append", default=[])
    monkeypatch.setenv("SINGULARITY_SANDBOX", "1")
    monkeypatch.setenv("APPTAINER_MOUNT", "a\nb")
    names = {"dir": ("PULLFOLDER",), "sandbox": ("SANDBOX",), "mount": ("MOUNT",)}
    args = from_variables(p, p.parse_args([]), names)
    assert (args.dir, args.sandbox, args.mount) == (str(tmp_path / "absent"), True, ["a", "b"])
    given = from_variables(p, p.parse_args(["--dir", "/x", "--mount", "c"]), names)
    assert (given.dir, given.mount) == ("/x", ["c"])


@pytest.mark.parametrize("argv", [["key", "import", "/dev/zero"],
                                  ["build", "--build-arg-file", "/dev/zero", "o.sif", "x.def"]])
def test_endless_small_files_are_one_error(argv: list[str], tmp_path: Path, capsys,  # type: ignore[no-untyped-def]
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A key or build-argument file is read up to 1 MiB (env files too, see
    test_runtime_rules): /dev/zero filled memory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.def").write_text("Bootstrap: scratch\n")
    assert main(argv) == 255
    assert "larger than 1024 KiB" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "message"), [("--app", "is not an app name"),
                                               ("--hostname", "1 to 64 characters")])
def test_an_empty_value_given_is_still_checked(flag: str, message: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """--app '' was taken as no --app (and APPTAINER_APP read instead)."""
    from capsid.cli import actions
    from capsid.errors import UsageError

    monkeypatch.setenv("APPTAINER_APP", "tool")
    values, _image, _args = actions.parse("exec", [flag, "", "image.sif", "true"])
    with pytest.raises(UsageError, match=message):
        actions.options(values)

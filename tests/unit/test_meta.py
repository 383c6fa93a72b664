"""Generated /.singularity.d content behaves as Apptainer's does."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from capsid.image import meta, sandbox


def _sh(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(["/bin/sh", "-c", script, "sh", *args], capture_output=True,
                          text=True, check=True, env=env).stdout


def test_labels_json_is_tab_indented_and_sorted() -> None:
    raw = meta.labels_json({"b": "2", "a": "1"})
    assert raw == b'{\n\t"a": "1",\n\t"b": "2"\n}'


@pytest.mark.parametrize(("args", "expected"), [
    ((), "/entry --default\n"),
    (("x y", "z"), "/entry x y z\n"),
])
def test_oci_runscript_args_replace_cmd(tmp_path: Path, args: tuple[str, ...],
                                        expected: str) -> None:
    script = meta.oci_runscript(["echo", "/entry"], ["--default"])
    path = tmp_path / "runscript"
    path.write_text(script)
    out = subprocess.run(["/bin/sh", str(path), *args], capture_output=True, text=True,
                         check=True).stdout
    assert out == expected


def test_oci_runscript_keeps_arguments_with_quotes(tmp_path: Path) -> None:
    path = tmp_path / "runscript"
    path.write_text(meta.oci_runscript(["printf", "%s|"], ["it's", "$HOME"]))
    out = subprocess.run(["/bin/sh", str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert out == "it's|$HOME|"


def test_docker_env_keeps_user_values_but_sets_path() -> None:
    script = meta.docker_env_script(["PATH=/opt/bin:/usr/bin", "LANG=C.UTF-8", 'Q=a"b$c',
                                     "bad-key=1"])
    out = _sh(script + 'echo "$PATH|$LANG|$Q"', env={"LANG": "fr_FR", "PATH": "/bin"})
    assert out == '/opt/bin:/usr/bin|fr_FR|a"b$c\n'
    assert "bad-key" not in script


def test_metadata_from_tree_skips_base_env_scripts() -> None:
    files: dict[str, bytes | str] = {
        "labels.json": b'{"a": "1"}', "runscript": b"#!/bin/sh\n", "Singularity": b"From: x\n",
        "env/01-base.sh": b"", "env/90-environment.sh": b"export A=1\n",
        "env/99-base.sh": b"",
    }
    info = meta.Metadata.from_tree(files)
    assert info.labels == {"a": "1"} and info.deffile == "From: x\n"
    assert list(info.environment) == ["/.singularity.d/env/90-environment.sh"]
    again = meta.Metadata.from_inspect_json(info.inspect_json())
    assert again.labels == info.labels and again.runscript == info.runscript
    assert json.loads(info.inspect_json())["type"] == "container"


def test_skeleton_has_apptainer_layout() -> None:
    tree = meta.skeleton()
    for name in ("exec", "run", "shell", "start", "test"):
        assert tree[f".singularity.d/actions/{name}"][0] == 0o755
    assert tree["singularity"] == (0o777, ".singularity.d/runscript")
    assert tree[".singularity.d/libs"] == (0o755, None)
    assert tree["tmp"][0] == 0o1777


def test_elf_arch() -> None:
    head = b"\x7fELF\x02\x01\x01" + b"\0" * 11 + (62).to_bytes(2, "little")
    assert sandbox.elf_arch(head) == "amd64"
    head = b"\x7fELF\x02\x01\x01" + b"\0" * 11 + (183).to_bytes(2, "little")
    assert sandbox.elf_arch(head) == "arm64"
    assert sandbox.elf_arch(b"#!/bin/sh\n" + b"\0" * 20) is None

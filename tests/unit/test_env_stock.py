"""Starting without a shell: the effect of capsid's own environment scripts, worked out here."""

from __future__ import annotations

import pytest

from capsid.image import meta
from capsid.image.stock import ENV_SCRIPTS
from capsid.runtime import env

STOCK = {name: text.encode() for name, text in ENV_SCRIPTS.items() if text is not None}


def test_stock_scripts_give_apptainers_values() -> None:
    host = {"FOO": "host", "LD_LIBRARY_PATH": "/host/lib", "PS1": "host> ", "LANG": "en_GB"}
    result = env.finished_env(env.EnvOptions(home="/home/me", env=("A=1",)), STOCK, host)
    assert result is not None
    assert result["PATH"] == env.DEFAULT_PATH and result["HOME"] == "/home/me"
    assert result["LD_LIBRARY_PATH"] == "/.singularity.d/libs"   # the host's is blocked
    assert result["PS1"] == "Apptainer> "
    assert result["FOO"] == "host" and result["LANG"] == "en_GB" and result["A"] == "1"
    assert not any(k.startswith(("CAPSID_", "SING_USER_DEFINED_")) for k in result)


def test_path_changes_from_the_command_line() -> None:
    opts = env.EnvOptions(env=("PREPEND_PATH=/pre", "APPEND_PATH=/post"))
    result = env.finished_env(opts, STOCK, {})
    assert result is not None and result["PATH"] == f"/pre:{env.DEFAULT_PATH}:/post"
    replaced = env.finished_env(env.EnvOptions(env=("PATH=/only",)), STOCK, {})
    assert replaced is not None and replaced["PATH"] == "/only"


def test_docker_env_script_values_and_precedence() -> None:
    scripts = dict(STOCK)
    scripts["10-docker2singularity.sh"] = meta.docker_env_script(
        ["PATH=/app/bin:/usr/bin", "LANG=C.UTF-8", 'ODD=a"b$c`d\\e', "EMPTY="]).encode()
    host = {"LANG": "en_GB", "KEEP": "host"}
    result = env.finished_env(env.EnvOptions(env=("EMPTY=forced",)), scripts, host)
    assert result is not None
    assert result["PATH"] == "/app/bin:/usr/bin"
    assert result["LANG"] == "C.UTF-8"          # the image's value wins over the host's
    assert result["ODD"] == 'a"b$c`d\\e'
    assert result["EMPTY"] == "forced"          # --env wins over the image
    assert result["KEEP"] == "host"


@pytest.mark.parametrize("name, content", [
    ("90-environment.sh", b"#!/bin/sh\nexport FOO=bar\n"),          # an image's %environment
    ("50-site.sh", b"#!/bin/sh\n"),                                   # a script of its own
    ("99-base.sh", b"#!/bin/sh\n# Apptainer's wording\nexport PS1\n"),  # another tool's
    ("10-docker2singularity.sh", b'#!/bin/sh\nexport A="$(id -u)"\n'),  # an expansion
    ("10-docker2singularity.sh", b'#!/bin/sh\nexport A="x"; rm -rf /\n'),
])
def test_anything_else_needs_the_shell(name: str, content: bytes) -> None:
    scripts = dict(STOCK)
    scripts[name] = content
    assert env.finished_env(env.EnvOptions(), scripts, {}) is None


def test_an_app_to_set_up_needs_the_shell() -> None:
    scripts = dict(STOCK)
    scripts["10-docker2singularity.sh"] = meta.docker_env_script(
        ["SINGULARITY_APPNAME=tool"]).encode()
    assert env.finished_env(env.EnvOptions(), scripts, {}) is None


def test_unquote() -> None:
    assert env._unquote('"plain"') == "plain"
    assert env._unquote('"a\\"b\\$c\\`d\\\\e"') == 'a"b$c`d\\e'
    for bad in ('"$HOME"', '"`id`"', '"a\\nb"', "'single'", '"open', '"a"b"'):
        assert env._unquote(bad) is None, bad

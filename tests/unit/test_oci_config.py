"""Mirrors from registries.conf, credentials in Docker's config.json format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capsid.errors import CapsidError
from capsid.oci import auth
from capsid.oci.reference import parse
from capsid.oci.registries import Registries

CONF = """
[[registry]]
prefix = "docker.io"
[[registry.mirror]]
location = "mirror-a.example:5000/hub"
[[registry.mirror]]
location = "mirror-b.example"
insecure = true

[[registry]]
prefix = "ghcr.io/org"
location = "ghcr-cache.example/org"
blocked = false
"""


def test_mirrors_are_tried_in_order_before_the_registry() -> None:
    eps = Registries.parse(CONF).endpoints(parse("python:3.12"))
    assert [str(e.ref) for e in eps] == ["mirror-a.example:5000/hub/library/python:3.12",
                                         "mirror-b.example/library/python:3.12",
                                         "docker.io/library/python:3.12"]
    assert [e.insecure for e in eps] == [False, True, False]
    assert [e.mirror for e in eps] == [True, True, False]


def test_a_prefix_can_relocate_part_of_a_registry() -> None:
    eps = Registries.parse(CONF).endpoints(parse("ghcr.io/org/tool:1"))
    assert [str(e.ref) for e in eps] == ["ghcr-cache.example/org/tool:1"]
    assert [str(e.ref) for e in Registries.parse(CONF).endpoints(parse("quay.io/x/y"))] == \
        ["quay.io/x/y:latest"]


def test_nohttps_applies_to_every_endpoint() -> None:
    assert all(e.insecure for e in Registries.parse(CONF).endpoints(parse("python"), True))


def test_bad_registries_conf_is_a_clear_error() -> None:
    with pytest.raises(CapsidError, match="not valid TOML"):
        Registries.parse("[[registry]\nprefix=", "bad.conf")
    with pytest.raises(CapsidError, match="neither prefix nor location"):
        Registries.parse("[[registry]]\ninsecure = true\n", "bad.conf")


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("CAPSID_DOCKER_USERNAME", "CAPSID_DOCKER_PASSWORD", "APPTAINER_DOCKER_USERNAME",
                 "APPTAINER_DOCKER_PASSWORD", "SINGULARITY_DOCKER_USERNAME",
                 "SINGULARITY_DOCKER_PASSWORD", "REGISTRY_AUTH_FILE", "CAPSID_AUTH_FILE",
                 "APPTAINER_AUTH_FILE", "DOCKER_CONFIG", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_login_store_is_docker_compatible_and_private(isolated: Path) -> None:
    path = auth.store("registry.example:5000", "ana", "p:ss")
    assert path == isolated / ".config" / "capsid" / "auth.json"
    assert path.stat().st_mode & 0o777 == 0o600
    data = json.loads(path.read_text())
    assert data["auths"]["registry.example:5000"]["auth"] == "YW5hOnA6c3M="
    assert auth.credentials("registry.example:5000") == ("ana", "p:ss")
    assert auth.remove("registry.example:5000") and auth.credentials("registry.example:5000") \
        is None


def test_docker_and_podman_files_and_environment_are_read(isolated: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    docker = isolated / ".docker" / "config.json"
    docker.parent.mkdir()
    docker.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": "ZDpo"}}}))
    assert auth.credentials("docker.io") == ("d", "h")
    podman = isolated / "auth.json"
    podman.write_text(json.dumps({"auths": {"docker.io": {"auth": "cDpt"}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(podman))
    assert auth.credentials("docker.io") == ("p", "m")
    monkeypatch.setenv("APPTAINER_DOCKER_USERNAME", "env")
    monkeypatch.setenv("APPTAINER_DOCKER_PASSWORD", "pw")
    assert auth.credentials("docker.io") == ("env", "pw")

"""Image references resolve as Docker resolves them."""

from __future__ import annotations

import pytest

from capsid.errors import UsageError
from capsid.oci.reference import parse

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest"), [
    ("python", "docker.io", "library/python", "latest", None),
    ("docker://python:3.12", "docker.io", "library/python", "3.12", None),
    ("user/app", "docker.io", "user/app", "latest", None),
    ("index.docker.io/library/busybox:1", "docker.io", "library/busybox", "1", None),
    ("ghcr.io/org/team/app:v1.2", "ghcr.io", "org/team/app", "v1.2", None),
    ("localhost/app", "localhost", "app", "latest", None),
    ("127.0.0.1:5000/ns/app:1", "127.0.0.1:5000", "ns/app", "1", None),
    ("registry:5000/app", "registry:5000", "app", "latest", None),
    (f"busybox@{DIGEST}", "docker.io", "library/busybox", None, DIGEST),
    (f"nvcr.io/nvidia/pytorch:24.01-py3@{DIGEST}", "nvcr.io", "nvidia/pytorch", "24.01-py3",
     DIGEST),
])
def test_references_normalise_like_docker(text: str, registry: str, repository: str,
                                          tag: str | None, digest: str | None) -> None:
    ref = parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag,
                                                                   digest)


@pytest.mark.parametrize("text", ["", "Python", "docker.io/User/app", "app:bad tag",
                                  "app@sha256:123", "app@md5:zz", "a//b", "-app"])
def test_bad_references_are_one_line_usage_errors(text: str) -> None:
    with pytest.raises(UsageError) as e:
        parse(text)
    assert "invalid image reference" in e.value.message
    assert "\n" not in str(e.value)


def test_default_pull_names_follow_apptainer() -> None:
    assert parse("python:3.12").sif_name() == "python_3.12.sif"
    assert parse("ghcr.io/org/app").sif_name() == "app_latest.sif"
    assert parse(f"busybox@{DIGEST}").sif_name() == f"busybox_{'ab' * 32}.sif"


def test_mirror_location_keeps_the_repository_below_its_namespace() -> None:
    ref = parse("python:3.12").with_registry("mirror.example:5000/hub")
    assert str(ref) == "mirror.example:5000/hub/library/python:3.12"

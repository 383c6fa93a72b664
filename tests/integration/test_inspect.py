"""inspect reads Apptainer-built images, without mounting them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import run_capsid


def test_inspect_apptainer_image_deffile_labels_runscript(shared_sifs: Path) -> None:
    image = shared_sifs / "apptainer-busybox_amd64.sif"
    assert run_capsid("inspect", "--deffile", image, check=True).stdout == \
        "BootStrap: docker\nFrom: busybox:1.33.1\n"
    labels = run_capsid("inspect", image, check=True).stdout.splitlines()
    assert "org.label-schema.build-arch: amd64" in labels
    assert "org.label-schema.usage.singularity.deffile.from: busybox:1.33.1" in labels
    runscript = run_capsid("inspect", "--runscript", image, check=True).stdout
    assert runscript.startswith("#!/bin/sh\nOCI_ENTRYPOINT=''\nOCI_CMD='\"sh\"'\n")
    env = run_capsid("inspect", "--environment", image, check=True).stdout
    assert env.startswith("=== /.singularity.d/env/10-docker2singularity.sh ===\n#!/bin/sh\n")


def test_inspect_json_has_apptainer_shape(shared_sifs: Path) -> None:
    image = shared_sifs / "apptainer-busybox_amd64.sif"
    doc = json.loads(run_capsid("inspect", "--json", "--labels", "--deffile", image,
                                check=True).stdout)
    assert doc["type"] == "container"
    attrs = doc["data"]["attributes"]
    assert set(attrs) == {"labels", "deffile"}
    assert attrs["labels"]["org.label-schema.build-arch"] == "amd64"


def test_inspect_without_inspect_metadata_reads_the_squashfs(shared_sifs: Path,
                                                             tmp_path: Path) -> None:
    """A bare squashfs has no SIF objects: the metadata comes from /.singularity.d inside."""
    from capsid.image import sif

    with sif.SifImage(shared_sifs / "apptainer-busybox_amd64.sif") as f:
        part = f.primary_partition()
        assert part is not None
        bare = tmp_path / "busybox.sqsh"
        with open(bare, "wb") as out:
            f.copy_to(part, out)
    assert run_capsid("inspect", "--deffile", bare, check=True).stdout == \
        "BootStrap: docker\nFrom: busybox:1.33.1\n"
    assert "org.label-schema.build-arch: amd64" in run_capsid("inspect", bare).stdout
    assert shutil.which("unsquashfs")


def test_not_an_image(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sif"
    junk.write_text("not an image at all")
    result = run_capsid("inspect", junk)
    assert result.returncode == 255
    assert result.stderr == (f"capsid: error: {junk} is not a container image; give a .sif "
                             "file, a squashfs file or a sandbox directory\n")


def test_truncated_sif(shared_sifs: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.sif"
    cut.write_bytes((shared_sifs / "apptainer-busybox_amd64.sif").read_bytes()[:100_000])
    result = run_capsid("sif", "list", cut)
    assert result.returncode == 255
    assert "is not a valid SIF image: object 4 lies beyond the end of the file" in result.stderr
    assert "Traceback" not in result.stderr

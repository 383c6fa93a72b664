"""Slurm jobs across two simulated nodes (scripts/slurm-cluster.sh): sbatch with
``srun --mpi=pmix capsid exec`` and with ``mpirun capsid exec``.

node1 and node2 are network, UTS and mount namespaces of this machine, each with its
own slurmd; they share the file system (but for Slurm's spool directory) with the host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CAPSID, barrier

pytestmark = [pytest.mark.unprivileged, pytest.mark.e2e]

CACHE = Path(os.environ.get("CAPSID_TEST_CACHE", "/var/cache/capsid-test"))
#: the test cluster's own configuration (scripts/slurm-cluster.sh), not the machine's
CONF = os.environ.get("SLURM_CONF", "/var/lib/capsid-slurm/etc/slurm.conf")
TROUBLE = ("WARNING", "ORTE_ERROR_LOG", "PMIX ERROR", "different user namespaces",
           "help message")


@pytest.fixture(scope="module")
def cluster() -> None:
    if shutil.which("sinfo") is None or not (CACHE / "mpi.sif").is_file():
        pytest.skip("needs Slurm and the MPI image: scripts/slurm-cluster.sh start and "
                    "scripts/mpi-image.sh, as root (test.sh runs them)")
    states = subprocess.run(["sinfo", "-h", "-o", "%n %t"], capture_output=True, text=True,
                            check=False, timeout=30, env=dict(os.environ, SLURM_CONF=CONF))
    if states.returncode != 0 or sorted(states.stdout.split()) != [
            "idle", "idle", "node1", "node2"]:
        pytest.skip(f"the test cluster is not up ({states.stdout.strip() or states.stderr})")


@pytest.fixture
def jobs(tmp_path: Path) -> Path:
    return tmp_path


def sbatch(folder: Path, script: str, *flags: str) -> str:
    """Run *script* as a batch job and return its output (stdout and stderr)."""
    path = folder / "job.sh"
    path.write_text("#!/bin/bash\nC=" + str(CACHE) + "\n" + script)
    out = folder / "job.out"
    env = dict(os.environ, PATH=f"{CAPSID.parent}:/usr/local/bin:/usr/bin:/bin",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", SLURM_CONF=CONF)
    result = subprocess.run(["sbatch", "--wait", "-o", str(out), *flags, str(path)],
                            capture_output=True, text=True, env=env, cwd=folder, timeout=300,
                            check=False)
    output = out.read_text() if out.exists() else ""
    assert result.returncode == 0, result.stderr + output
    return output


def _clean(output: str) -> None:
    for word in TROUBLE:
        assert word not in output, output


def test_srun_pmix_across_two_nodes(cluster: None, jobs: Path) -> None:
    output = sbatch(jobs, """
srun --mpi=pmix capsid exec $C/mpi.sif sh -c '{probe}'
srun --mpi=pmix capsid exec $C/mpi.sif mpitest hello
OMPI_MCA_btl_vader_single_copy_mechanism=cma \\
    srun --mpi=pmix -N 1 -n 2 capsid exec $C/mpi.sif mpitest pingpong 1048576 20
srun --mpi=pmix capsid exec $C/mpi.sif mpitest exit 2 6; echo "srun exit $?"
""".format(probe=barrier(4, "echo ns $(hostname) $(readlink /proc/self/ns/mnt)")),
                    "-N", "2", "-n", "4")
    lines = output.splitlines()
    spaces = [line.split()[1:] for line in lines if line.startswith("ns ")]
    assert sorted(host for host, _ in spaces) == ["node1", "node1", "node1", "node2"]
    # one container per node: the ranks of a node share its mount namespace
    by_node = {host: {ns for h, ns in spaces if h == host} for host, _ in spaces}
    assert all(len(found) == 1 for found in by_node.values()), spaces
    assert by_node["node1"] != by_node["node2"]
    assert sorted(line for line in lines if line.startswith("rank")) == [
        "rank 0 of 4 on node1", "rank 1 of 4 on node1", "rank 2 of 4 on node1",
        "rank 3 of 4 on node2"]
    assert any(line.startswith("pingpong 1048576 ") for line in lines)
    assert "srun exit 6" in lines
    _clean(output.replace("srun: error: node1: task 2: Exited with exit code 6", ""))


def test_mpirun_across_two_nodes(cluster: None, jobs: Path) -> None:
    output = sbatch(jobs, """
mpirun capsid exec $C/mpi.sif mpitest hello
mpirun capsid exec $C/mpi.sif mpitest exit 3 5 >/dev/null 2>&1; echo "mpirun exit $?"
""", "-N", "2", "-n", "4")
    lines = output.splitlines()
    assert sorted(line for line in lines if line.startswith("rank")) == [
        "rank 0 of 4 on node1", "rank 1 of 4 on node1", "rank 2 of 4 on node1",
        "rank 3 of 4 on node2"]
    assert "mpirun exit 5" in lines
    _clean(output)


def test_one_node(cluster: None, jobs: Path) -> None:
    output = sbatch(jobs, """
srun --mpi=pmix capsid exec $C/mpi.sif mpitest hello
mpirun --mca btl_vader_single_copy_mechanism cma capsid exec $C/mpi.sif \\
    mpitest pingpong 1048576 20
""", "-N", "1", "-n", "2")
    lines = output.splitlines()
    assert sorted(line for line in lines if line.startswith("rank")) == [
        "rank 0 of 2 on node1", "rank 1 of 2 on node1"]
    assert any(line.startswith("pingpong 1048576 ") for line in lines)
    _clean(output)

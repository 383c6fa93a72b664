"""How many ranks share a node, from what the launchers put in the environment."""

from __future__ import annotations

import pytest

from capsid.config import SiteConfig
from capsid.runtime import unsquashed

LAUNCHERS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PALS_LOCAL_SIZE",
             "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NODEID")


@pytest.mark.parametrize(("env", "ranks"), [
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "16"}, 16),
    ({"MPI_LOCALNRANKS": "8"}, 8),
    ({"SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "0"}, 2),
    ({"SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}, 1),
    ({"SLURM_STEP_TASKS_PER_NODE": "64", "SLURM_TASKS_PER_NODE": "2", "SLURM_NODEID": "0"}, 64),
    ({"SLURM_TASKS_PER_NODE": "2(x3)", "SLURM_NODEID": "5"}, None),
    ({"SLURM_TASKS_PER_NODE": "garbage", "SLURM_NODEID": "0"}, None),
    ({}, None),
])
def test_local_ranks(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                     ranks: int | None) -> None:
    for name in LAUNCHERS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert unsquashed.local_ranks() == ranks


@pytest.mark.parametrize(("setting", "ranks", "expected"), [
    ("32", "64", True), ("32", "31", False), ("", "64", False), ("no", "64", False),
    ("0", "64", False)])
def test_by_default(monkeypatch: pytest.MonkeyPatch, setting: str, ranks: str,
                    expected: bool) -> None:
    for name in LAUNCHERS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", ranks)
    site = SiteConfig(values={"unsquash ranks": setting} if setting else {})
    assert unsquashed.by_default(site) is expected


def test_job_names_are_safe_in_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "FLUX_JOB_ID", "JOB_ID",
                 "PMIX_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    assert unsquashed.job() is None
    monkeypatch.setenv("PBS_JOBID", "12.server/../x")
    assert unsquashed.job() == "12.server_.._x"

"""The runtime and the builder driven from Python, without the CLI.

``api.exec_container`` is the one way into a container: it resolves ``instance://``,
shares a node's container between ranks, and starts any other; the CLI only parses
flags and calls it. Each test runs a small Python program as a child (the container
replaces the process that calls ``exec_container``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import CAPSID, barrier

PYTHON = str(CAPSID.parent / "python")


def _python(code: str, *args: str, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, check=False, cwd=cwd, env=env)


EXEC = """import sys
from capsid.runtime import api
from capsid.runtime.options import Options
api.exec_container(sys.argv[1], sys.argv[3:], Options(**eval(sys.argv[2])))
"""


def test_exec_container_replaces_the_caller(debian_sif: Path) -> None:
    result = _python(EXEC, str(debian_sif), "{'cleanenv': True, 'env': ['A=1']}", "sh", "-c",
                     'echo "$A $APPTAINER_NAME $$"; exit 7')
    assert result.returncode == 7, result.stderr
    value, name, _ = result.stdout.split()
    assert (value, name) == ("1", debian_sif.name)


def test_exec_container_reports_bad_input_as_an_error(debian_sif: Path, tmp_path: Path) -> None:
    code = ("import sys\nfrom capsid.errors import CapsidError\n"
            "from capsid.runtime import api\nfrom capsid.runtime.options import Options\n"
            "try:\n    api.exec_container(sys.argv[1], ['true'], Options(writable=True))\n"
            "except CapsidError as err:\n    print(err.message); sys.exit(3)\n")
    result = _python(code, str(debian_sif))
    assert result.returncode == 3, result.stderr
    assert "--writable needs a sandbox directory" in result.stdout


def test_run_returns_the_status_and_options_are_frozen(debian_sif: Path) -> None:
    code = ("import sys\nfrom capsid.runtime import api\nfrom capsid.runtime.options import "
            "Options\nopts = Options(cleanenv=True)\n"
            "try:\n    opts.pid = True\nexcept AttributeError:\n    pass\n"
            "else:\n    sys.exit('Options can be changed')\n"
            "print(api.run(sys.argv[1], ['sh', '-c', 'exit 5'], opts.replace(pid=True)))\n")
    result = _python(code, str(debian_sif))
    assert (result.returncode, result.stdout) == (0, "5\n"), result.stderr


def test_exec_container_joins_an_instance(debian_sif: Path, tmp_path: Path) -> None:
    name = f"api{os.getpid()}"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    os.chmod(tmp_path, 0o700)
    start = ("import sys\nfrom capsid.runtime import instances\n"
             "from capsid.runtime.options import Options\n"
             "print(instances.start(sys.argv[1], sys.argv[2], [], Options(pid=True)).pid)\n")
    started = _python(start, str(debian_sif), name, env=env)
    assert started.returncode == 0, started.stderr
    try:
        joined = _python(EXEC, f"instance://{name}", "{}", "sh", "-c",
                         "echo $$; echo $APPTAINER_NAME", env=env)
        assert joined.returncode == 0, joined.stderr
        pid, image = joined.stdout.split()
        # its own PID namespace, where the instance's first process is 1
        assert int(pid) > 1 and image == debian_sif.name
    finally:
        stop = ("import sys\nfrom capsid.runtime import instances\n"
                "instances.stop(instances.find(sys.argv[1]))\n")
        stopped = _python(stop, name, env=env)
        assert stopped.returncode == 0, stopped.stderr
    gone = _python(EXEC, f"instance://{name}", "{}", "true", env=env)
    assert gone.returncode != 0 and f"no instance named '{name}' is running" in gone.stderr


def test_exec_container_shares_between_ranks(debian_sif: Path, tmp_path: Path) -> None:
    """Two callers asking for sharing (as a launcher's ranks are) run in one container:
    the same mount namespace while both are alive."""
    run = tempfile.mkdtemp(prefix="capsid-")  # short: the keeper's socket name has a limit
    env = {**os.environ, "XDG_RUNTIME_DIR": run, "PMIX_NAMESPACE": f"api-test-{os.getpid()}"}
    (tmp_path / "work").mkdir()
    probe = barrier(2)
    ranks = [subprocess.Popen([PYTHON, "-c", EXEC, str(debian_sif), "{}", "sh", "-c", probe],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path / "work", env=env) for _ in range(2)]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert len({out.strip() for out, _ in outputs}) == 1, outputs
    alone = {**env, "PMIX_NAMESPACE": f"api-test-alone-{os.getpid()}"}
    apart = [subprocess.Popen([PYTHON, "-c", EXEC, str(debian_sif), "{'sharens': False}", "sh",
                               "-c", barrier(2)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=alone)
             for _ in range(2)]
    outputs = [rank.communicate(timeout=120) for rank in apart]
    assert [rank.returncode for rank in apart] == [0, 0], outputs
    assert len({out.strip() for out, _ in outputs}) == 2, outputs
    shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run with pytest")

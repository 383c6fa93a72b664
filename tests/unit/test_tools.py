"""The external-tool runner: failures become one-line errors, and no tool outlives its use."""

from __future__ import annotations

import time

import pytest

from capsid import tools
from capsid.errors import ToolError


def test_reading_a_tool_that_fills_its_stderr_first() -> None:
    """#10.12: push read sqfs2tar's stdout to the end before its stderr: a tool writing
    more than a pipe's worth of warnings first deadlocked."""
    script = "head -c 300000 /dev/zero | tr '\\0' w >&2; echo out"
    with tools.reading(["sh", "-c", script]) as out:
        assert out.read() == b"out\n"


def test_a_failing_tool_is_one_error_with_its_last_line() -> None:
    with pytest.raises(ToolError, match=r"sh failed with exit status 3: the reason"), \
            tools.reading(["sh", "-c", "echo noise >&2; echo the reason >&2; exit 3"]) as out:
        out.read()


def test_an_error_in_the_reader_kills_the_tool() -> None:
    start = time.monotonic()
    with pytest.raises(KeyError), tools.reading(["sleep", "60"]):
        raise KeyError("the consumer broke")
    assert time.monotonic() - start < 10


def test_a_missing_tool_is_one_error() -> None:
    with pytest.raises(ToolError, match="capsid-no-such-tool is not installed"), \
            tools.reading(["capsid-no-such-tool"]):
        pass


def test_ctrl_c_while_a_tool_starts_kills_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupt that lands inside Popen (after the fork) used to leave the child
    running, out of every caller's reach: tar2sqfs then wrote its output after capsid had
    removed it. The interrupt is now held until the child is killed."""
    import os
    import signal
    import subprocess

    started: list[subprocess.Popen[bytes]] = []
    real = subprocess.Popen

    def interrupted(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        proc = real(*args, **kwargs)  # type: ignore[call-overload]
        started.append(proc)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, right after the fork
        return proc

    monkeypatch.setattr(subprocess, "Popen", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tools.start(["sleep", "60"])
    assert started and started[0].poll() is not None  # killed, and reaped
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

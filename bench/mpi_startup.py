"""MPI jobs, side by side: the host's mpirun alone, with capsid (shared and per-rank
containers) and with ch-run, on the MPI test image of scripts/mpi-image.sh.

Run as an ordinary user (as root it re-runs itself as CAPSID_TEST_USER, default capsid-test):

    .venv/bin/python bench/mpi_startup.py [--runs 7] [--ranks 16]

Prints the median wall time of ``mpirun -n 16 ... /bin/true`` and of MPI_Init + hello,
the 1 MiB ping-pong bandwidth of two ranks on one node (CMA forced where it works),
the most squashfuse_ll processes alive at once, and the ratios to the host.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

CAPSID = Path(sys.executable).parent / "capsid"
CACHE = Path(os.environ.get("CAPSID_TEST_CACHE", "/var/cache/capsid-test"))
TARGETS = {"/bin/true": 2.0, "MPI_Init + hello": 1.2}
BANDWIDTH_TARGET = 0.9
CMA = ("--mca", "btl_vader_single_copy_mechanism", "cma")


def mpirun(ranks: int, command: list[str], mca: tuple[str, ...] = ()) -> tuple[float, str]:
    """Seconds for one ``mpirun``, and its output; it must succeed."""
    argv = ["mpirun", "--oversubscribe", "-n", str(ranks), *mca, *command]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed: {proc.stderr[-2000:]}")
    return elapsed, proc.stdout + proc.stderr


def servers(image: Path) -> int:
    """squashfuse_ll processes serving *image* alive now (zombies are not counted)."""
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and cmdline.startswith(b"/usr/bin/squashfuse_ll") and \
                str(image).encode() in cmdline:
            count += 1
    return count


def peak_servers(ranks: int, command: list[str], image: Path) -> int:
    """The most image servers alive at once during one job."""
    peak, done = 0, threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, servers(image))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        mpirun(ranks, command)
    finally:
        done.set()
        watcher.join()
    return peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--ranks", type=int, default=16)
    args = parser.parse_args()
    if os.geteuid() == 0:
        user = os.environ.get("CAPSID_TEST_USER", "capsid-test")
        os.execvp("runuser", ["runuser", "-u", user, "--", "env", f"CAPSID_TEST_CACHE={CACHE}",
                              f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}",
                              sys.executable, __file__, "--runs", str(args.runs),
                              "--ranks", str(args.ranks)])
    sif, sandbox, host_test = CACHE / "mpi.sif", CACHE / "mpi", CACHE / "mpitest"
    if shutil.which("mpirun") is None or not sif.is_file() or not host_test.is_file():
        print("bench: needs mpirun and the MPI image: run scripts/setup.sh, then "
              "scripts/mpi-image.sh as root", file=sys.stderr)
        return 2
    os.chdir("/tmp")
    runners: dict[str, list[str]] = {
        "host": [],
        "capsid exec (shared)": [str(CAPSID), "exec", str(sif)],
        "capsid exec --no-sharens": [str(CAPSID), "exec", "--no-sharens", str(sif)],
    }
    if shutil.which("ch-run") and sandbox.is_dir():
        runners["ch-run (directory)"] = ["ch-run", str(sandbox), "--"]
    commands = {"/bin/true": ["/bin/true"], "MPI_Init + hello": ["mpitest", "hello"]}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.runs):  # interleaved, so that a drifting machine is fair to all
        for label, command in commands.items():
            for runner, prefix in runners.items():
                program = command if runner != "host" or label == "/bin/true" else \
                    [str(host_test), *command[1:]]
                elapsed, _ = mpirun(args.ranks, [*prefix, *program])
                times.setdefault((label, runner), []).append(elapsed)
    print(f"{args.ranks} ranks on one node, median of {args.runs} runs (seconds)")
    print(f"{'command':<18} {'runner':<26} {'median':>8} {'x host':>8}")
    verdicts = []
    for label in commands:
        host = statistics.median(times[(label, "host")])
        for runner in runners:
            median = statistics.median(times[(label, runner)])
            print(f"{label:<18} {runner:<26} {median:>8.3f} {median / host:>8.2f}")
        ratio = statistics.median(times[(label, "capsid exec (shared)")]) / host
        verdicts.append((f"{label}: capsid {ratio:.2f}x the host", ratio <= TARGETS[label],
                         f"<= {TARGETS[label]}x"))
    bandwidth: dict[str, list[float]] = {}
    for _ in range(args.runs):
        for runner, prefix in (("host", [str(host_test)]),
                               ("capsid exec (shared)", [*runners["capsid exec (shared)"],
                                                         "mpitest"]),
                               ("capsid exec --no-sharens",
                                [*runners["capsid exec --no-sharens"], "mpitest"])):
            forced = CMA if runner != "capsid exec --no-sharens" else ()
            _, out = mpirun(2, [*prefix, "pingpong", "1048576", "200"], forced)
            rate = float(out.split("pingpong 1048576 ", 1)[1].split()[0])
            bandwidth.setdefault(runner, []).append(rate)
    print("\n1 MiB ping-pong between two ranks (MB/s, median; CMA forced but for "
          "--no-sharens, where Open MPI refuses it)")
    for runner, rates in bandwidth.items():
        print(f"  {runner:<26} {statistics.median(rates):>8.0f}")
    ratio = statistics.median(bandwidth["capsid exec (shared)"]) / \
        statistics.median(bandwidth["host"])
    verdicts.append((f"bandwidth: capsid {ratio:.2f}x the host", ratio >= BANDWIDTH_TARGET,
                     f">= {BANDWIDTH_TARGET}x"))
    sleeper = ["sh", "-c", "sleep 1"]
    shared = peak_servers(args.ranks, [*runners["capsid exec (shared)"], *sleeper], sif)
    alone = peak_servers(args.ranks, [*runners["capsid exec --no-sharens"], *sleeper], sif)
    print(f"\nsquashfuse_ll alive at once, {args.ranks} ranks: shared {shared}, "
          f"--no-sharens {alone}")
    verdicts.append((f"image servers at peak: {shared}", shared == 1, "1 per node"))
    print()
    for text, ok, target in verdicts:
        print(f"{'meets' if ok else 'MISSES'} {target}: {text}")
    return 0 if all(ok for _, ok, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())

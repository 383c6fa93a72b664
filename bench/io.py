"""Reading an image's files, side by side: N readers of distinct files and a Python
import heavy on metadata, over a SIF (Debian's squashfuse and a multithreaded one), a
sandbox, ``--unsquash`` (alone, and in a job where the tree is made once per node), the
host directory and, as root, the kernel's squashfs.

    .venv/bin/python bench/io.py [--repeat 3] [--files 6000]

Uses the Debian+python3 test image (scripts/debian-image.sh) and, where present, the
multithreaded squashfuse_ll of scripts/squashfuse-mt.sh. Each container case starts a
fresh container with a server of its own (``CAPSID_IMAGE_LINGER=0``: no image keeper, so
the FUSE caches are cold; the SIF itself is in the page cache) and times only the reading,
inside it; "start" is the whole of ``capsid exec IMAGE true``, an image's first start.
Run as root it measures the kernel's squashfs and then the rest as CAPSID_TEST_USER
(default capsid-test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CAPSID = Path(sys.executable).parent / "capsid"
CACHE = Path(os.environ.get("CAPSID_TEST_CACHE", "/var/cache/capsid-test"))
IMAGE_DIR, IMAGE_SIF = CACHE / "debian-python3", CACHE / "debian-python3.sif"
THREADED = CACHE / "squashfuse-mt" / "squashfuse_ll"
IMPORTS = ("asyncio, email.mime.multipart, http.server, xml.dom.minidom, unittest, decimal, "
           "logging.handlers, argparse, json, sqlite3, csv, tarfile, zipfile")
#: the readers' script: $1 is the tree's root, the rest are lists of files (NUL-separated)
READERS = ('root=$1; shift; start=$(date +%s%N); for list in "$@"; do '
           '(cd "$root" && xargs -0 -a "$list" cat >/dev/null) & done; wait; '
           'echo $(( $(date +%s%N) - start ))')
IMPORTER = (f"import time; t = time.perf_counter(); import {IMPORTS}; "
            "print(int((time.perf_counter() - t) * 1e9))")


def file_lists(tmp: Path, readers: int, count: int) -> list[Path]:
    """*readers* lists of distinct regular files under usr/ (paths relative to the root),
    dealt round-robin from the image's first *count* files in sorted order."""
    files = []
    for directory, dirs, names in os.walk(IMAGE_DIR / "usr"):
        dirs.sort()
        for name in sorted(names):
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                files.append(str(path.relative_to(IMAGE_DIR)))
    files = files[:count]
    lists = []
    for index in range(readers):
        path = tmp / f"list{readers}-{index}"
        path.write_bytes(b"\0".join(f.encode() for f in files[index::readers]) + b"\0")
        lists.append(path)
    return lists


def seconds(argv: list[str], env: dict[str, str] | None = None) -> float:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv[:6])}... failed: {proc.stderr.strip()}")
    return int(proc.stdout.strip().splitlines()[-1]) / 1e9


def wall(argv: list[str], env: dict[str, str]) -> float:
    """Seconds from starting *argv* to its end (a container's whole start)."""
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def cases(tmp: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Container cases: name → (capsid command up to the image, environment)."""
    env = {k: v for k, v in os.environ.items() if k != "CAPSID_SQUASHFUSE"}
    env["CAPSID_IMAGE_LINGER"] = "0"  # a kept server would carry its caches to the next case
    bind = ["-B", f"{tmp}:{tmp}"]
    found = {
        "SIF, squashfuse on PATH": ([str(CAPSID), "exec", *bind, str(IMAGE_SIF)], env),
        "SIF --unsquash": ([str(CAPSID), "exec", "--unsquash", *bind, str(IMAGE_SIF)], env),
        "sandbox directory": ([str(CAPSID), "exec", *bind, str(IMAGE_DIR)], env),
    }
    # in a job: unpacked once per node (by the warm-up run below), then bound by each
    job = {**env, "SLURM_JOB_ID": "bench-io", "TMPDIR": str(tmp)}
    found["SIF --unsquash in a job"] = (
        [str(CAPSID), "exec", "--unsquash", *bind, str(IMAGE_SIF)], job)
    seconds([*found["SIF --unsquash in a job"][0], "sh", "-c", "echo 0"], job)
    if os.access(THREADED, os.X_OK):
        found["SIF, squashfuse 0.5 (threads)"] = ([str(CAPSID), "exec", *bind, str(IMAGE_SIF)],
                                                  {**env, "CAPSID_SQUASHFUSE": str(THREADED)})
    return found


def measure(tmp: Path, counts: list[int], files: int, repeat: int,
            host_roots: dict[str, str]) -> dict[str, dict[str, float]]:
    """Median seconds per case: for each reader count, and for the import."""
    lists = {n: file_lists(tmp, n, files) for n in counts}
    # the page cache holds the image file and the directory's files before any case runs
    seconds(["sh", "-c", READERS, "-", str(IMAGE_DIR), str(lists[1][0])])
    subprocess.run(["cat", str(IMAGE_SIF)], stdout=subprocess.DEVNULL, check=True)
    results: dict[str, dict[str, float]] = {}
    for name, root in host_roots.items():  # no container: the files as the host reads them
        results[name] = {str(n): statistics.median(
            seconds(["sh", "-c", READERS, "-", root, *map(str, lists[n])])
            for _ in range(repeat)) for n in counts}
    for name, (prefix, env) in cases(tmp).items():
        row = {str(n): statistics.median(
            seconds([*prefix, "sh", "-c", READERS, "-", "/", *map(str, lists[n])], env)
            for _ in range(repeat)) for n in counts}
        row["import"] = statistics.median(
            seconds([*prefix, "python3", "-c", IMPORTER], env) for _ in range(repeat))
        row["start"] = statistics.median(wall([*prefix, "true"], env) for _ in range(repeat))
        results[name] = row
    return results


def server_versions() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from capsid import doctor, tools

    said = []
    for label, exe in (("PATH", tools.find("squashfuse_ll")), ("0.5", str(THREADED))):
        if exe and os.access(exe, os.X_OK):
            version = doctor.server_version(exe)
            said.append(f"{label}: {'.'.join(map(str, version or ())) or '?'}")
    return ", ".join(said)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--files", type=int, default=6000)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (IMAGE_SIF.is_file() and IMAGE_DIR.is_dir()):
        print("bench: the Debian test image is absent (scripts/debian-image.sh)", file=sys.stderr)
        return 2
    counts = sorted({1, 2, os.cpu_count() or 1})
    root_rows: dict[str, dict[str, float]] = {}
    if os.geteuid() == 0:
        with tempfile.TemporaryDirectory(prefix="capsid-io-") as tmp:
            mnt = Path(tmp) / "mnt"
            mnt.mkdir()
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
            from capsid.image.locate import locate

            offset = locate(str(IMAGE_SIF)).offset
            if offset is not None:
                subprocess.run(["mount", "-t", "squashfs", "-o", f"loop,ro,offset={offset}",
                                str(IMAGE_SIF), str(mnt)], check=True)
                try:
                    lists_dir = Path(tmp)
                    lists = {n: file_lists(lists_dir, n, args.files) for n in counts}
                    root_rows["kernel squashfs (root)"] = {str(n): statistics.median(
                        seconds(["sh", "-c", READERS, "-", str(mnt), *map(str, lists[n])])
                        for _ in range(args.repeat)) for n in counts}
                finally:
                    subprocess.run(["umount", str(mnt)], check=False)
        user = os.environ.get("CAPSID_TEST_USER", "capsid-test")
        proc = subprocess.run(["runuser", "-u", user, "--", "env", f"CAPSID_TEST_CACHE={CACHE}",
                               sys.executable, __file__, "--json", "--repeat", str(args.repeat),
                               "--files", str(args.files)], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        rows = {**json.loads(proc.stdout), **root_rows}
    else:
        with tempfile.TemporaryDirectory(prefix="capsid-io-") as tmp:
            rows = measure(Path(tmp), counts, args.files, args.repeat,
                           {"host directory": str(IMAGE_DIR)})
        if args.json:
            print(json.dumps(rows))
            return 0
    columns = [*map(str, counts), "import", "start"]
    print(f"{args.files} files of the image's /usr, split among N readers; "
          f"median of {args.repeat}; seconds")
    print(f"image servers: {server_versions()}")
    print(f"{'case':<32}" + "".join(f"{'N=' + c if c.isdigit() else c:>10}"
                                     for c in columns))
    for name, row in rows.items():
        print(f"{name:<32}" + "".join(f"{row[c]:>10.3f}" if c in row else f"{'-':>10}"
                                      for c in columns))
    print()
    for name, row in rows.items():
        one, many = row[str(counts[0])], row[str(counts[-1])]
        print(f"{name:<32} {counts[-1]} readers vs 1: {one / many:.2f}x the throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""OCI image → runnable squashfs image, cold cache: capsid against its peers, side by side.

The image is the ~200 MB Debian bookworm + python3 image from scripts/oci-images.sh,
pushed by skopeo to a local docker-registry with TLS and htpasswd auth.

  capsid          capsid pull OUT.sif docker://…           (fresh cache each run)
  apptainer-path  skopeo copy → umoci unpack --rootless → mksquashfs (defaults)
  charliecloud    ch-image pull → ch-convert -o squash
and for the ``docker save`` archive of the same image:
  capsid          capsid build OUT.sif docker-archive:…
  apptainer-path  skopeo copy docker-archive:… oci:… → umoci unpack → mksquashfs

Prints the median wall time of each, its peak resident memory (the largest of a
pipeline's steps) and the ratio to capsid. Run: .venv/bin/python bench/oci_pull.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.registry import PASSWORD, USER, Registry, make_pki  # noqa: E402

CAPSID = Path(sys.executable).parent / "capsid"
IMAGES = Path(os.environ.get("CAPSID_TEST_CACHE", "/var/cache/capsid-test")) / "oci"
REPO_NAME = "bench/debian-python3:12"


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """(seconds, peak RSS in KiB) of one command, measured by GNU time."""
    with tempfile.NamedTemporaryFile("r") as report:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%M", *argv], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{argv[0]} failed: {proc.stderr.strip()[-500:]}")
        return elapsed, int(report.read().strip().splitlines()[-1])


def pipeline(steps: list[list[str]], env: dict[str, str]) -> tuple[float, int]:
    total, peak = 0.0, 0
    for argv in steps:
        seconds, rss = timed(argv, env)
        total += seconds
        peak = max(peak, rss)
    return total, peak


class Bench:
    def __init__(self, registry: Registry, work: Path) -> None:
        self.registry = registry
        self.work = work
        self.env = {**os.environ, "SSL_CERT_FILE": str(registry.pki / "ca.crt"),
                    "REQUESTS_CA_BUNDLE": str(registry.pki / "ca.crt"),
                    "CAPSID_DOCKER_USERNAME": USER, "CAPSID_DOCKER_PASSWORD": PASSWORD,
                    "CH_IMAGE_USERNAME": USER, "CH_IMAGE_PASSWORD": PASSWORD,
                    "USER": os.environ.get("USER", "bench"), "TMPDIR": str(work),
                    # Charliecloud's scripts need Debian's python3 (with lark) first on PATH.
                    "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
        self.uri = f"docker://{registry.host}/{REPO_NAME}"

    def fresh(self, name: str) -> Path:
        d = self.work / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        return d

    def capsid_pull(self) -> tuple[float, int]:
        d = self.fresh("capsid")
        env = {**self.env, "CAPSID_CACHEDIR": str(d / "cache")}
        return timed([str(CAPSID), "pull", str(d / "out.sif"), self.uri], env)

    def apptainer_pull(self) -> tuple[float, int]:
        d = self.fresh("apptainer")
        return pipeline(self._umoci_steps(
            ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-cert-dir",
             str(self.registry.cert_dir()), "--src-creds", f"{USER}:{PASSWORD}", self.uri,
             f"oci:{d}/layout:img"], d), self.env)

    def _umoci_steps(self, copy: list[str], d: Path) -> list[list[str]]:
        return [copy, ["umoci", "--log", "error", "unpack", "--rootless", "--image",
                       f"{d}/layout:img", f"{d}/bundle"],
                ["mksquashfs", f"{d}/bundle/rootfs", f"{d}/out.sqfs", "-quiet", "-noappend"]]

    def charliecloud_pull(self) -> tuple[float, int]:
        d = self.fresh("charliecloud")
        ref = f"{self.registry.host}/{REPO_NAME}"
        env = {**self.env, "CH_IMAGE_STORAGE": str(d / "storage")}
        return pipeline([["ch-image", "--auth", "pull", ref],
                         ["ch-convert", "-i", "ch-image", "-o", "squash", ref,
                          str(d / "out.sqfs")]], env)

    def capsid_archive(self) -> tuple[float, int]:
        d = self.fresh("capsid-archive")
        return timed([str(CAPSID), "build", str(d / "out.sif"),
                      f"docker-archive:{IMAGES}/debian-python3.docker.tar"], self.env)

    def apptainer_archive(self) -> tuple[float, int]:
        d = self.fresh("apptainer-archive")
        return pipeline(self._umoci_steps(
            ["skopeo", "--insecure-policy", "copy", "--quiet",
             f"docker-archive:{IMAGES}/debian-python3.docker.tar", f"oci:{d}/layout:img"], d),
            self.env)


def require(*tools: str) -> None:
    """Stop with a clear line unless every peer tool is installed."""
    for tool in tools:
        if shutil.which(tool, path="/usr/bin:/bin:/usr/sbin:/sbin") is None:
            raise SystemExit(f"{tool} is missing: run scripts/setup.sh")


def measure(label: str, fn: Callable[[], tuple[float, int]], runs: int) -> tuple[float, int]:
    times, peaks = [], []
    for _ in range(runs):
        seconds, rss = fn()
        times.append(seconds)
        peaks.append(rss)
    median = statistics.median(times)
    print(f"  {label:16} {median:7.2f} s   peak {max(peaks) / 1024:6.0f} MiB   "
          f"runs {', '.join(f'{t:.2f}' for t in times)}", flush=True)
    return median, max(peaks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peer-runs", type=int, default=1,
                        help="runs of each (slow) peer; default 1")
    args = parser.parse_args()
    if not (IMAGES / "debian-python3.docker.tar").exists():
        raise SystemExit(f"{IMAGES} has no test images: run scripts/oci-images.sh as root")
    require("skopeo", "umoci", "mksquashfs", "ch-image", "ch-convert", "docker-registry")
    with tempfile.TemporaryDirectory(prefix="capsid-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        make_pki(work / "pki")
        registry = Registry(work / "registry", work / "pki")
        try:
            registry.skopeo_copy(f"oci-archive:{IMAGES}/debian-python3.oci.tar", REPO_NAME)
            bench = Bench(registry, work)
            print(f"registry → runnable image, cold cache ({os.cpu_count()} cores):")
            ours, our_rss = measure("capsid", bench.capsid_pull, args.runs)
            app, app_rss = measure("apptainer-path", bench.apptainer_pull, args.peer_runs)
            ch, ch_rss = measure("charliecloud", bench.charliecloud_pull, args.peer_runs)
            print("docker-archive → runnable image:")
            ours_a, ours_a_rss = measure("capsid", bench.capsid_archive, args.runs)
            app_a, app_a_rss = measure("apptainer-path", bench.apptainer_archive, args.peer_runs)
        finally:
            registry.stop()
    print("ratios (peer time / capsid time; target ≥ 8 against the Apptainer path):")
    print(f"  pull:    apptainer-path {app / ours:5.1f}x   charliecloud {ch / ours:5.1f}x")
    print(f"  archive: apptainer-path {app_a / ours_a:5.1f}x")
    print(f"peak memory: capsid pull {our_rss / 1024:.0f} MiB, archive {ours_a_rss / 1024:.0f} "
          f"MiB (the layer is {(IMAGES / 'debian-python3.docker.tar').stat().st_size >> 20} MiB "
          f"uncompressed); apptainer-path {max(app_rss, app_a_rss) / 1024:.0f} MiB, "
          f"charliecloud {ch_rss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

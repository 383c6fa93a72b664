"""``capsid doctor IMAGE``: will this image run well here? What it has against what the host offers.

Each check is one :class:`Finding` (OK, WARN or FAIL, with the fix). The image is read
without running it (its files come out of the squashfs with ``unsquashfs``): the C
library it carries, its MPI (implementation, version, ABI) and PMIx, and the x86-64
ISA level its binaries declare they need (GNU property notes). The host side: the same
for the host, and the kernel features capsid uses (user namespaces, /dev/fuse,
squashfuse, overlayfs in user namespaces, the new mount API).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from capsid import elf, tools

OK, WARN, FAIL = "OK", "WARN", "FAIL"
#: the x86-64 micro-architecture levels, by the CPU flags each needs (beyond the last)
_LEVELS = (
    ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
)
_LIB_DIRS = ("lib", "lib64", "usr/lib", "usr/lib64", "usr/lib/x86_64-linux-gnu",
             "lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu", "usr/local/lib")


@dataclass
class Finding:
    """One line of the report."""

    check: str
    status: str
    image: str
    host: str
    fix: str = ""


@dataclass
class Side:
    """What one side (the image or the host) has."""

    libc: str = "unknown"  #: "glibc 2.36", "musl", "none"
    mpi: str = "none"  #: "Open MPI 4.1.4", "MPICH 4.0", "none"
    mpi_abi: str = "none"  #: "libmpi.so.40" (Open MPI 3-5), "libmpi.so.12" (MPICH ABI)
    pmix: bool = False
    isa: str = "unknown"  #: the level needed (image) or offered (host)
    #: image: its CUDA runtime ("12.4.127"); host: the NVIDIA driver ("535.104.05")
    cuda: str = "none"
    details: dict[str, Any] = field(default_factory=dict)


def _version_in(data: bytes, pattern: bytes) -> str | None:
    found = re.search(pattern, data)
    return found.group(1).decode() if found else None


def _libc(read: Any, names: list[str]) -> str:
    musl = [n for n in names if re.fullmatch(r"(usr/)?lib/ld-musl-[^/]+\.so\.1", n)]
    if musl:
        return "musl"
    for name in names:
        if re.fullmatch(r"(usr/)?lib(64)?(/[^/]+-linux-gnu)?/libc\.so\.6", name):
            version = _version_in(read(name), rb"GNU C Library[^\n]*?version (\d+\.\d+)")
            if version:
                return f"glibc {version}"
    return "none" if names else "unknown"


def _mpi(read: Any, names: list[str]) -> tuple[str, str]:
    libs = {os.path.basename(n): n for n in names
            if re.search(r"/lib(mpi|mpich)\.so\.\d+$", "/" + n)}
    if "libmpi.so.40" in libs:
        # the file itself (libmpi.so.40.30.4), not the symlink to it
        real = max((n for n in names if os.path.basename(n).startswith("libmpi.so.40")),
                   key=len)
        data = read(real)
        version = _version_in(data, rb"Open MPI v?(\d+\.\d+\.\d+)") or \
            _version_in(data, rb"\x00v(\d+\.\d+\.\d+)\x00Open MPI\x00")
        if version is None and "libopen-pal.so.40" in {os.path.basename(n) for n in names}:
            pal = max((n for n in names if "/libopen-pal.so.40" in n), key=len)
            version = _version_in(read(pal), rb"Open MPI v?(\d+\.\d+\.\d+)")
        return f"Open MPI {version or '(version unknown)'}", "libmpi.so.40"
    if "libmpi.so.12" in libs or "libmpich.so.12" in libs:
        data = read(libs.get("libmpich.so.12") or libs["libmpi.so.12"])
        version = _version_in(data, rb"MPICH Version:?\s*\x00?(\d+\.\d+(?:\.\d+)?)") or \
            _version_in(data, rb"(\d+\.\d+(?:\.\d+)?)\x00[^\x00]*MPICH")
        return f"MPICH {version or '(version unknown)'}", "libmpi.so.12"
    if libs:
        return "unknown MPI", sorted(libs)[0]
    return "none", "none"


def _level_name(level: int) -> str:
    return {0: "unknown", 1: "x86-64", 2: "x86-64-v2", 3: "x86-64-v3", 4: "x86-64-v4"}[level]


def host_isa() -> str:
    """The highest x86-64 level this CPU offers ("unknown" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f
                          if line.startswith("flags")), set())
    except OSError:
        return "unknown"
    if "lm" not in flags:
        return "unknown"
    level = "x86-64"
    for name, needs in _LEVELS:
        if not needs <= flags:
            break
        level = name
    return level


class ImageFiles:
    """Listing and reading files of an image without running it."""

    def __init__(self, image: str) -> None:
        from capsid.image.locate import SANDBOX, locate

        self.image = locate(image)
        self.sandbox = self.image.kind == SANDBOX
        self._cache: dict[str, bytes] = {}

    def names(self) -> list[str]:
        if self.sandbox:
            from capsid import inroot

            found: list[str] = []
            seen: set[str] = set()
            for top in (*_LIB_DIRS, "usr/bin", "bin", "usr/local/bin", "usr/local/cuda", "opt"):
                # resolved inside the image, as the runtime would: never into the host
                try:
                    with inroot.walk_path(self.image.path, top) as where:
                        if where.missing or where.inside in seen:
                            continue
                        seen.add(where.inside)
                        inside = where.inside.lstrip("/")
                        fd = where.reopen(os.O_RDONLY | os.O_DIRECTORY)
                except (OSError, inroot.Unresolvable):
                    continue
                try:
                    base = f"/proc/self/fd/{fd}"
                    for dirpath, _dirs, files in os.walk(base):
                        found += [os.path.join(inside, os.path.relpath(
                            os.path.join(dirpath, n), base)) for n in files]
                finally:
                    os.close(fd)
            return list(dict.fromkeys(found))  # usr/lib holds usr/lib/x86_64-linux-gnu
        listing = tools.output([tools.which("unsquashfs"), "-o", str(self.image.offset),
                                "-lc", "-d", "", self.image.path], timeout=300) or ""
        return [line.lstrip("/") for line in listing.splitlines() if line.startswith("/")]

    def read(self, name: str, limit: int = 64 << 20) -> bytes:
        if name in self._cache:
            return self._cache[name]
        # Either way the file is read as the runtime resolves it: inside the image's root
        # (its links cannot reach the host), a regular file only (no FIFO can hang this)
        if self.sandbox:
            data = _read_inside(self.image.path, name, limit)
        else:
            with tempfile.TemporaryDirectory(prefix="capsid-doctor-") as tmp:
                tools.output([tools.which("unsquashfs"), "-o", str(self.image.offset), "-n",
                              "-q", "-f", "-d", f"{tmp}/r", self.image.path, name], timeout=300)
                data = _read_inside(f"{tmp}/r", name, limit) if os.path.isdir(f"{tmp}/r") \
                    else b""
        self._cache[name] = data
        return data


def _read_inside(root: str, name: str, limit: int) -> bytes:
    """At most *limit* bytes of *name* inside *root*; nothing for what is not a file."""
    from capsid import hostfs

    try:
        fd = hostfs.open_in(root, name)
    except (OSError, hostfs.Refused):
        return b""
    if fd is None:
        return b""
    with open(fd, "rb") as f:
        return f.read(limit)


def image_side(image: str) -> Side:
    files = ImageFiles(image)
    names = files.names()
    side = Side()
    side.libc = _libc(files.read, names)
    side.mpi, side.mpi_abi = _mpi(files.read, names)
    side.pmix = any(re.search(r"/libpmix\.so\.\d+$", "/" + n) for n in names)
    candidates = [n for n in names if re.search(
        r"^(usr/|usr/local/|opt/[^/]+/)?bin/[^/]+$|/lib(c|mpi|python3[^/]*)\.so[.\d]*$", n)]
    level = 0
    for name in candidates[:80]:
        level = max(level, elf.isa_level(files.read(name, 4 << 20)))
    side.isa = _level_name(level) if level else "x86-64 (no higher level declared)"
    hwcaps = sorted({m.group(1) for n in names
                     if (m := re.search(r"glibc-hwcaps/(x86-64-v\d)/", n))})
    side.details = {"files_checked": min(len(candidates), 80), "glibc_hwcaps": hwcaps}
    side.cuda = _image_cuda(files.read, names)
    return side


def _image_cuda(read: Any, names: list[str]) -> str:
    """The CUDA runtime in an image: libcudart's version, else the toolkit's version file."""
    found = sorted((tuple(int(p) for p in m.group(1).split(".")), m.group(1)) for n in names
                   if (m := re.search(r"/libcudart\.so\.(\d+\.\d+(?:\.\d+)*)$", "/" + n)))
    if found:
        return found[-1][1]
    for name in names:
        if re.fullmatch(r"usr/local/cuda[^/]*/version\.json", name):
            try:
                version = json.loads(read(name, 1 << 20))["cuda"]["version"]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(version, str):
                return version
    return "none"


def host_driver() -> str:
    """The NVIDIA driver's version: nvidia-smi says it, else libcuda's file name."""
    smi = shutil.which("nvidia-smi")
    if smi:
        out = tools.output([smi, "--query-gpu=driver_version", "--format=csv,noheader"])
        first = (out or "").strip().splitlines()[:1]
        if first and re.fullmatch(r"[\d.]+", first[0].strip()):
            return first[0].strip()
    from capsid import config, ldcache
    from capsid.errors import CapsidError

    try:
        found = ldcache.find_libraries(["libcuda.so.1"], config.load())
    except CapsidError:
        return "none"
    if "libcuda.so.1" in found:
        real = os.path.basename(os.path.realpath(found["libcuda.so.1"]))
        matched = re.fullmatch(r"libcuda\.so\.(\d+\.\d+(?:\.\d+)?)", real)
        return matched.group(1) if matched else "unknown"
    return "none"


def host_side() -> Side:
    side = Side()
    version = os.confstr("CS_GNU_LIBC_VERSION") if "CS_GNU_LIBC_VERSION" in \
        os.confstr_names else None
    side.libc = version or "unknown"
    side.isa = host_isa()
    launcher = shutil.which("mpirun") or shutil.which("mpiexec")
    if launcher:
        from capsid.mpi import host

        named = host.version(launcher)
        if named.startswith("Open MPI"):
            side.mpi, side.mpi_abi = named, "libmpi.so.40"
        elif named.startswith("MPICH"):
            side.mpi, side.mpi_abi = named, "libmpi.so.12"
        side.details["launcher"] = launcher
    side.pmix = _in_ldcache(r"libpmix\.so\.\d+")
    side.cuda = host_driver()
    return side


def _in_ldcache(pattern: str) -> bool:
    """Whether the host's ld.so cache has a library named like *pattern*."""
    from capsid import config, ldcache
    from capsid.errors import CapsidError

    try:
        return any(re.fullmatch(pattern, name) for name, _ in ldcache.entries(config.load()))
    except CapsidError:
        return False


def _glibc_tuple(libc: str) -> tuple[int, ...] | None:
    found = re.fullmatch(r"glibc (\d+)\.(\d+)", libc)
    return (int(found.group(1)), int(found.group(2))) if found else None


def _userns() -> tuple[str, str]:
    try:
        maximum = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        maximum = -1
    debian = Path("/proc/sys/kernel/unprivileged_userns_clone")
    if maximum == 0 or (debian.exists() and debian.read_text().strip() == "0"):
        return FAIL, "sysctl user.max_user_namespaces=15000 (Debian: " \
                     "kernel.unprivileged_userns_clone=1)"
    return OK, ""


def server_version(exe: str) -> tuple[int, ...] | None:
    """The version ``squashfuse_ll -V`` prints (``squashfuse 0.5.2 (c) ...``), or None."""
    # its usage comes too, and the exit status is 2 (0.5) or 254 (0.1)
    out = tools.output([exe, "-V"], stderr=True, timeout=10, ok=range(256)) or ""
    found = re.search(r"^squashfuse (\d+(?:\.\d+)*)\b", out, re.MULTILINE)
    return tuple(int(part) for part in found.group(1).split(".")) if found else None


def _server_finding() -> Finding:
    """Which squashfuse_ll serves images, and whether it serves on several threads
    (0.5 and later): ranks sharing a container all read through it."""
    from capsid.errors import CapsidError
    from capsid.runtime import fuse

    try:
        exe = fuse.server()
    except CapsidError as err:
        return Finding("squashfuse_ll", FAIL, "-", "misnamed", f"{err.message}; {err.hint}")
    if exe is None:
        return Finding("squashfuse_ll", WARN, "-", "missing",
                       "apt-get install squashfuse (0.5 or later serves on several threads); "
                       "until then images are unpacked into memory")
    version = server_version(exe)
    shown = ".".join(map(str, version)) if version else "unknown version"
    if version is not None and version >= (0, 5):
        return Finding("squashfuse_ll", OK, "-", f"{shown}, multithreaded ({exe})")
    return Finding("squashfuse_ll", WARN, "-", f"{shown}, one thread ({exe})",
                   "every reader of a container (and every rank sharing one) waits for one "
                   "thread: point CAPSID_SQUASHFUSE or the site's 'squashfuse path' at "
                   "squashfuse_ll 0.5 or later (Apptainer 1.1+ ships one in its libexec "
                   "directory), or run with --unsquash")


def _keeper_finding() -> Finding:
    """Whether a start keeps its image served for the next one, and for how long."""
    from capsid import config
    from capsid.errors import CapsidError
    from capsid.runtime import imagekeeper

    try:
        seconds = imagekeeper.linger(config.load())
    except CapsidError as err:
        return Finding("image keeper", FAIL, "-", "misconfigured", f"{err.message}; {err.hint}")
    if seconds <= 0:
        return Finding("image keeper", OK, "-", "off: each start serves its image itself")
    return Finding("image keeper", OK, "-", f"the image is kept served {seconds:g} s after "
                   "each start, for the next one (image server linger)")


def report(image: str) -> tuple[list[Finding], Side, Side]:
    """The findings for *image* on this host, and what each side has."""
    img, host = image_side(image), host_side()
    findings = []
    status, fix = _userns()
    findings.append(Finding("user namespaces", status, "-", "enabled" if status == OK
                            else "disabled", fix))
    fuse = os.access("/dev/fuse", os.R_OK | os.W_OK)
    findings.append(Finding("/dev/fuse", OK if fuse else WARN, "-",
                            "usable" if fuse else "not usable",
                            "" if fuse else "ask an administrator for mode 0666; until then "
                            "images are unpacked into memory (--unsquash), slower to start"))
    findings.append(_server_finding())
    findings.append(_keeper_finding())
    from capsid.runtime import linux

    kernel = linux.kernel_version()
    findings.append(Finding("overlayfs in user namespaces", OK if kernel >= (5, 11) else WARN,
                            "-", f"Linux {kernel[0]}.{kernel[1]}",
                            "" if kernel >= (5, 11) else "--writable-tmpfs and --overlay "
                            "need Linux 5.11 or later without privileges"))
    findings.append(Finding("new mount API", OK if kernel >= (5, 2) else WARN, "-",
                            f"Linux {kernel[0]}.{kernel[1]}",
                            "" if kernel >= (5, 2) else "older kernels serve images less "
                            "robustly; upgrade to 5.2 or later"))
    findings.append(_libc_finding(img, host))
    findings.append(_isa_finding(img, host))
    findings.append(_mpi_finding(img, host))
    findings.append(_pmix_finding(img, host))
    findings.append(_cuda_finding(img, host))
    if host.cuda != "none":
        findings.append(_gpu_libraries_finding(img))
    return findings, img, host


def _cuda_finding(img: Side, host: Side) -> Finding:
    from capsid.gpu import compat

    driver = f"driver {host.cuda}" if host.cuda != "none" else "no NVIDIA driver"
    cuda = f"CUDA {img.cuda}" if img.cuda != "none" else "no CUDA"
    if img.cuda == "none":
        return Finding("NVIDIA GPUs", OK, cuda, driver)
    if host.cuda == "none":
        return Finding("NVIDIA GPUs", WARN, cuda, driver, "the image uses CUDA and this host "
                       "has no NVIDIA driver: run it where there are GPUs, with --nv")
    wanted, have = compat.parse_version(img.cuda), compat.parse_version(host.cuda)
    if wanted is None or have is None:
        return Finding("NVIDIA GPUs", WARN, cuda, driver, "cannot compare the versions")
    verdict, minimum = compat.cuda_support(wanted, have)
    if verdict == "full":
        return Finding("NVIDIA GPUs", OK, cuda, driver)
    if verdict == "minor":
        return Finding("NVIDIA GPUs", WARN, cuda, driver,
                       f"CUDA {img.cuda} wants driver {minimum} or newer; this one runs it "
                       "through CUDA's minor version compatibility, without the newer "
                       "driver's features (PTX built for it fails to JIT)")
    if verdict == "none":
        return Finding("NVIDIA GPUs", FAIL, cuda, driver,
                       f"CUDA {img.cuda} needs driver {minimum} or newer: use an image with "
                       "an older CUDA, or ask for a newer driver")
    return Finding("NVIDIA GPUs", WARN, cuda, driver,
                   "capsid does not know this CUDA release's driver needs")


def _gpu_libraries_finding(img: Side) -> Finding:
    """Which of the driver's libraries --nv binds the image's glibc cannot load."""
    from capsid import config, ldcache
    from capsid.errors import CapsidError
    from capsid.gpu import compat, liblists

    try:
        libraries = ldcache.find_libraries(
            [e for e in liblists.load("nv") if ".so" in e and not e.startswith("/")],
            config.load())
    except CapsidError as err:
        return Finding("GPU libraries (--nv)", WARN, img.libc, "unknown", err.message)
    needs = compat.library_needs(libraries)
    have = f"{len(libraries)} libraries"
    image = _glibc_tuple(img.libc)
    if image is None:
        status = WARN if needs else OK
        return Finding("GPU libraries (--nv)", status, img.libc, have,
                       "the driver's libraries need glibc: use a glibc-based image"
                       if needs else "")
    bad = sorted(f"{n} (GLIBC_{elf.dotted(v)})" for n, v in needs.items() if v > image)
    if bad:
        return Finding("GPU libraries (--nv)", WARN, img.libc, have,
                       f"{len(bad)} will not load in this image: {', '.join(bad)}; use an "
                       "image with a newer glibc if the program needs them")
    return Finding("GPU libraries (--nv)", OK, img.libc, have)


def _libc_finding(img: Side, host: Side) -> Finding:
    image_v, host_v = _glibc_tuple(img.libc), _glibc_tuple(host.libc)
    if img.libc in ("none", "unknown") or img.libc == "musl":
        status = WARN if img.libc == "musl" else OK
        fix = "host libraries (--mpi host, GPU drivers) cannot be bound into a musl image" \
            if img.libc == "musl" else ""
        return Finding("C library", status, img.libc, host.libc, fix)
    if image_v and host_v and image_v < host_v:
        return Finding("C library", WARN, img.libc, host.libc,
                       "host libraries bound in (--mpi host, GPU drivers) may need a newer "
                       f"glibc than the image's {img.libc}; rebuild on a newer base")
    return Finding("C library", OK, img.libc, host.libc)


def _isa_finding(img: Side, host: Side) -> Finding:
    order = ["x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4"]
    needed = img.isa.split()[0]
    if needed in order and host.isa in order and order.index(needed) > order.index(host.isa):
        return Finding("CPU ISA level", FAIL, img.isa, host.isa,
                       f"the image's binaries need {needed}; rebuild them for {host.isa} "
                       "(-march) or run on newer CPUs")
    if host.isa == "unknown" or img.isa == "unknown":
        return Finding("CPU ISA level", OK, img.isa, host.isa)
    return Finding("CPU ISA level", OK, img.isa, host.isa)


def _mpi_finding(img: Side, host: Side) -> Finding:
    if img.mpi == "none":
        fix = "" if host.mpi == "none" else \
            f"to run MPI programs, bind the host's {host.mpi} in (the bind model)"
        return Finding("MPI", OK, img.mpi, host.mpi, fix)
    if host.mpi == "none":
        return Finding("MPI", WARN, f"{img.mpi} ({img.mpi_abi})", host.mpi,
                       "no mpirun on the host: launch ranks with srun --mpi=pmix, or load "
                       "the site's MPI module")
    if img.mpi_abi != host.mpi_abi:
        return Finding("MPI", FAIL, f"{img.mpi} ({img.mpi_abi})", f"{host.mpi} "
                       f"({host.mpi_abi})", "the image's and the host's MPI differ in ABI: "
                       "the hybrid model (mpirun ... capsid exec) fails at MPI_Init; use an "
                       "image with the host's MPI family")
    return Finding("MPI", OK, f"{img.mpi} ({img.mpi_abi})", f"{host.mpi} ({host.mpi_abi})")


def _pmix_finding(img: Side, host: Side) -> Finding:
    if img.mpi == "none":
        return Finding("PMIx", OK, "yes" if img.pmix else "no", "yes" if host.pmix else "no")
    if img.mpi.startswith("Open MPI") and not img.pmix and host.pmix:
        return Finding("PMIx", WARN, "no", "yes", "srun --mpi=pmix needs PMIx in the image: "
                       "install libpmix2 (Debian) in it, or use mpirun")
    return Finding("PMIx", OK, "yes" if img.pmix else "no", "yes" if host.pmix else "no")


def as_json(image: str, findings: list[Finding], img: Side, host: Side) -> dict[str, Any]:
    """The report as the JSON that ``doctor --json`` prints (schemas/doctor.schema.json)."""
    worst = FAIL if any(f.status == FAIL for f in findings) else \
        WARN if any(f.status == WARN for f in findings) else OK
    return {"image": image, "status": worst, "image_side": asdict(img),
            "host_side": asdict(host), "checks": [asdict(f) for f in findings]}

"""``--mpi host``: the bind model, done for the user.

The host's MPI is found from its launcher (``mpirun``/``mpiexec`` on PATH) or the
site's ``mpi prefix``. What it needs is worked out from the ELF files themselves:
``libmpi`` and every library it needs (``DT_NEEDED``, searched along ``RUNPATH``, then
the host's ld.so cache), plus the plugin directories of Open MPI, PMIx, PRRTE, UCX and
libfabric next to them and everything their plugins need. The C library is left out:
the image's own glibc must supply it. The libraries are bound in one place,
``/.singularity.d/mpi``, put first on the library path; plugin and data directories
are bound at their own paths, where the MPI looks for them.

Two facts decide whether it can work, and are checked before the command starts: the
image's glibc must be at least the newest ``GLIBC_x.y`` those libraries need, and an
MPI in the image must have the host's ABI (Open MPI's ``libmpi.so.40``, or MPICH's
``libmpi.so.12``, which Intel MPI, MVAPICH and Cray MPICH share).
"""

from __future__ import annotations

import os

# Imported here: check() runs after the container's root has hidden capsid's files. What
# only working the closure out needs (re, subprocess, ldcache) is imported there: with
# the closure cached, each rank's start stays light.
from capsid import arch, config, elf, glibc, hostfs, inroot, log, tools
from capsid.errors import CapsidError, RuntimeSetupError

LOG = log.get(__name__)

LIBS_DIR = "/.singularity.d/mpi"
ABIS = {"libmpi.so.40": "Open MPI", "libmpi.so.12": "MPICH ABI", "libmpich.so.12": "MPICH ABI"}
#: glibc's own libraries: the image supplies these
GLIBC = (r"(libc|libm|libmvec|libpthread|libdl|librt|libutil|libresolv|libnsl|libanl|"
         r"libBrokenLocale|libthread_db|libc_malloc_debug)\.so\.\d+|ld-linux[^/]*\.so\.\d+|"
         r"ld64\.so\.\d+")
#: directories of plugins that sit next to an MPI's libraries; in a system library
#: directory (where openmpi/ and pmix2/ hold whole installations) only the second kind
_PLUGIN_DIRS = r"openmpi\d*|pmix\d*|prte\d*|mpich\d*|ucx|libfabric|hwloc"
_SYSTEM_PLUGIN_DIRS = r"ucx|libfabric|hwloc"
#: the variables of launchers and fabrics, passed in even with --cleanenv
PASSTHROUGH = ("OMPI_", "PMIX_", "PMI_", "PMI2_", "SLURM_", "HYDRA_", "I_MPI_", "MPICH_",
               "UCX_", "FI_", "PRTE_", "OPAL_")


class HostMPI:
    """The host's MPI, as bound into a container."""

    __slots__ = ("abi", "directories", "glibc_needed", "glibc_needer", "implementation",
                 "libraries", "passthrough")

    def __init__(self, implementation: str, abi: str, libraries: dict[str, str] | None = None,
                 directories: list[str] | None = None,
                 glibc_needed: tuple[int, ...] | None = None, glibc_needer: str = "") -> None:
        self.implementation = implementation  #: "Open MPI 4.1.4", "MPICH ABI (MPICH 4.0)"
        self.abi = abi  #: the soname of its libmpi
        self.libraries = libraries or {}  #: soname → host file
        self.directories = directories or []  #: bound at their own paths
        self.glibc_needed = glibc_needed  #: the newest GLIBC_x.y any of them needs
        self.glibc_needer = glibc_needer  #: which library needs it
        self.passthrough: dict[str, str] = {}  #: launcher variables, set in the container

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__ if name != "passthrough"}


def _launcher(site: config.SiteConfig) -> tuple[str | None, str | None]:
    """(the launcher, the MPI's prefix)."""
    prefix = site.values.get("mpi prefix")
    if prefix:
        for name in ("mpirun", "mpiexec"):
            if os.access(os.path.join(prefix, "bin", name), os.X_OK):
                return os.path.join(prefix, "bin", name), prefix
        return None, prefix
    found = tools.find("mpirun") or tools.find("mpiexec")
    if found is None:
        return None, None
    return found, os.path.dirname(os.path.dirname(os.path.realpath(found)))


def _libmpi(prefix: str | None, cache: dict[str, str]) -> str | None:
    triplet_dirs = [d for d in os.listdir(f"{prefix}/lib") if d.endswith("-linux-gnu")] \
        if prefix and os.path.isdir(f"{prefix}/lib") else []
    for abi in ABIS:
        if prefix:
            for sub in ("lib", "lib64", *(f"lib/{t}" for t in triplet_dirs)):
                path = os.path.join(prefix, sub, abi)
                if os.path.exists(path):
                    return path
        if abi in cache and (prefix is None or prefix in ("/usr", "/")
                             or os.path.realpath(cache[abi]).startswith(prefix + "/")):
            return cache[abi]
    return None


def version(launcher: str | None) -> str:
    """What ``LAUNCHER --version`` says it is: "Open MPI 4.1.4", "MPICH 4.0", or ""."""
    import re
    if launcher is None:
        return ""
    text = tools.output([launcher, "--version"], timeout=20, stderr=True) or ""
    if "Open MPI" in text or "OpenRTE" in text:
        found = re.search(r"(\d+\.\d+\.\d+)", text)
        return f"Open MPI {found.group(1) if found else '(version unknown)'}"
    if "HYDRA" in text or "MPICH" in text or "Intel" in text:
        found = re.search(r"Version:\s*(\S+)", text)
        return f"MPICH {found.group(1) if found else '(version unknown)'}"
    return ""


def _resolve(name: str, origin: str, runpath: list[str], cache: dict[str, str],
             fallback: list[str]) -> str | None:
    for directory in runpath:
        directory = directory.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    if name in cache:
        return cache[name]
    for directory in fallback:
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def _ompi_paths(launcher: str | None) -> dict[str, str]:
    """Open MPI's compiled-in directories (``ompi_info --path all``): where its plugins,
    help texts and parameter files are."""

    program = os.path.join(os.path.dirname(launcher), "ompi_info") if launcher else None
    if program is None or not os.access(program, os.X_OK):
        return {}
    out = tools.output([program, "--path", "all", "--parsable"]) or ""
    return {parts[1]: parts[2] for line in out.splitlines()
            if len(parts := line.split(":", 2)) == 3 and parts[0] == "path"}


def find(site: config.SiteConfig) -> HostMPI:
    """The host's MPI and everything it needs (worked out once per installation, then
    cached), or an error saying how to point at it."""
    launcher, prefix = _launcher(site)
    key = _cache_key(launcher, prefix)
    found = _cached(key)
    if found is None:
        found = _find(site, launcher, prefix)
        _store(key, found)
    found.passthrough = {k: v for k, v in os.environ.items() if k.startswith(PASSTHROUGH)}
    return found


def _cache_key(launcher: str | None, prefix: str | None) -> str:
    parts = [str(prefix), str(launcher)]
    for path in (launcher, "/etc/ld.so.cache"):
        if path:
            try:
                info = os.stat(path)
                parts.append(f"{os.path.realpath(path)}:{info.st_mtime_ns}:{info.st_size}")
            except OSError:
                parts.append("-")
    from capsid import __version__

    parts.append(__version__)
    return tools.sha256_hex("\0".join(parts).encode(errors="surrogateescape"))[:24]


def _cache_file(key: str) -> str:
    return os.path.join(config.cache_root(), "hostmpi", f"{key}.json")


def _cached(key: str) -> HostMPI | None:
    """The closure cached for *key*, read only from a private cache folder of the
    caller's (another user could otherwise point ranks at libraries of theirs)."""
    import json

    path = _cache_file(key)
    try:
        hostfs.check_private(os.path.dirname(path), "host-MPI cache")
        data = hostfs.read_nofollow(path, what="the host-MPI cache entry")
        if data is None:
            return None
        mpi = HostMPI(**json.loads(data))
        if mpi.glibc_needed is not None:
            mpi.glibc_needed = tuple(mpi.glibc_needed)
    except (OSError, ValueError, TypeError, hostfs.Refused):
        return None
    if not all(os.path.exists(p) for p in [*mpi.libraries.values(), *mpi.directories]):
        return None  # the installation changed
    return mpi


def _store(key: str, mpi: HostMPI) -> None:
    import json
    from pathlib import Path

    from capsid.image.output import write_bytes

    target = Path(_cache_file(key))
    try:
        hostfs.private_dir(str(target.parent), "host-MPI cache")
        write_bytes(target, json.dumps(mpi.as_dict()).encode())
    except (OSError, hostfs.Refused) as err:
        LOG.debug("cannot cache the host's MPI in %s: %s", target, err)


def _find(site: config.SiteConfig, launcher: str | None, prefix: str | None) -> HostMPI:
    import re

    from capsid import ldcache

    machine = elf.this_machine()
    cache = {}
    for name, path in ldcache.entries(site):
        if name not in cache and elf.header(path) == machine:
            cache[name] = path
    libmpi = _libmpi(prefix, cache)
    if libmpi is None:
        raise CapsidError("--mpi host: there is no MPI on this host (no mpirun or mpiexec on "
                          "PATH, no libmpi.so.40 or libmpi.so.12 in the ld.so cache)",
                          "load the site's MPI module first, or set 'mpi prefix' in "
                          "capsid.conf")
    abi = os.path.basename(libmpi)
    named = version(launcher)
    family = ABIS[abi]
    implementation = named if family == "Open MPI" and named else \
        f"{family} ({named})" if named else family
    result = HostMPI(implementation=implementation, abi=abi)
    triplet = arch.triplet(machine[1])
    fallback = [f"/lib/{triplet}", f"/usr/lib/{triplet}", "/lib64", "/usr/lib64", "/lib",
                "/usr/lib"]
    queue, seen_files = [(abi, libmpi)], set()
    paths = _ompi_paths(launcher) if family == "Open MPI" else {}
    if paths.get("pkglibdir") and os.path.isdir(paths["pkglibdir"]):
        result.directories.append(paths["pkglibdir"])
        for root, _dirs, files in os.walk(paths["pkglibdir"]):
            queue += [("", os.path.join(root, f)) for f in files if ".so" in f]
    newest: tuple[int, ...] = ()
    while queue:
        name, path = queue.pop()
        real = os.path.realpath(path)
        if real in seen_files:
            continue
        seen_files.add(real)
        try:
            info = elf.read(real)
        except (OSError, elf.NotELF) as err:
            LOG.debug("--mpi host: skipping %s: %s", path, err)
            continue
        if name:  # a library, not a plugin (plugins are bound with their directory)
            result.libraries.setdefault(name, real)
        need = info.newest_glibc()
        if need is not None and need > newest:
            newest, result.glibc_needed = need, need
            result.glibc_needer = name or os.path.basename(real)
        for needed in info.needed:
            if re.fullmatch(GLIBC, needed) or needed in result.libraries:
                continue
            found = _resolve(needed, os.path.dirname(path), info.runpath, cache, fallback)
            if found is None:
                LOG.debug("--mpi host: %s needs %s, which is not on this host", real, needed)
            else:
                queue.append((needed, found))
        for plugins in _plugin_dirs(os.path.dirname(real)):
            if plugins in result.directories:
                continue
            result.directories.append(plugins)
            for root, _dirs, files in os.walk(plugins):
                queue += [("", os.path.join(root, f)) for f in files if ".so" in f]
    data = [paths[k] for k in ("pkgdatadir", "sysconfdir") if paths.get(k)]
    for each in [*data, *_data_dirs(prefix, result.libraries.values())]:
        if each not in result.directories and os.path.isdir(each) and each != "/etc":
            result.directories.append(each)
    return result


def _plugin_dirs(directory: str) -> list[str]:
    """Plugin directories beside a library's directory."""
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []
    import re

    system = directory in ("/lib", "/usr/lib", "/lib64", "/usr/lib64") or \
        directory.endswith("-linux-gnu")
    pattern = _SYSTEM_PLUGIN_DIRS if system else _PLUGIN_DIRS
    return [os.path.join(directory, e) for e in entries
            if re.fullmatch(pattern, e) and os.path.isdir(os.path.join(directory, e))]


def _data_dirs(prefix: str | None, libraries: object) -> list[str]:
    """Help texts and parameter files the MPI reads at run time."""
    found = []
    if prefix:
        found += [f"{prefix}/share/{n}" for n in ("openmpi", "pmix", "prte", "mpich")]
        found.append("/etc/openmpi" if prefix == "/usr" else f"{prefix}/etc")
    for path in libraries:  # type: ignore[attr-defined]
        top = os.path.dirname(os.path.dirname(path))
        if os.path.basename(os.path.dirname(path)) == "lib" and top not in ("/", "/usr"):
            found.append(f"{top}/share")
    return [d for d in dict.fromkeys(found) if os.path.isdir(d)]


def image_abis(root_fd: int) -> list[str]:
    """The MPI ABIs an image's libraries have (the sonames of its libmpi)."""
    found: set[str] = set()
    for directory in glibc.image_library_dirs(root_fd):
        try:
            with inroot.walk(root_fd, directory) as where:
                if where.missing:
                    continue
                fd = where.reopen(os.O_RDONLY | os.O_DIRECTORY)
        except (OSError, inroot.Unresolvable):
            continue
        try:
            found.update(n for n in os.listdir(fd) if n in ABIS)
        finally:
            os.close(fd)
    return sorted(found)


def check(mpi: HostMPI, root_fd: int) -> None:
    """Refuse, before the command starts, an image the host's MPI cannot work in."""
    have = glibc.image_glibc(root_fd)
    if have is None:
        raise RuntimeSetupError(f"--mpi host: the host's {mpi.implementation} needs glibc, "
                                "and the image has none (musl, or static programs only)",
                                "use an image based on a glibc distribution, or the image's "
                                "own MPI without --mpi host")
    if mpi.glibc_needed is not None and mpi.glibc_needed > have:
        needed = elf.dotted(mpi.glibc_needed)
        raise RuntimeSetupError(
            f"--mpi host: the host's {mpi.implementation} needs glibc {needed} "
            f"({mpi.glibc_needer} needs GLIBC_{needed}) and the image has glibc "
            f"{elf.dotted(have)}, which cannot load it",
            f"use an image with glibc {needed} or newer (a base as new as the host's), or "
            "the image's own MPI without --mpi host (the hybrid model)")
    other = [abi for abi in image_abis(root_fd) if ABIS[abi] != ABIS[mpi.abi]]
    if other:
        raise RuntimeSetupError(
            f"--mpi host: the image's MPI is {ABIS[other[0]]} ({other[0]}) and the host's is "
            f"{mpi.implementation} ({mpi.abi}): their ABIs differ, so programs built against "
            "the image's MPI cannot use the host's",
            f"rebuild the program against {ABIS[mpi.abi]} in the image, or run the image's "
            "own MPI without --mpi host, on a host with the same MPI family")

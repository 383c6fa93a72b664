"""The host's ld.so cache (``ldconfig -p``), and finding driver files through it."""

from __future__ import annotations

import os
import re
import subprocess

from capsid import config, elf, log, tools
from capsid.errors import CapsidError

LOG = log.get(__name__)

#: ``	libcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1``
_LINE = re.compile(r"^\s*(\S+)\s+\((.*)\)\s+=>\s+(\S.*?)\s*$")
_SYSTEM_BIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def ldconfig(site: config.SiteConfig) -> str:
    """The ldconfig to ask: the site's ``ldconfig path``, else the system's."""
    configured = site.values.get("ldconfig path")
    if configured:
        return configured
    found = tools.find("ldconfig", site.values.get("binary path") or _SYSTEM_BIN)
    if found is None:
        raise CapsidError("ldconfig is not installed, so capsid cannot find the host's "
                          "driver libraries", "install it (libc-bin), or set 'ldconfig path' "
                          "in capsid.conf")
    return found


def entries(site: config.SiteConfig) -> list[tuple[str, str]]:
    """(name, path) of every library in the cache, in its order (the first one wins)."""
    program = ldconfig(site)
    try:
        proc = subprocess.run([program, "-p"], capture_output=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise CapsidError(f"cannot run {program} -p: {err}",
                          "fix 'ldconfig path' in capsid.conf") from None
    if proc.returncode != 0:
        raise CapsidError(f"{program} -p failed: "
                          f"{proc.stderr.decode(errors='replace').strip()[:200]}",
                          "fix 'ldconfig path' in capsid.conf")
    found = []
    for line in proc.stdout.decode(errors="replace").splitlines():
        matched = _LINE.match(line)
        if matched:
            found.append((matched.group(1), matched.group(3)))
    return found


def find_libraries(prefixes: list[str], site: config.SiteConfig) -> dict[str, str]:
    """Library name → host path, for the cache entries starting with one of *prefixes*
    that this machine can load (the ELF class and machine of this process)."""
    machine = elf.this_machine()
    chosen: dict[str, str] = {}
    for name, path in entries(site):
        if name in chosen or not any(name.startswith(p) for p in prefixes):
            continue
        if elf.header(path) != machine:
            LOG.debug("%s: not a library for this machine, skipped", path)
            continue
        chosen[name] = path
    return chosen


def find_program(name: str, site: config.SiteConfig) -> str | None:
    """A driver program on the user's PATH, or on the site's ``binary path``."""
    search = os.environ.get("PATH", "") + ":" + (site.values.get("binary path") or _SYSTEM_BIN)
    return tools.find(name, search)

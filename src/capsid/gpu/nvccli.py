"""``--nvccli``: NVIDIA's own ``nvidia-container-cli configure`` sets the GPUs up.

It reads the same variables as NVIDIA's container runtime (``NVIDIA_VISIBLE_DEVICES``,
``NVIDIA_DRIVER_CAPABILITIES``, ``NVIDIA_REQUIRE_*``, the MIG ones), turned into its
flags here, and writes the driver's files into the container's root, which is made
writable in memory for it (``--writable-tmpfs``), as Apptainer does. It runs in the
container's user and mount namespaces, on the host's root, before the command starts.
"""

from __future__ import annotations

import os

from capsid import config, tools
from capsid.errors import CapsidError, RuntimeSetupError

CAPABILITIES = ("compute", "compat32", "graphics", "utility", "video", "display")
DEFAULT_CAPABILITIES = ("compute", "utility")
#: what nvidia-container-cli needs to hold across its execve (Apptainer's list)
_CAPS = (5, 7, 6, 18, 0, 3, 27, 21, 2, 19, 1, 8)  # KILL SETUID SETGID SYS_CHROOT CHOWN
#                  FOWNER MKNOD SYS_ADMIN DAC_READ_SEARCH SYS_PTRACE DAC_OVERRIDE SETPCAP


def program(site: config.SiteConfig) -> str:
    configured = site.values.get("nvidia-container-cli path")
    found = configured or tools.find("nvidia-container-cli")
    if not found or not os.access(found, os.X_OK):
        raise CapsidError("--nvccli needs nvidia-container-cli, which is not installed here",
                          "install libnvidia-container-tools, or use --nv")
    return found


def flags(environ: dict[str, str], ldconfig: str) -> list[str]:
    """nvidia-container-cli's ``configure`` flags for the NVIDIA_* variables in *environ*."""
    result = ["--no-cgroups"]
    if environ.get("NVIDIA_VISIBLE_DEVICES"):
        result.append(f"--device={environ['NVIDIA_VISIBLE_DEVICES']}")
    for name, flag in (("NVIDIA_MIG_CONFIG_DEVICES", "--mig-config"),
                       ("NVIDIA_MIG_MONITOR_DEVICES", "--mig-monitor")):
        if environ.get(name):
            result.append(f"{flag}={environ[name]}")
    wanted = environ.get("NVIDIA_DRIVER_CAPABILITIES", "")
    capabilities = [c.strip() for c in wanted.split(",") if c.strip()] if wanted \
        else list(DEFAULT_CAPABILITIES)
    if capabilities == ["all"]:
        capabilities = list(CAPABILITIES)
    for capability in capabilities:
        if capability not in CAPABILITIES:
            raise CapsidError(f"NVIDIA_DRIVER_CAPABILITIES names {capability!r}, which "
                              "nvidia-container-cli does not know",
                              f"use some of: {', '.join(CAPABILITIES)}, or all")
        result.append(f"--{capability}")
    if "NVIDIA_DISABLE_REQUIRE" not in environ:
        result += [f"--require={environ[k]}" for k in sorted(environ)
                   if k.startswith("NVIDIA_REQUIRE_")]
    return [*result, f"--ldconfig=@{ldconfig}"]


def configure(argv: list[str], host_root: int, rootfs: str, userns: bool) -> None:
    """Run ``nvidia-container-cli [--user] configure FLAGS ROOTFS`` on the host's root
    (*host_root*, an fd kept from before the switch), in this process's namespaces.

    *rootfs* is the container's root as this process sees it; *userns*: whether this is
    a user namespace (``--user``: it then asks for no privileges of the host).
    """
    from capsid.image.stock import DEFAULT_PATH
    from capsid.runtime import linux

    parent = os.getpid()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.fchdir(host_root)
            os.chroot(".")
            linux.raise_ambient(_CAPS)
            root = f"/proc/{parent}/root{rootfs}"
            user = ["--user"] if userns else []
            os.execve(argv[0], [argv[0], *user, "configure", *argv[1:], root],
                      {**os.environ, "PATH": DEFAULT_PATH})
        except OSError as err:
            os.write(2, f"capsid: cannot run {argv[0]}: {err.strerror}\n".encode())
        os._exit(127)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeSetupError(f"nvidia-container-cli failed (exit status {code}) setting up "
                                "the GPUs", "see its message above; without privileges it "
                                "needs --fakeroot, or use --nv instead of --nvccli")


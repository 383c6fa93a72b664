"""``Bootstrap: debootstrap``: a Debian or Ubuntu root made by mmdebstrap, without root.

Apptainer runs ``debootstrap`` as real root (and documents that it fails under
--fakeroot). capsid runs ``mmdebstrap --mode=root`` as root in a user namespace with
the build steps' root emulation (:mod:`capsid.runtime.rootemu`): its chown, mknod and
set*id calls succeed, and where subordinate ids are mapped the owners are real.
Nothing is mounted in the new root (``--skip=chroot/mount``): the package scripts of a
minimal system do not need /proc, /sys or /dev.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from capsid import tools
from capsid.errors import CapsidError

VARIANT = "minbase"  #: what Apptainer's debootstrap bootstrap installs


def argv(suite: str, mirror: str, include: list[str], arch: str, target: Path,
         quiet: bool) -> list[str]:
    """mmdebstrap's command line for *suite* from *mirror* into *target*."""
    exe = tools.find("mmdebstrap")
    if exe is None:
        raise CapsidError("Bootstrap: debootstrap needs mmdebstrap on the host",
                          "apt-get install mmdebstrap, or start from an image: "
                          "Bootstrap: docker, From: debian:12")
    # the package lists stay, as debootstrap leaves them: Apptainer's own Debian example
    # runs apt-get install in %post without apt-get update
    args = [exe, "--mode=root", f"--variant={VARIANT}", "--format=directory",
            "--skip=chroot/mount", "--skip=cleanup/apt/lists", f"--architectures={arch}",
            '--aptopt=APT::Sandbox::User "root"']
    if include:
        args.append("--include=" + ",".join(include))
    if quiet:
        args.append("--quiet")
    return [*args, suite, str(target), mirror]


def run(command: list[str], target: Path) -> None:
    """Run mmdebstrap as root in a user and mount namespace of its own, then tidy /dev."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child ends in execv or _exit
        try:
            from capsid.runtime import identity, linux, rootemu, userns

            linux.parent_death_signal(9)  # nothing outlives a killed build
            userns.enter(identity.User.current(), True, subordinate_ids=False)
            linux.unshare(linux.CLONE_NEWNS)
            linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
            rules = rootemu.prepare(fake_owners=userns.mapped_ids() == 1)
            linux.no_new_privs()
            rootemu.load(rules)
            os.execv(command[0], command)
        except BaseException as err:  # the parent reports the status
            print(f"capsid: error: cannot start mmdebstrap: {err}", file=sys.stderr)
        os._exit(127)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise CapsidError(f"mmdebstrap failed (exit code {code})",
                          "check OSVersion (the suite), MirrorURL and Include; its messages "
                          "are above")
    dev = target / "dev"
    for entry in os.scandir(dev) if dev.is_dir() else ():
        if entry.is_file(follow_symlinks=False):  # written where a device was expected
            os.unlink(entry.path)

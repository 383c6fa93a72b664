"""Root emulation: the system calls package managers need, answered "done".

A build step runs as root in a user namespace that maps only the invoking user, with
no /etc/subuid needed. There, changing a file's owner to anyone but root, switching
to another user or creating a device fails, and ``apt-get``/``dpkg``/``dnf`` stop at the
first such failure. A seccomp filter (libseccomp, through ``pyseccomp``) makes those
calls return success without doing anything, as Charliecloud's ``--force=seccomp``
does: chown and friends, set*id and setgroups, and mknod of character and block
devices. Everything else is allowed. Files keep the user (root inside) as owner.
fsync and its kin are answered the same way (dpkg calls them for every file it
unpacks): the builder flushes a step's layer once, with syncfs, before keeping it.

``--fakeroot`` where only the user is mapped (no subordinate ids) gets the same filter,
but for the flushes: what Apptainer does there with its ``fakeroot`` command, so that
``apt-get`` works in a writable sandbox (``--ignore-fakeroot-command`` turns it off).

The filter is built before ``pivot_root`` (which hides the host's libraries) and loaded
just before ``execve``, after ``PR_SET_NO_NEW_PRIVS``.
"""

from __future__ import annotations

import stat

from capsid.errors import CapsidError

#: apt drops to the _apt user for downloads; with set*id feigned it cannot tell it did
#: not, and gives up: this configuration (``APT_CONFIG``) keeps it root.
APT_CONFIG = 'APT::Sandbox::User "root";\n'
#: where a ``--fakeroot`` container without subordinate ids finds it
APT_FILE = "/.capsid-apt.conf"

#: Answered with success and no effect.
FAKED = ("chown", "fchown", "lchown", "fchownat", "setuid", "setgid", "setreuid", "setregid",
         "setresuid", "setresgid", "setgroups", "setfsuid", "setfsgid")
#: Durability calls: a build step's files are flushed once, when its layer is kept
#: (:meth:`capsid.build.store.Pending.publish`), not file by file as dpkg asks.
SYNCS = ("fsync", "fdatasync", "sync_file_range", "syncfs", "sync")
#: mknod's mode argument: (system call, argument index).
_MKNOD = (("mknod", 1), ("mknodat", 2))
_S_IFMT = 0o170000  #: the file-type bits of a mode


def prepare(fake_owners: bool = True, fake_syncs: bool = True) -> object:
    """The filter, ready to load (libseccomp is loaded now).

    Without *fake_owners* (more ids than root are mapped) only device nodes (and the
    flushes) are faked; without *fake_syncs* (not a build step, whose layer is flushed
    once) the flushes are real.
    """
    try:
        import pyseccomp as seccomp  # type: ignore[import-untyped]
    except (ImportError, OSError) as err:
        raise CapsidError(f"root emulation (builds, --fakeroot) needs pyseccomp and libseccomp "
                          f"({err})", "pip install pyseccomp; apt-get install libseccomp2"
                          ) from None
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    for call in (*(FAKED if fake_owners else ()), *(SYNCS if fake_syncs else ())):
        rules.add_rule(seccomp.ERRNO(0), call)
    for call, index in _MKNOD:
        for kind in (stat.S_IFCHR, stat.S_IFBLK):
            rules.add_rule(seccomp.ERRNO(0), call,
                           seccomp.Arg(index, seccomp.MASKED_EQ, _S_IFMT, kind))
    return rules


def load(rules: object) -> None:
    """Install *rules* (from :func:`prepare`) for this process and what it runs."""
    rules.load()  # type: ignore[attr-defined]

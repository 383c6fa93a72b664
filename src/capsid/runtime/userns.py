"""Entering a user namespace: the user as themself, or as root with --fakeroot."""

from __future__ import annotations

import os

from capsid import tools
from capsid.errors import RuntimeSetupError
from capsid.runtime import identity, linux

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


def _userns_error(err: OSError) -> RuntimeSetupError:
    return RuntimeSetupError(
        f"cannot create a user namespace: {err.strerror}",
        "unprivileged user namespaces are disabled on this host; an administrator can enable "
        "them with sysctl user.max_user_namespaces=15000 (Debian: kernel."
        "unprivileged_userns_clone=1; Ubuntu: kernel.apparmor_restrict_unprivileged_userns=0)")


def subordinate_range(user: identity.User, path: str) -> tuple[int, int] | None:
    """The first range of at least 65536 ids that *path* (/etc/subuid or /etc/subgid) grants."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (user.name, str(user.uid)) \
                and fields[1].isdigit() and fields[2].isdigit() and int(fields[2]) >= 65536:
            return int(fields[1]), int(fields[2])
    return None


def id_maps() -> tuple[str, str]:
    """This process's user namespace's uid_map and gid_map."""
    with open("/proc/self/uid_map") as f, open("/proc/self/gid_map") as g:
        return f.read(), g.read()


def mapped_ids() -> int:
    """How many user ids this process's user namespace maps (4294967295 on the host)."""
    return sum(int(line.split()[2]) for line in id_maps()[0].splitlines() if line.strip())


#: Inside a root build's namespace, host id N is seen as HOST_ALIAS + N (for N below
#: 65536): how the builder still reads the recipe's context and gives the output to root.
HOST_ALIAS = 65536


def enter_for_build(user: identity.User) -> bool:
    """Move this (single-threaded) process into the user namespace a whole build runs in.

    With subordinate ids granted in /etc/subuid and /etc/subgid (and newuidmap), the
    user becomes root and ids 1… map onto the range, so the owners that package
    managers set are real, as in buildah or Apptainer's --fakeroot. The build's own
    files, its cache and its output stay the user's.

    The host's root builds in a namespace whose root is an unused range of host ids
    (:data:`capsid.hostfs.ROOT_BUILD_IDS`); the host's ids are there too, shifted by
    :data:`HOST_ALIAS`, for the builder itself, never for the steps (see
    :func:`enter`). Returns False, changing nothing, without ranges: then each step
    maps the user alone.
    """
    from capsid import hostfs

    if user.uid == 0:
        if mapped_ids() != 0xFFFFFFFF:
            return False  # root of a namespace already: its steps map what it has
        _enter_root_build()
        return True
    if not _ranges(user):
        return False
    enter(user, True)
    hostfs.entered_namespace(user.uid)
    return True


def _enter_root_build() -> None:
    from capsid import hostfs

    start, count = hostfs.ROOT_BUILD_IDS
    text = f"0 {start} {count}\n{HOST_ALIAS} 0 {HOST_ALIAS}\n"
    _unshare_with_maps(text, text, "cannot map the build's ids into a new user namespace")
    # The host's root is HOST_ALIAS here: become the namespace's root, the build's owner.
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)
    hostfs.entered_namespace(0, HOST_ALIAS)


def _ranges(user: identity.User) -> tuple[tuple[int, int], tuple[int, int],
                                          tuple[str, str]] | None:
    subuid = subordinate_range(user, "/etc/subuid")
    subgid = subordinate_range(user, "/etc/subgid")
    newuidmap, newgidmap = tools.find("newuidmap"), tools.find("newgidmap")
    if subuid and subgid and newuidmap and newgidmap:
        return subuid, subgid, (newuidmap, newgidmap)
    return None


def enter(user: identity.User, fakeroot: bool, *, subordinate_ids: bool = True) -> None:
    """A new user namespace: *user* as themself, or as root with *fakeroot*.

    With --fakeroot and subordinate ids granted in /etc/subuid and /etc/subgid, ids
    1… map onto that range through newuidmap/newgidmap, so package managers can
    create their users; otherwise only root exists inside. Root (on the host, or in
    a build's namespace) keeps every id it has: the new namespace maps them as they are.
    """
    if fakeroot and os.geteuid() == 0 and mapped_ids() > 1:
        _enter_identity()
        return
    uid, gid = user.uid, user.gid
    ranges = None
    if fakeroot and user.uid != 0 and subordinate_ids:
        ranges = _ranges(user)
    if ranges is None:
        try:
            linux.unshare(linux.CLONE_NEWUSER)
        except OSError as err:
            raise _userns_error(err) from None
        inside_uid, inside_gid = (0, 0) if fakeroot else (uid, gid)
        linux.write_id_maps(f"{inside_uid} {uid} 1\n", f"{inside_gid} {gid} 1\n")
        return
    (uid_start, uid_count), (gid_start, gid_count), (newuidmap, newgidmap) = ranges

    def write_maps(target: int) -> bool:  # pragma: no cover - runs in the child
        for exe, own, first, count in ((newuidmap, uid, uid_start, uid_count),
                                       (newgidmap, gid, gid_start, gid_count)):
            pid = os.fork()
            if pid == 0:
                os.execv(exe, [exe, str(target), "0", str(own), "1", "1", str(first),
                               str(count)])
            if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
                return False
        return True

    _unshare_mapped(write_maps, RuntimeSetupError(
        "newuidmap/newgidmap could not map your subordinate ids",
        "check /etc/subuid and /etc/subgid, or run without --fakeroot"))


def _unshare_mapped(write_maps: Callable[[int], bool], failure: RuntimeSetupError) -> None:
    """A new user namespace whose id maps a child writes from outside it.

    Only a process outside the new namespace (with CAP_SETUID there) may map more than
    its own id: the child waits until this process has unshared, then calls
    ``write_maps(pid)``; *failure* is raised if it returns False.
    """
    ready_r, ready_w = os.pipe()
    target = os.getpid()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 3
        try:
            os.close(ready_w)
            code = 0 if os.read(ready_r, 1) == b"u" and write_maps(target) else 2
        finally:
            os._exit(code)
    os.close(ready_r)
    try:
        linux.unshare(linux.CLONE_NEWUSER)
    except OSError as err:
        os.close(ready_w)
        os.waitpid(child, 0)
        raise _userns_error(err) from None
    os.write(ready_w, b"u")
    os.close(ready_w)
    if os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) != 0:
        raise failure


def _unshare_with_maps(uid_map: str, gid_map: str, failure: str) -> None:
    """A new user namespace with these maps, written by a child from the current one."""
    def write_maps(target: int) -> bool:  # pragma: no cover - runs in the child
        for name, text in (("uid_map", uid_map), ("gid_map", gid_map)):
            with open(f"/proc/{target}/{name}", "w") as f:
                f.write(text)
        return True

    _unshare_mapped(write_maps, RuntimeSetupError(
        failure, "run again with --debug; this may be a bug in capsid"))


def _identity_maps() -> tuple[str, str]:
    """Maps of a new user namespace that keeps every id of the current one as it is."""
    uid_map, gid_map = (
        "".join(f"{f[0]} {f[0]} {f[2]}\n" for f in map(str.split, text.splitlines()))
        for text in id_maps())
    return uid_map, gid_map


def _enter_identity() -> None:
    """A new user namespace mapping every id of the current one onto itself."""
    _unshare_with_maps(*_identity_maps(), "cannot map root's ids into a new user namespace")


def confine_build_step() -> None:
    """The last thing before a build step's command (or a root build's %test): a user
    namespace of its own, which owns none of the mounts the step sees, so that it cannot
    undo a read-only one (``/proc/sys``) or uncover what they hide. In a root build it
    holds only the image's ids (those :data:`capsid.hostfs.ROOT_BUILD_IDS` stand for): the
    host's ids that the builder used to set the step up are gone, and with them any way
    to act as the host's root."""
    from capsid import hostfs

    if hostfs.host_alias() is not None:
        uid_map = gid_map = f"0 0 {HOST_ALIAS}\n"
    else:
        uid_map, gid_map = _identity_maps()
    _unshare_with_maps(uid_map, gid_map, "cannot confine the build step to its own ids")

"""Launching a container: namespaces, the root, binds and identity, then the command.

Everything happens in the calling process, which finally ``execve``s the command:
the command keeps capsid's PID, so its exit status, signals and terminal pass
through untouched. Only ``--pid`` needs a parent to stay behind (see
:mod:`capsid.runtime.pid1`). Library callers use :mod:`capsid.runtime.api`.
"""

from __future__ import annotations

import os

import capsid
from capsid import log
from capsid.errors import RuntimeSetupError
from capsid.image.locate import SANDBOX, Image
from capsid.runtime import (
    command,
    early,
    identity,
    linux,
    mounts,
    ops,
)
from capsid.runtime import plan as planning

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

    from capsid.runtime.options import Layers, Options
    from capsid.runtime.plan import Plan


LOG = log.get(__name__)
#: where the overlay image's servers write their messages, in the session
_OVERLAY_LOG = "files/overlay-image.log"


def _open_image(image: Image, started: early.Started) -> int:
    """The image, or the directory it was unpacked to for the job (in this mount
    namespace: a bind mount's source must be in it)."""
    if started.unpacked is not None:
        return os.open(started.unpacked, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if image.kind == SANDBOX else 0)
    return os.open(image.path, flags)


def _mount_image(plan: Plan, opts: Options, fd: int, started: early.Started) -> None:
    image, fuse_mount = plan.image, started.fuse_mount
    target = f"{mounts.SESSION}{mounts.IMAGE}"
    if image.kind == SANDBOX:
        mounts.bind_sandbox(fd)
    elif fuse_mount is not None:
        # both imported by early.start, before the session covered /tmp
        from capsid.runtime import fuse, prefetch

        if isinstance(fuse_mount, fuse.Served):
            fuse_mount.attach(target)
            return
        fuse.mount(fuse_mount, target)
        prefetch.start(os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC),
                       started.first_programs)
    elif started.unpacked is not None:  # unpacked once for the job on this node
        mounts.bind_unpacked(fd)
    elif not plan.userns and not opts.unsquash:
        mounts.mount_kernel_squashfs(fd, image.offset)
    else:
        mounts.unpack_image(fd, image.offset)


def _check_served(image: Image) -> None:
    """Fail clearly if squashfuse could not serve the image (it waits for the server)."""
    try:
        os.stat(f"{mounts.SESSION}{mounts.IMAGE}")
    except OSError as err:
        raise RuntimeSetupError(
            f"squashfuse could not read {image.path} ({err.strerror}): its squashfs "
            "filesystem is damaged or of a kind squashfuse does not know",
            f"check it with 'unsquashfs -s -o {image.offset} {image.path}', or rebuild it"
        ) from None


def launch(image: str | Layers, action: str, argv: tuple[str, ...], opts: Options,
           started: early.Started) -> NoReturn:
    """Run the container in place of this process (after :func:`early.start`)."""
    name = image if isinstance(image, str) else image.name
    capsid.mark("container runtime imported")
    plan = planning.make(name, action, argv, opts, started)
    capsid.mark("planned")
    early.share_one_cpu(started)
    try:
        linux.unshare(linux.namespace_flags(pid=opts.pid, ipc=opts.ipc, net=opts.net,
                                            uts=opts.uts or bool(opts.hostname)))
    except OSError as err:
        raise RuntimeSetupError(f"cannot create namespaces: {err.strerror}",
                                "run without --pid/--ipc/--uts/--net, or ask an administrator "
                                "to allow them") from None
    status_pipe = -1
    if opts.pid:
        from capsid.runtime import pid1  # only --pid needs it

        early.release_server(started)

        reader, status_pipe = os.pipe()
        child = os.fork()
        if child:
            os.close(status_pipe)
            pid1.supervise(child, reader)
        os.close(reader)
        linux.parent_death_signal(9)  # SIGKILL: die with the supervisor
    if opts.hostname:
        from capsid.runtime import isolation

        isolation.set_hostname(opts.hostname)
    if opts.net:
        from capsid.runtime import isolation

        isolation.loopback_up()
    filter_ = None
    if plan.confined:
        from capsid.runtime import userns  # now: command.run confines the command with it
    if plan.build_step:
        from capsid.runtime import (
            rootemu,  # now: pivot_root hides the host's libraries
            userns,
        )

        # Where ids besides root are mapped (subordinate ids, or root's), owners are real.
        filter_ = rootemu.prepare(fake_owners=userns.mapped_ids() == 1)
    elif plan.feigned_root:
        from capsid.runtime import rootemu  # as above

        filter_ = rootemu.prepare(fake_syncs=False)
    env = _assemble_root(plan, started)
    capsid.mark("mounted")
    command.enter_cwd(plan)
    early.release_cpus(started)  # before --pid's fork: the server is not in its PID namespace
    if opts.pid:
        from capsid.runtime import pid1  # imported above, before pivot_root

        child = os.fork()
        if child:
            pid1.init(child, status_pipe)
        os.close(status_pipe)
    command.run(plan, env, filter_)


def join(image: str, action: str, argv: tuple[str, ...], opts: Options,
         enter: Callable[[], None]) -> NoReturn:
    """Run *action* in a container that runs already (a shared one, an instance):
    *enter* joins its namespaces and root. The plan is made as for a start, for the
    command, its environment and its working directory; the mounts are there."""
    from capsid.errors import CapsidError
    from capsid.image.locate import locate

    try:
        image_found = locate(image)
    except (OSError, CapsidError):  # gone since: it is read only for its OCI config
        image_found = Image(image, SANDBOX)
    started = early.Started(image_found, identity.User.current(), True, None, [], None)
    plan = planning.make(image, action, argv, opts, started)
    if any(isinstance(op, ops.LibraryPath) and op.gpu is not None for op in plan.mounts):
        from capsid import glibc  # noqa: F401 - now: the container's root hides them
        from capsid.gpu import compat  # noqa: F401
    enter()
    added = ops.environment(plan.mounts, "/", warn=False)
    command.enter_cwd(plan)
    command.run(plan, added)


def assemble_for_sharing(image: str, opts: Options, started: early.Started) -> None:
    """Set up the root of a container that ranks join (:mod:`capsid.runtime.sharens`):
    what :func:`launch` does, short of running a command."""
    plan = planning.make(image, "exec", (), opts, started)
    # the container's own mount namespace: the image server's stays behind
    linux.unshare(linux.namespace_flags(pid=False, ipc=False, net=False, uts=False))
    early.share_one_cpu(started)
    _assemble_root(plan, started)
    early.release_cpus(started)


def _open_overlay(opts: Options) -> tuple[str | None, bool, int | None]:
    """--overlay's path, whether it is read-only, and an overlay image opened and locked
    (now, before the session's tmpfs may cover it)."""
    if not opts.overlay:
        return None, False, None
    from capsid.runtime import overlayimg

    path, readonly = overlayimg.split(opts.overlay)
    if overlayimg.is_image(path):
        if not readonly:
            from capsid.runtime import fuse  # noqa: F401 - used once the session covers /tmp
        return path, readonly, overlayimg.open_locked(os.path.realpath(path), readonly)
    return path, readonly, None


def _overlay(path: str | None, readonly: bool, image_fd: int | None) -> str | None:
    """The overlay as the session sees it after the switch. An overlay image is mounted
    now, while the host's fuse2fs can still be run."""
    if path is None:
        return None
    if image_fd is None:
        return f"{mounts.OLD}{os.path.realpath(path)}"
    if not readonly:
        return "/overlay-image"  # served with the image: see _assemble_root
    from capsid.runtime import overlayimg

    os.mkdir(f"{mounts.SESSION}/overlay-image")
    overlayimg.serve(image_fd, f"{mounts.SESSION}/overlay-image", readonly,
                     f"{mounts.SESSION}/{_OVERLAY_LOG}")
    return "/overlay-image"


def _assemble_root(plan: Plan, started: early.Started) -> ops.Environment:
    """The session, the image, the overlay and every mount, then pivot_root into it.
    Returns the variables the mounts call for."""
    opts = plan.options
    # The image is opened before the session covers /tmp, where it may lie.
    layers = plan.layers
    if layers is not None:
        fds = mounts.open_layers((*layers.lowers, layers.upper, layers.work))
    else:
        fd = _open_image(plan.image, started)
    overlay_path, overlay_ro, overlay_fd = _open_overlay(opts)
    nvccli = plan.nvccli
    # nvidia-container-cli runs on the host's root, reached later through this
    host_root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) if nvccli else -1
    mounts.start_session(opts.tmpfs_size_mib or plan.site.tmpfs_size_mib)
    overlay = _overlay(overlay_path, overlay_ro, overlay_fd) if overlay_fd is None else \
        early.on_all_cpus(started, lambda: _overlay(overlay_path, overlay_ro, overlay_fd))
    if layers is not None:
        mounts.enter_session()
        mounts.stack_lowers(fds[:-2])
        mounts.prepare_upper(plan.mount_points(mounts.OLD))
        mounts.mount_layers(fds[-2], fds[-1], fds[:-2])
        for each in fds:
            os.close(each)
    else:
        _mount_image(plan, opts, fd, started)
        os.close(fd)
        if started.fuse_mount is not None:
            _check_served(plan.image)
        stacked = None
        if overlay_fd is not None and not overlay_ro:
            from capsid.runtime import overlayimg

            stacked = early.on_all_cpus(started, lambda: overlayimg.serve_writable(
                overlay_fd, f"{mounts.SESSION}{mounts.IMAGE}",
                f"{mounts.SESSION}/overlay-image", f"{mounts.SESSION}/{_OVERLAY_LOG}"))
        mounts.enter_session()
        stack = plan.site.overlay or overlay is not None or opts.writable_tmpfs
        if (overlay is None or overlay_ro) and not opts.writable and stack:
            mounts.prepare_upper(plan.mount_points(mounts.OLD))
        if stacked is not None:
            linux.attach(stacked, mounts.FINAL)
            os.close(stacked)
        else:
            try:
                mounts.make_root(None if overlay_ro else overlay, userns=plan.userns,
                                 writable_image=opts.writable,
                                 lower=f"{overlay}/upper" if overlay_ro else None,
                                 writable_tmpfs=opts.writable_tmpfs, stack=stack)
            except RuntimeSetupError as err:
                if overlay_fd is not None and overlay_ro:
                    from capsid.runtime import overlayimg

                    said = overlayimg.ended(f"/{_OVERLAY_LOG}")
                    if said:  # its server ended: the kernel is not what failed
                        raise RuntimeSetupError(f"{err.message} ({said})",
                                                "check the overlay image with e2fsck -f, "
                                                "then run again") from None
                raise
    env = ops.run(plan.mounts)
    if nvccli:
        from capsid.gpu import nvccli as cli

        cli.configure(nvccli, host_root, mounts.FINAL, plan.userns)
        os.close(host_root)
    writable = opts.writable or opts.writable_tmpfs or (overlay and not overlay_ro) \
        or plan.layers is not None or bool(nvccli)
    mounts.finish(readonly_root=not writable)
    return env

"""Launching a container: namespaces, the root, binds and identity, then the command.

Everything happens in the calling process, which finally ``execve``s the command:
the command keeps capsid's PID, so its exit status, signals and terminal pass
through untouched. Only ``--pid`` needs a parent to stay behind (see
:mod:`capsid.runtime.pid1`). Library callers use :mod:`capsid.runtime.api`.
"""

from __future__ import annotations

import os

from capsid import hostfs, inroot, log
from capsid.errors import RuntimeSetupError
from capsid.image.locate import SANDBOX, Image
from capsid.runtime import (
    command,
    early,
    hostmounts,
    identity,
    isolation,
    linux,
    mounts,
    prefetch,
)
from capsid.runtime import plan as planning

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

    from capsid.runtime.options import Layers, Options
    from capsid.runtime.plan import Plan


LOG = log.get(__name__)


def _open_image(image: Image) -> int:
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if image.kind == SANDBOX else 0)
    return os.open(image.path, flags)


def _mount_image(plan: Plan, opts: Options, fd: int, started: early.Started) -> None:
    image, fuse_mount = plan.image, started.fuse_mount
    target = f"{mounts.SESSION}{mounts.IMAGE}"
    if image.kind == SANDBOX:
        mounts.bind_sandbox(fd)
    elif fuse_mount is not None:
        from capsid.runtime import fuse  # imported by early.start, before /tmp was covered

        if isinstance(fuse_mount, fuse.Served):
            fuse_mount.attach(target)
            return
        fuse.mount(fuse_mount, target)
        prefetch.start(os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC),
                       started.first_programs)
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


def _default_mounts(plan: Plan, opts: Options) -> None:
    site, no = plan.site, set(opts.no_mount)
    if opts.root_emulation:  # a build step: it may read the kernel's knobs, never set them
        _build_step_mounts()
        return
    if site.mount_proc and "proc" not in no:
        mounts.mount_proc(opts.pid)
    if site.mount_sys and "sys" not in no:
        mounts.bind_into("/sys", "/sys", required=False)
    if "dev" not in no:
        if opts.contain or site.mount_dev == "minimal":
            mounts.mount_minimal_dev()
        elif site.mount_dev != "no":
            mounts.bind_into("/dev", "/dev", nodev=False, required=False)
    if "bind-paths" not in no:
        for spec in site.bind_paths:
            src, _, dst = spec.partition(":")
            if src in no or (dst or src) in no:
                continue
            mounts.bind_into(os.path.realpath(src), dst or src, required=False)


def _build_step_mounts() -> None:
    """What a RUN or %post step gets of the host: a /proc of its own PID namespace with
    the kernel's settings read-only (as Docker masks them), /sys read-only (the host
    owns its files besides), a minimal /dev, and copies of /etc/hosts and /etc/resolv.conf
    (a step may edit them; the host's files never change)."""
    mounts.mount_proc(True)
    mounts.protect_proc()
    mounts.bind_into("/sys", "/sys", readonly=True, required=False)
    mounts.mount_minimal_dev()
    for name in ("/etc/hosts", "/etc/resolv.conf"):
        content = _host_file(name)
        if content is not None:
            mounts.bind_file(content, name.rsplit("/", 1)[1], name)


def _host_file(path: str) -> bytes | None:
    try:  # the host's own file; its links are followed inside the host's root
        return hostfs.read_in(mounts.OLD, path)
    except (OSError, hostfs.Refused):
        return None


def _container_mounts(plan: Plan, opts: Options) -> None:
    _default_mounts(plan, opts)
    if plan.mpi is not None:
        hostmounts.mpi_mounts(plan)
    if plan.gpu is not None:
        hostmounts.device_mounts(plan, opts)
    if plan.home_source is not None:
        mounts.bind_into(plan.home_source, plan.home_dest)
    elif plan.home_empty:
        mounts.private_home(plan.home_dest, opts.workdir)
    else:
        mounts.ensure_target(mounts.FINAL, plan.home_dest, True)
    # /tmp before the binds, which may lie under it (-B /tmp/x with --contain)
    if plan.site.mount_tmp and "tmp" not in opts.no_mount:
        if opts.contain:
            mounts.private_tmp(opts.workdir)
        else:
            mounts.bind_into("/tmp", "/tmp", required=False)
            mounts.bind_into(os.path.realpath("/var/tmp"), "/var/tmp", required=False)
    for b in plan.binds:
        if b.scratch:
            mounts.overlay_into(b.source, b.scratch, b.destination)
        else:
            mounts.bind_into(b.source, b.destination, readonly=b.readonly)
    if not (opts.fakeroot or opts.root_emulation):
        passwd = _read_image_file("/etc/passwd")
        if passwd is None:
            LOG.info("the image has no /etc/passwd; adding one")
        mounts.bind_file(identity.passwd(passwd, plan.user, plan.home_dest), "passwd",
                         "/etc/passwd")
        mounts.bind_file(identity.group(_read_image_file("/etc/group"), plan.user), "group",
                         "/etc/group")
    if opts.dns:
        mounts.bind_file("".join(f"nameserver {ip}\n" for ip in opts.dns).encode(),
                         "resolv.conf", "/etc/resolv.conf")
    elif os.path.exists(f"{mounts.OLD}/etc/resolv.conf") and not opts.root_emulation:
        mounts.bind_into(os.path.realpath("/etc/resolv.conf"), "/etc/resolv.conf",
                         required=False)
    for directory in opts.scratch:
        mounts.scratch_dir(directory, opts.workdir)
    if opts.hostname:
        mounts.bind_file(f"{opts.hostname}\n".encode(), "hostname", "/etc/hostname")
    if plan.bind_cwd:
        mounts.bind_into(plan.cwd, plan.cwd, required=False)


def _read_image_file(path: str) -> bytes | None:
    root = os.open(mounts.FINAL, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = inroot.open_file(root, path)
    finally:
        os.close(root)
    if fd is None:
        return None
    with open(fd, "rb") as f:
        return f.read(1 << 24)


def launch(image: str | Layers, action: str, argv: tuple[str, ...], opts: Options,
           started: early.Started) -> NoReturn:
    """Run the container in place of this process (after :func:`early.start`)."""
    name = image if isinstance(image, str) else image.name
    plan = planning.make(name, action, argv, opts, started)
    try:
        linux.unshare(isolation.flags(pid=opts.pid, ipc=opts.ipc, net=opts.net,
                                      uts=opts.uts or bool(opts.hostname)))
    except OSError as err:
        raise RuntimeSetupError(f"cannot create namespaces: {err.strerror}",
                                "run without --pid/--ipc/--uts/--net, or ask an administrator "
                                "to allow them") from None
    status_pipe = -1
    if opts.pid:
        from capsid.runtime import pid1  # only --pid needs it

        reader, status_pipe = os.pipe()
        child = os.fork()
        if child:
            os.close(status_pipe)
            pid1.supervise(child, reader)
        os.close(reader)
        linux.parent_death_signal(9)  # SIGKILL: die with the supervisor
    if opts.hostname:
        isolation.set_hostname(opts.hostname)
    if opts.net:
        isolation.loopback_up()
    filter_ = None
    if opts.root_emulation or hostfs.host_alias() is not None:
        from capsid.runtime import userns  # now: command.run confines the command with it
    if opts.root_emulation:
        from capsid.runtime import (
            rootemu,  # now: pivot_root hides the host's libraries
            userns,
        )

        # Where ids besides root are mapped (subordinate ids, or root's), owners are real.
        filter_ = rootemu.prepare(fake_owners=userns.mapped_ids() == 1)
    _assemble_root(plan, started)
    target = plan.cwd if os.path.isdir(plan.cwd) else plan.home_dest
    try:
        os.chdir(target)
    except OSError:
        LOG.warning("%s does not exist in the container; starting in /", plan.cwd)
        os.chdir("/")
    if opts.pid:
        from capsid.runtime import pid1  # imported above, before pivot_root

        child = os.fork()
        if child:
            pid1.init(child, status_pipe)
        os.close(status_pipe)
    if started.fuse_mount is not None:
        started.fuse_mount.reap()
    if started.affinity is not None:
        os.sched_setaffinity(0, started.affinity)
    command.run(plan, filter_)


def assemble_for_sharing(image: str, opts: Options, started: early.Started) -> None:
    """Set up the root of a container that ranks join (:mod:`capsid.runtime.sharens`):
    what :func:`launch` does, short of running a command."""
    plan = planning.make(image, "exec", (), opts, started)
    # the container's own mount namespace: the image server's stays behind
    linux.unshare(isolation.flags(pid=False, ipc=False, net=False, uts=False))
    _assemble_root(plan, started)
    if started.fuse_mount is not None:
        started.fuse_mount.reap()
    if started.affinity is not None:
        os.sched_setaffinity(0, started.affinity)


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
                     f"{mounts.SESSION}/files/overlay-image.log")
    return "/overlay-image"


def _assemble_root(plan: Plan, started: early.Started) -> None:
    """The session, the image, the overlay and every mount, then pivot_root into it."""
    opts = plan.options
    # The image is opened before the session covers /tmp, where it may lie.
    layers = plan.layers
    if layers is not None:
        fds = mounts.open_layers((*layers.lowers, layers.upper, layers.work))
    else:
        fd = _open_image(plan.image)
    overlay_path, overlay_ro, overlay_fd = _open_overlay(opts)
    nvccli = plan.gpu.nvccli if plan.gpu is not None else None
    # nvidia-container-cli runs on the host's root, reached later through this
    host_root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) if nvccli else -1
    mounts.start_session(opts.tmpfs_size_mib or plan.site.tmpfs_size_mib)
    overlay = _overlay(overlay_path, overlay_ro, overlay_fd)
    if layers is not None:
        mounts.enter_session()
        mounts.stack_lowers(fds[:-2])
        mounts.prepare_upper(plan.mount_points(mounts.OLD))
        mounts.mount_layers(fds[-2], fds[-1], len(layers.lowers))
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

            stacked = overlayimg.serve_writable(overlay_fd, f"{mounts.SESSION}{mounts.IMAGE}",
                                                f"{mounts.SESSION}/overlay-image",
                                                f"{mounts.SESSION}/files/overlay-image.log")
        mounts.enter_session()
        if (overlay is None or overlay_ro) and not opts.writable:
            mounts.prepare_upper(plan.mount_points(mounts.OLD))
        if stacked is not None:
            linux.attach(stacked, mounts.FINAL)
            os.close(stacked)
        else:
            mounts.make_root(None if overlay_ro else overlay, userns=plan.userns,
                             writable_image=opts.writable,
                             lower=f"{overlay}/upper" if overlay_ro else None)
    _container_mounts(plan, opts)
    if nvccli:
        from capsid.gpu import nvccli as cli

        cli.configure(nvccli, host_root, mounts.FINAL, plan.userns)
        os.close(host_root)
    writable = opts.writable or opts.writable_tmpfs or (overlay and not overlay_ro) \
        or plan.layers is not None or bool(nvccli)
    mounts.finish(readonly_root=not writable)

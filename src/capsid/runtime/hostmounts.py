"""What the host lends a container: its GPU drivers and devices, and its MPI.

Bound after the default mounts and before the user's binds (which may cover them), by
:mod:`capsid.runtime.container`; decided earlier, on the host, by :mod:`capsid.gpu` and
:mod:`capsid.mpi.host`, which are imported by then (the host's files are out of reach
once the container's root is in place).
"""

from __future__ import annotations

import os

from capsid.runtime import mounts

TYPE_CHECKING = False
if TYPE_CHECKING:
    from capsid.runtime.options import Options
    from capsid.runtime.plan import Plan


def whole_host_dev(plan: Plan, opts: Options) -> bool:
    return "dev" not in opts.no_mount and not opts.contain and plan.site.mount_dev == "yes"


def device_mounts(plan: Plan, opts: Options) -> None:
    """--nv, --rocm, --device: the driver's files and device nodes, and CDI's symlinks.
    Then say which libraries the image's C library cannot load."""
    gpu = plan.gpu
    assert gpu is not None
    for name, source in gpu.libraries.items():
        mounts.bind_into(source, f"/.singularity.d/libs/{name}", readonly=True,
                         required=False)
    for each in gpu.mounts:
        mounts.bind_into(each.source, each.destination, readonly=each.readonly, required=False)
    whole_dev = whole_host_dev(plan, opts)
    for device in gpu.devices:
        if not (whole_dev and device.source == device.destination):
            mounts.bind_into(device.source, device.destination, nodev=False, required=False)
    for target, link in gpu.symlinks:
        mounts.symlink_into(target, link)
    if gpu.libraries or gpu.library_dirs:
        plan.library_path = gpu_library_path(plan, warn=True)


def gpu_library_path(plan: Plan, *, warn: bool, root: str = mounts.FINAL) -> str:
    """LD_LIBRARY_PATH for the GPU libraries of the container rooted at *root*: the
    image's own directories first, the driver's after them (Apptainer 1.5's order).
    With *warn*, say which libraries the image's C library cannot load."""
    from capsid import glibc
    from capsid.gpu import compat

    gpu = plan.gpu
    assert gpu is not None
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        version = glibc.image_glibc(fd)
        dirs = glibc.image_library_dirs(fd) if version is not None else []
    finally:
        os.close(fd)
    if warn:
        compat.warn_unloadable(gpu.library_glibc, version, gpu.option, len(gpu.libraries))
    return ":".join(dirs + [d for d in gpu.library_dirs if d not in dirs])


def mpi_mounts(plan: Plan) -> None:
    """--mpi host: the host's MPI libraries in one place, its plugin and data directories
    at their own paths; refused first if the image cannot use it."""
    from capsid.mpi import host

    mpi = plan.mpi
    assert mpi is not None
    root = os.open(mounts.FINAL, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        host.check(mpi, root)
    finally:
        os.close(root)
    for name, source in mpi.libraries.items():
        mounts.bind_into(source, f"{host.LIBS_DIR}/{name}", readonly=True, required=False)
    for directory in mpi.directories:
        mounts.bind_into(directory, directory, readonly=True, required=False)

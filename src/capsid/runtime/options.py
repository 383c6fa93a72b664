"""How to run a container, as typed records: what the action flags decide, and layered roots.

These are the runtime's whole input: the CLI builds an :class:`Options` from its flags,
the builder builds one for each RUN step, and :mod:`capsid.runtime.api` takes it.
Plain classes with ``__slots__`` (not dataclasses): this module is on every container's
start path, where each import counts.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from capsid.runtime.binds import BindSpec


#: variables a parallel launcher gives each rank: Open MPI and PMIx (mpirun, srun
#: --mpi=pmix), Slurm's job steps, MPICH's Hydra. Their ranks share a container per node.
LAUNCHER_VARIABLES = ("PMIX_NAMESPACE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_ID", "PMI_RANK",
                      "PMI_SIZE")


class Options:
    """Everything about a container but its image and command (Apptainer's action flags)."""

    __slots__ = ("app", "binds", "cdi_dirs", "cleanenv", "contain", "devices", "dns", "env",
                 "env_files", "environment", "fakeroot", "home", "hostname",
                 "ignore_fakeroot_command", "ignore_subuid",
                 "ipc", "mpi", "net", "no_env", "no_eval", "no_home", "no_https", "no_mount",
                 "no_nv",
                 "no_rocm",
                 "no_umask",
                 "nv", "nvccli", "overlay", "pid", "pwd", "rocm", "root_emulation", "scratch",
                 "sharens", "shell", "tmpfs_size_mib", "unsquash", "user", "uts", "workdir",
                 "writable", "writable_tmpfs")

    def __init__(self, *, binds: Sequence[BindSpec] = (), home: str | None = None,
                 no_home: bool = False, no_mount: Sequence[str] = (), contain: bool = False,
                 pwd: str | None = None, cleanenv: bool = False, env: Sequence[str] = (),
                 env_files: Sequence[str] = (), environment: Mapping[str, str] | None = None,
                 fakeroot: bool = False, pid: bool = False, ipc: bool = False,
                 uts: bool = False, hostname: str | None = None, net: bool = False,
                 writable: bool = False, writable_tmpfs: bool = False,
                 overlay: str | None = None, tmpfs_size_mib: int | None = None,
                 unsquash: bool = False, shell: str | None = None,
                 root_emulation: bool = False, user: str | None = None, nv: bool = False,
                 nvccli: bool = False, rocm: bool = False, devices: Sequence[str] = (),
                 cdi_dirs: Sequence[str] = (), sharens: bool | None = None,
                 mpi: str | None = None, no_umask: bool = False, dns: Sequence[str] = (),
                 workdir: str | None = None, scratch: Sequence[str] = (),
                 ignore_subuid: bool = False, no_nv: bool = False,
                 no_rocm: bool = False, no_https: bool = False, app: str | None = None,
                 ignore_fakeroot_command: bool = False, no_eval: bool = False,
                 no_env: Sequence[str] = ()) -> None:
        self.binds = tuple(binds)  #: host paths to bind in (``-B``, ``--mount``)
        self.home = home  #: ``--home SRC[:DST]``
        self.no_home = no_home
        self.no_mount = tuple(no_mount)  #: default mounts left out: proc, sys, dev, home, ...
        self.contain = contain  #: minimal /dev, no home, /tmp or cwd from the host
        self.pwd = pwd  #: working directory inside
        self.cleanenv = cleanenv  #: no host environment
        self.env = tuple(env)  #: ``--env NAME=VALUE`` items
        self.env_files = tuple(env_files)
        self.no_env = tuple(no_env)  #: host variables not passed in (``--no-env``)
        #: ``--env``/``--env-file``/``APPTAINERENV_`` values as given, not evaluated
        self.no_eval = no_eval
        #: the command's exact environment: no host variables and no image env scripts
        self.environment = dict(environment) if environment is not None else None
        self.fakeroot = fakeroot  #: uid 0 inside
        #: with --fakeroot where only the user is mapped, do not answer chown, set*id and
        #: device mknod with success (:mod:`capsid.runtime.rootemu`), as Apptainer's
        #: flag of that name skips its fakeroot command
        self.ignore_fakeroot_command = ignore_fakeroot_command
        self.pid, self.ipc, self.uts, self.net = pid, ipc, uts, net  #: new namespaces
        self.hostname = hostname
        self.writable = writable  #: write into a sandbox image
        self.writable_tmpfs = writable_tmpfs
        self.overlay = overlay  #: directory keeping changes to the image
        self.tmpfs_size_mib = tmpfs_size_mib
        self.unsquash = unsquash  #: unpack the image into memory instead of mounting it
        self.shell = shell  #: the shell of ``capsid shell``
        #: root inside may chown and mknod as package managers expect (a seccomp filter
        #: answers those calls with success); implies fakeroot
        self.root_emulation = root_emulation
        #: ``USER[:GROUP]`` (names or ids of the image's) to become before the command
        #: starts; needs those ids mapped (a build with subordinate ids, or root)
        self.user = user
        self.nv = nv  #: bind the host's NVIDIA driver (libraries, programs, devices)
        self.nvccli = nvccli  #: let nvidia-container-cli set the NVIDIA GPUs up
        self.rocm = rocm  #: bind the host's AMD ROCm driver
        self.devices = tuple(devices)  #: CDI devices, ``vendor/class=name``
        self.cdi_dirs = tuple(cdi_dirs)  #: where CDI specs are (default /etc/cdi, /var/run/cdi)
        #: share one container with the other ranks of the job on this node: None decides
        #: by the launcher's variables (see :mod:`capsid.runtime.sharens`)
        self.sharens = sharens
        #: "host": bind the host's MPI in (the bind model); "none"; None: the site's choice
        self.mpi = mpi
        self.no_umask = no_umask  #: start the command with umask 0022
        self.dns = tuple(dns)  #: name servers for /etc/resolv.conf instead of the host's
        #: with --contain: a host directory holding /tmp, /var/tmp and the home directory
        self.workdir = workdir
        self.scratch = tuple(scratch)  #: empty writable directories in the container
        self.ignore_subuid = ignore_subuid  #: --fakeroot maps the user alone
        #: no GPUs of that vendor, even where the site's configuration always binds them
        self.no_nv, self.no_rocm = no_nv, no_rocm
        self.no_https = no_https  #: a ``docker://`` image's registry over plain HTTP
        self.app = app  #: a SCIF app of the image: its environment, runscript and test

    def __setattr__(self, name: str, value: object) -> None:
        if hasattr(self, name):  # each is set once, by __init__
            raise AttributeError(f"Options are frozen: use .replace({name}=...)")
        object.__setattr__(self, name, value)

    def replace(self, **changes: object) -> Options:
        """A copy with *changes*."""
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return Options(**values)

    def __repr__(self) -> str:
        changed = {name: getattr(self, name) for name in self.__slots__
                   if getattr(self, name) not in (None, False, ())}
        return f"Options({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    def shares(self) -> bool:
        """Whether this container joins the other ranks' on this node
        (:mod:`capsid.runtime.sharens`): as asked (``--sharens``, ``--no-sharens``), else
        when this is a launcher's rank; never with options that give each its own
        namespaces (PID, IPC, network, UTS), nor for the builder's steps."""
        if self.sharens is False:
            return False
        if (self.pid or self.ipc or self.net or self.uts or self.hostname
                or self.root_emulation or self.user or self.environment is not None):
            if self.sharens:
                from capsid import log

                log.get(__name__).warning(
                    "--sharens is ignored with --pid, --ipc, --net, --uts or --hostname: "
                    "each rank gets namespaces of its own")
            return False
        import os

        return bool(self.sharens) or any(name in os.environ for name in LAUNCHER_VARIABLES)


class Layers:
    """A writable root made of directories: read-only *lowers* (newest first) under *upper*.

    What a build step runs in: the earlier steps' directories stacked by overlayfs,
    and the step's own *upper* directory receiving its changes (deletions as overlayfs
    whiteouts). *work* is overlayfs's scratch directory, on the same file system as
    *upper*. *name* is what the container calls itself (APPTAINER_CONTAINER).
    *base_image* (a SIF and the offset of its squashfs), where given, lies under the
    lowers, served by squashfuse: only :mod:`capsid.build.mounted` serves it (a
    container's steps run on directories).
    """

    __slots__ = ("base_image", "lowers", "name", "upper", "work")

    def __init__(self, lowers: Sequence[str], upper: str, work: str, name: str = "build",
                 base_image: tuple[str, int] | None = None) -> None:
        self.lowers = tuple(lowers)
        self.upper, self.work, self.name = upper, work, name
        self.base_image = base_image

    def __repr__(self) -> str:
        return f"Layers({len(self.lowers)} lowers, upper={self.upper!r})"

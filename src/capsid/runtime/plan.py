"""The plan of a container: every decision taken before its mount namespace exists.

Which home, /tmp, /dev, binds (checked on the host), GPU and MPI files, working
directory and variables: each decided once, here, into one ordered list of
operations (:mod:`capsid.runtime.ops`), which :func:`capsid.runtime.ops.run` carries out.
"""

from __future__ import annotations

import os

from capsid import config, hostfs, log
from capsid.errors import RuntimeSetupError, UsageError
from capsid.image.locate import SANDBOX, Image
from capsid.runtime import identity, ops
from capsid.runtime.binds import BindSpec

TYPE_CHECKING = False
if TYPE_CHECKING:
    from capsid.gpu.edits import Edits
    from capsid.mpi.host import HostMPI
    from capsid.runtime.early import Started
    from capsid.runtime.options import Layers, Options

LOG = log.get(__name__)

#: cwd is not bound into the container from these places: the image's own copy wins.
_SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
                "/proc", "/root", "/run", "/sbin", "/sys", "/usr", "/var")


class Plan:
    """A container to start: what to run, in what, and its mounts as data (:attr:`mounts`)."""

    __slots__ = ("action", "argv", "build_step", "confined", "cwd", "env_file_values",
                 "feigned_root", "home_dest", "image", "layers",
                 "mounts", "name", "nvccli", "oci_command", "oci_env", "options", "site",
                 "user", "userns")

    def __init__(self, *, name: str, action: str, argv: tuple[str, ...], options: Options,
                 image: Image, layers: Layers | None, user: identity.User, userns: bool,
                 home_dest: str, cwd: str, site: config.SiteConfig, oci_env: list[str],
                 mounts: list[ops.Op], build_step: bool = False,
                 feigned_root: bool = False, nvccli: list[str] | None = None,
                 oci_command: tuple[list[str], list[str], str] | None = None,
                 env_file_values: dict[str, str] | None = None) -> None:
        self.name, self.action, self.argv, self.options = name, action, argv, options
        #: what the --env-file files set, read on the host
        self.env_file_values = env_file_values or {}
        self.image, self.layers, self.user, self.userns = image, layers, user, userns
        self.home_dest, self.cwd, self.site, self.oci_env = home_dest, cwd, site, oci_env
        #: every mount, file, directory and variable of the container, in order
        self.mounts = mounts
        #: a builder's step (RUN, %post, a root build's %test): the host's kernel knobs,
        #: devices and files are out of its reach
        self.build_step = build_step
        #: the command runs confined (:func:`capsid.runtime.userns.confine_build_step`):
        #: a build step, or a root build's %test
        self.confined = build_step or hostfs.host_alias() is not None
        #: --fakeroot where only the user is mapped: chown, set*id and device mknod are
        #: answered "done" (:mod:`capsid.runtime.rootemu`), as Apptainer's fakeroot
        #: command does there
        self.feigned_root = feigned_root
        #: ``nvidia-container-cli`` and its ``configure`` flags, when it sets GPUs up
        self.nvccli = nvccli
        #: the OCI config's (ENTRYPOINT, CMD, WorkingDir): what ``run`` starts directly in
        #: an image without a shell for its runscript (FROM scratch)
        self.oci_command = oci_command

    def mount_points(self, old_root: str) -> list[tuple[str, bool]]:
        """Where the container's mounts land: (path, is a directory). Host paths under
        *old_root*."""
        return ops.points(self.mounts, old_root)


def make(name: str, action: str, argv: tuple[str, ...], opts: Options,
         started: Started, site: config.SiteConfig | None = None) -> Plan:
    """Decide, on the host (inside the user namespace), how the container will look
    (under the site's configuration *site*, read from its file by default)."""
    site = site or config.load()
    image, user = started.image, started.user
    _check(name, image.kind, opts)
    build_step = opts.root_emulation
    gpu, mpi = _gpu(opts, site, build_step), _mpi(opts, site, build_step)
    workdir = os.path.realpath(opts.workdir) if opts.workdir else None
    home_dest, home_ops = _home_ops(opts, site, user, workdir)
    binds = _binds(opts, tmp_shared(opts, site))
    cwd = opts.pwd or os.getcwd()
    steps: list[ops.Op] = _build_step_mounts() if build_step else _default_mounts(opts, site)
    steps += _mpi_ops(mpi)
    if gpu is not None:
        steps += _gpu_mounts(gpu, whole_dev=_dev(opts, site) == "host")
    steps += home_ops
    # /tmp before the binds, which may lie under it (-B /tmp/x with --contain)
    steps += _tmp_ops(opts, site, workdir)
    steps += [ops.Overlay(b.source, b.scratch, b.destination) if b.scratch else
              ops.Bind(b.source, b.destination, readonly=b.readonly) for b in binds]
    if not (opts.fakeroot or build_step):
        steps.append(ops.Identity(user, home_dest))
    steps += _resolv_ops(opts, build_step)
    steps += [ops.OwnDir("scratch-" + d.strip("/").replace("/", "_"), d, 0o755, workdir)
              for d in opts.scratch]
    if opts.hostname:
        steps.append(ops.File("/etc/hostname", f"{opts.hostname}\n".encode()))
    if _binds_cwd(opts, cwd, [home_dest, *(b.destination for b in binds)]):
        steps.append(ops.Bind(cwd, cwd, required=False))
    steps += _library_path_ops(gpu, mpi)
    feigned = not build_step and _feigned_root(opts, started)
    if feigned and "APT_CONFIG" not in os.environ:
        from capsid.runtime import rootemu

        steps += [ops.File(rootemu.APT_FILE, rootemu.APT_CONFIG.encode()),
                  ops.Env("APT_CONFIG", rootemu.APT_FILE)]
    oci = _oci_config(image)
    return Plan(name=name, action=action, argv=argv, options=opts, image=image,
                layers=started.layers, user=user, userns=started.userns, home_dest=home_dest,
                cwd=cwd, site=site, oci_env=_strings(oci.get("Env")), mounts=steps,
                build_step=build_step, feigned_root=feigned, env_file_values=_env_files(opts),
                nvccli=gpu.nvccli if gpu is not None else None,
                oci_command=(_strings(oci.get("Entrypoint")), _strings(oci.get("Cmd")),
                             str(oci.get("WorkingDir") or "")) if oci else None)


def _env_files(opts: Options) -> dict[str, str]:
    """The --env-file values, read here on the host (the container may not see the files);
    and the evaluator of values imported now, while the host's root is there, if a value
    may need it."""
    if opts.environment is not None:  # an exact environment (a build step's)
        return {}
    from capsid.runtime import env as envmod

    values = envmod.read_env_files(opts.env_files) if opts.env_files else {}
    if not opts.no_eval and envmod.may_evaluate([*values.values(), *opts.env]):
        from capsid.runtime import shellvars  # noqa: F401 - now: pivot_root hides it
    return values


def _feigned_root(opts: Options, started: Started) -> bool:
    """Whether root is feigned: ``--fakeroot`` (without ``--ignore-fakeroot-command``)
    in a user namespace that maps only the user (no subordinate ids)."""
    if not (opts.fakeroot and started.userns) or opts.ignore_fakeroot_command:
        return False
    from capsid.runtime import userns

    return userns.mapped_ids() == 1


def _check(name: str, kind: str, opts: Options) -> None:
    """Options the image cannot take, before anything is done."""
    if opts.writable and kind != SANDBOX:
        raise UsageError(f"--writable needs a sandbox directory, and {name} is a "
                         f"{kind} image",
                         "use --writable-tmpfs, or --overlay DIR for changes that persist")
    if opts.overlay:
        _check_overlay(opts.overlay)


def _home_ops(opts: Options, site: config.SiteConfig, user: identity.User,
              workdir: str | None) -> tuple[str, list[ops.Op]]:
    """Where home is in the container, and the one operation that makes it."""
    source, dest, empty = home(opts, site, user)
    if dest == "/" and source is not None:
        LOG.warning("--home %s puts the home directory on / and so replaces the container's "
                    "whole root filesystem with it; give a destination such as %s:/home/me",
                    opts.home, source)
    if source is not None and not os.path.isdir(source):
        LOG.warning("home directory %s does not exist; not binding it", source)
        source = None
    if source is not None:
        return dest, [ops.Bind(source, dest)]
    if empty:
        return dest, [ops.OwnDir("home", dest, 0o700, workdir)]
    return dest, [ops.Target(dest)]


def _tmp_ops(opts: Options, site: config.SiteConfig, workdir: str | None) -> list[ops.Op]:
    """The host's /tmp and /var/tmp, or (--contain) empty ones of the container's."""
    if tmp_shared(opts, site):
        return [ops.Bind("/tmp", "/tmp", required=False),
                ops.Bind(os.path.realpath("/var/tmp"), "/var/tmp", required=False)]
    if site.mount_tmp and "tmp" not in opts.no_mount:
        return [ops.OwnDir("tmp", "/tmp", 0o1777, workdir),
                ops.OwnDir("var_tmp", "/var/tmp", 0o1777, workdir)]
    return []


def _mpi_ops(mpi: HostMPI | None) -> list[ops.Op]:
    """--mpi host: the check, the host's MPI libraries and directories, its variables."""
    if mpi is None:
        return []
    from capsid.mpi.host import LIBS_DIR

    return [ops.CheckMPI(mpi),
            *(ops.Bind(source, f"{LIBS_DIR}/{lib}", readonly=True, required=False)
              for lib, source in mpi.libraries.items()),
            *(ops.Bind(d, d, readonly=True, required=False) for d in mpi.directories),
            *(ops.Env(k, v) for k, v in mpi.passthrough.items())]


def _resolv_ops(opts: Options, build_step: bool) -> list[ops.Op]:
    """/etc/resolv.conf: the --dns servers, or the host's (a build step keeps the image's)."""
    if opts.dns:
        return [ops.File("/etc/resolv.conf",
                         "".join(f"nameserver {ip}\n" for ip in opts.dns).encode())]
    if not build_step and os.path.exists("/etc/resolv.conf"):
        return [ops.Bind(os.path.realpath("/etc/resolv.conf"), "/etc/resolv.conf",
                         required=False)]
    return []


def _binds_cwd(opts: Options, cwd: str, bound: list[str]) -> bool:
    """Whether the working directory is bound as itself: not with --pwd, --contain or
    ``--no-mount cwd``, nor where a system directory or another mount covers it."""
    covered = (*_SYSTEM_DIRS, *bound, "/tmp", "/var/tmp")
    return (opts.pwd is None and not opts.contain and "cwd" not in opts.no_mount
            and cwd != "/" and not any(cwd == d or cwd.startswith(d + "/") for d in covered))


def _library_path_ops(gpu: Edits | None, mpi: HostMPI | None) -> list[ops.Op]:
    """LD_LIBRARY_PATH for what --mpi host and the GPU libraries bound in."""
    libs = gpu if gpu is not None and (gpu.libraries or gpu.library_dirs) else None
    if mpi is None and libs is None:
        return []
    from capsid.mpi.host import LIBS_DIR

    return [ops.LibraryPath(libs, LIBS_DIR if mpi else None)]


def tmp_shared(opts: Options, site: config.SiteConfig) -> bool:
    """Whether the host's /tmp and /var/tmp are the container's (not with --contain,
    ``--no-mount tmp`` or the site's ``mount tmp = no``)."""
    return site.mount_tmp and not opts.contain and "tmp" not in opts.no_mount


def _dev(opts: Options, site: config.SiteConfig) -> str:
    """The container's /dev: "host" (the host's, bound), "minimal" (one of its own, with
    the usual devices: --contain, the site's ``mount dev = minimal``) or "none"."""
    if "dev" in opts.no_mount:
        return "none"
    if opts.contain or site.mount_dev == "minimal":
        return "minimal"
    return "host" if site.mount_dev != "no" else "none"


def _default_mounts(opts: Options, site: config.SiteConfig) -> list[ops.Op]:
    """/proc, /sys, /dev and the site's bind paths, as the site and the flags allow."""
    no = set(opts.no_mount)
    steps: list[ops.Op] = []
    if site.mount_proc and "proc" not in no:
        steps.append(ops.Proc(opts.pid))
    if site.mount_sys and "sys" not in no:
        steps.append(ops.Bind("/sys", "/sys", required=False))
    dev = _dev(opts, site)
    if dev == "minimal":
        steps.append(ops.MinimalDev())
    elif dev == "host":
        steps.append(ops.Bind("/dev", "/dev", device=True, required=False))
    if "bind-paths" not in no:
        for spec in site.bind_paths:
            src, _, dst = spec.partition(":")
            if src not in no and (dst or src) not in no:
                steps.append(ops.Bind(os.path.realpath(src), dst or src, required=False))
    return steps


def _build_step_mounts() -> list[ops.Op]:
    """What a RUN or %post step gets of the host: a /proc of its own PID namespace with
    the kernel's settings read-only (as Docker masks them), /sys read-only (the host
    owns its files besides), a minimal /dev, and copies of /etc/hosts and /etc/resolv.conf
    (a step may edit them; the host's files never change)."""
    steps: list[ops.Op] = [ops.Proc(True, protect=True),
                           ops.Bind("/sys", "/sys", readonly=True, required=False),
                           ops.MinimalDev()]
    for path in ("/etc/hosts", "/etc/resolv.conf"):
        try:  # the host's own file; its links are followed inside the host's root
            content = hostfs.read_in("/", path)
        except (OSError, hostfs.Refused):
            content = None
        if content is not None:
            steps.append(ops.File(path, content))
    return steps


def _gpu(opts: Options, site: config.SiteConfig, build_step: bool) -> Edits | None:
    """What --nv, --rocm, --device and --nvccli add, or the site's ``always use nv|rocm``
    (for users' containers, not the builder's steps, and not with --no-nv|--no-rocm)."""
    nv = opts.nv or opts.nvccli or (not build_step and not opts.no_nv
                                    and site.yes("always use nv"))
    rocm = opts.rocm or (not build_step and not opts.no_rocm and site.yes("always use rocm"))
    if not (nv or rocm or opts.devices):
        return None
    from capsid.gpu.select import edits_for

    return edits_for(opts, site, nv=nv, rocm=rocm)


def _mpi(opts: Options, site: config.SiteConfig, build_step: bool) -> HostMPI | None:
    """The host's MPI with --mpi host (or the site's ``mpi = host``, not in build steps)."""
    if (opts.mpi or ("none" if build_step else _site_mpi(site))) != "host":
        return None
    from capsid.mpi import host

    return host.find(site)


def _gpu_mounts(gpu: Edits, *, whole_dev: bool) -> list[ops.Op]:
    """The GPU driver's libraries, files and devices (those under a /dev bound whole
    are there already), CDI's symlinks and variables."""
    steps: list[ops.Op] = [
        ops.Bind(source, f"/.singularity.d/libs/{name}", readonly=True, required=False)
        for name, source in gpu.libraries.items()]
    steps += [ops.Bind(m.source, m.destination, readonly=m.readonly, required=False)
              for m in gpu.mounts]
    steps += [ops.Bind(d.source, d.destination, device=True, required=False)
              for d in gpu.devices if not (whole_dev and d.source == d.destination)]
    steps += [ops.Symlink(target, link) for target, link in gpu.symlinks]
    steps += [ops.Env(k, v) for k, v in gpu.passthrough.items()]
    steps += [ops.Env(k, v, pinned=True) for k, v in gpu.env.items()]
    return steps


def _binds(opts: Options, tmp_bound: bool) -> list[BindSpec]:
    """The user's binds, checked on the host, and a launched rank's PMIx directories."""
    binds = []
    for b in opts.binds:
        _check_source(b.source)
        binds.append(BindSpec(os.path.realpath(b.source), b.destination, b.readonly,
                              b.scratch))
        if b.destination == "/":
            LOG.warning("binding %s onto / replaces the container's whole root filesystem "
                        "with it; bind it somewhere below / instead", b.source)
    return binds + _launcher_binds(binds, tmp_bound)


def home(opts: Options, site: config.SiteConfig, user: identity.User
         ) -> tuple[str | None, str, bool]:
    """The home directory, decided once: (the host directory bound there or None, where
    it is in the container, whether an empty writable directory goes there instead).

    As Apptainer: an explicit ``--home SRC[:DST]`` is bound whatever else is asked
    (cwltool binds its job's directory so, with --contain); otherwise the user's home
    at its path (at /root with --fakeroot), none with --no-home, ``--no-mount home`` or
    the site's ``mount home = no``, and an empty one in memory with --contain.
    """
    if opts.home:
        src, _, dst = opts.home.partition(":")
        return os.path.realpath(os.path.expanduser(src)), dst or src, False
    dest = "/root" if opts.fakeroot or opts.root_emulation else user.home
    if opts.no_home or not site.mount_home or "home" in opts.no_mount:
        return None, dest, False
    if opts.contain:
        return None, dest, True
    return user.home, dest, False


def _site_mpi(site: config.SiteConfig) -> str:
    value = site.values.get("mpi", "none").strip().lower()
    if value not in ("host", "none"):
        raise UsageError(f"capsid.conf: 'mpi = {site.values['mpi']}' is not host or none",
                         "fix the site configuration file")
    return value


def _launcher_binds(binds: list[BindSpec], tmp_bound: bool) -> list[BindSpec]:
    """A launched rank's PMIx directories, at their own paths: its client in the container
    maps the job's shared data store from the server's directory (Slurm keeps it in the
    slurmd spool directory, which no image has), and Slurm points TMPDIR at a directory of
    the step's (``PMIxCliTmpDirBase``). Those under /tmp are there already when
    *tmp_bound*."""
    if "PMIX_RANK" not in os.environ:
        return []
    found: list[BindSpec] = []
    for name in ("PMIX_SERVER_TMPDIR", "TMPDIR"):
        value = os.environ.get(name)
        if not value or not os.path.isabs(value):
            continue
        path = os.path.realpath(value)
        if path in ("/", "/tmp", "/var/tmp") or not os.path.isdir(path) or any(
                b.destination == path for b in (*binds, *found)):
            continue
        if tmp_bound and path.startswith(("/tmp/", "/var/tmp/")):
            continue
        found.append(BindSpec(path, path, False))
    return found


def _check_source(path: str) -> None:
    """A bind source must exist and be reachable by the user: say which it is not."""
    try:
        os.stat(path)
    except FileNotFoundError:
        raise RuntimeSetupError(f"bind source {path} does not exist",
                                "create it first or fix the --bind argument") from None
    except OSError as err:
        raise RuntimeSetupError(f"cannot bind {path}: {(err.strerror or str(err)).lower()}",
                                "bind a path you can reach") from None


def _check_overlay(spec: str) -> None:
    """An --overlay is an overlay image, or an existing directory of the user's (not the
    host's root); ``:ro`` reads it only."""
    from capsid.runtime import overlayimg

    path, readonly = overlayimg.split(spec)
    if overlayimg.is_image(path):
        overlayimg.check(path, readonly)
        return
    real = os.path.realpath(path)
    if not os.path.lexists(real):
        if path.endswith((".img", ".ext3", ".ext4")):
            raise UsageError(f"overlay image {path} does not exist",
                             f"make it first: capsid overlay create --size 1024 {path}")
        raise UsageError(f"overlay directory {path} does not exist",
                         f"create it first (mkdir -p {path}): changes to the image are kept "
                         "there")
    if not os.path.isdir(real):
        raise UsageError(f"overlay {path} is neither a directory nor an overlay image",
                         "give an empty directory, or an image made by 'capsid overlay "
                         "create'")
    if real == "/":
        raise UsageError("the overlay directory cannot be /",
                         "give an empty directory of your own")
    if not readonly and not os.access(real, os.W_OK | os.X_OK):
        raise UsageError(f"you cannot write to the overlay directory {path}",
                         "give a directory of your own")


def _oci_config(image: Image) -> dict[str, object]:
    """The OCI image config stored in a SIF (Env, Entrypoint, Cmd, WorkingDir), for images
    without a shell to source env scripts or run a runscript; {} if there is none."""
    if image.oci_config is None:
        return {}
    offset, size = image.oci_config
    with open(image.path, "rb") as f:
        f.seek(offset)
        raw = f.read(size)
    import json

    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    if isinstance(doc, dict) and isinstance(doc.get("config"), dict) and "Env" not in doc:
        doc = doc["config"]
    return doc if isinstance(doc, dict) else {}


def _strings(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

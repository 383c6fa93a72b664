"""The plan of a container: every decision taken before its mount namespace exists.

Which home, which binds (checked on the host), which working directory, which mount
points the image needs, and the OCI environment stored in a SIF.
"""

from __future__ import annotations

import os

from capsid import config, log
from capsid.errors import RuntimeSetupError, UsageError
from capsid.image.locate import SANDBOX, Image
from capsid.runtime import identity
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
    """A container to start: what to run, in what, and the decisions about its mounts."""

    __slots__ = ("action", "argv", "bind_cwd", "binds", "cwd", "gpu", "home_dest",
                 "home_empty", "home_source", "image", "layers", "library_path", "mpi", "name",
                 "oci_command", "oci_env", "options", "site", "user", "userns")

    def __init__(self, *, name: str, action: str, argv: tuple[str, ...], options: Options,
                 image: Image, layers: Layers | None, user: identity.User, userns: bool,
                 home_source: str | None, home_dest: str, binds: list[BindSpec], cwd: str,
                 bind_cwd: bool, site: config.SiteConfig, oci_env: list[str],
                 gpu: Edits | None = None, mpi: HostMPI | None = None,
                 home_empty: bool = False,
                 oci_command: tuple[list[str], list[str], str] | None = None) -> None:
        self.name, self.action, self.argv, self.options = name, action, argv, options
        self.image, self.layers, self.user, self.userns = image, layers, user, userns
        self.home_source, self.home_dest, self.binds = home_source, home_dest, binds
        #: an empty writable home of the container's own (--contain), not a host directory
        self.home_empty = home_empty
        #: the OCI config's (ENTRYPOINT, CMD, WorkingDir): what ``run`` starts directly in
        #: an image without a shell for its runscript (FROM scratch)
        self.oci_command = oci_command
        self.cwd, self.bind_cwd, self.site, self.oci_env = cwd, bind_cwd, site, oci_env
        self.gpu = gpu  #: what --nv, --rocm, --device and --nvccli add
        self.mpi = mpi  #: the host's MPI, with --mpi host
        #: LD_LIBRARY_PATH to start from (decided once the image is mounted), or None
        self.library_path: str | None = None

    def mount_points(self, old_root: str) -> list[tuple[str, bool]]:
        """Where the container's mounts land: (path, is a directory). Host paths under
        *old_root*."""
        points = [("/proc", True), ("/sys", True), ("/dev", True), (self.home_dest, True),
                  ("/tmp", True), ("/var/tmp", True), ("/etc/passwd", False),
                  ("/etc/group", False), ("/etc/resolv.conf", False)]
        for spec in self.site.bind_paths:
            src, _, dst = spec.partition(":")
            points.append((dst or src, os.path.isdir(f"{old_root}{src}")))
        points += [(b.destination, os.path.isdir(f"{old_root}{b.source}")) for b in self.binds]
        if self.options.hostname:
            points.append(("/etc/hostname", False))
        points += [(directory, True) for directory in self.options.scratch]
        if self.bind_cwd:
            points.append((self.cwd, True))
        if self.gpu is not None:
            points += self.gpu.mount_points(old_root)
        if self.mpi is not None:
            from capsid.mpi.host import LIBS_DIR

            points += [(f"{LIBS_DIR}/{name}", False) for name in self.mpi.libraries]
            points += [(path, True) for path in self.mpi.directories]
        return points


def make(name: str, action: str, argv: tuple[str, ...], opts: Options,
         started: Started) -> Plan:
    """Decide, on the host (inside the user namespace), how the container will look."""
    site = config.load()
    image, user, userns = started.image, started.user, started.userns
    if opts.writable and image.kind != SANDBOX:
        raise UsageError(f"--writable needs a sandbox directory, and {name} is a "
                         f"{image.kind} image",
                         "use --writable-tmpfs, or --overlay DIR for changes that persist")
    if opts.overlay:
        _check_overlay(opts.overlay)
    home_source, home_dest, home_empty = home(opts, site, user)
    oci = _oci_config(image)
    binds = []
    for b in opts.binds:
        _check_source(b.source)
        binds.append(BindSpec(os.path.realpath(b.source), b.destination, b.readonly,
                              b.scratch))
        if b.destination == "/":
            LOG.warning("binding %s onto / replaces the container's whole root filesystem "
                        "with it; bind it somewhere below / instead", b.source)
    binds += _launcher_binds(binds, site.mount_tmp and not opts.contain
                             and "tmp" not in opts.no_mount)
    if home_dest == "/" and home_source is not None:
        LOG.warning("--home %s puts the home directory on / and so replaces the container's "
                    "whole root filesystem with it; give a destination such as %s:/home/me",
                    opts.home, home_source)
    if home_source is not None and not os.path.isdir(home_source):
        LOG.warning("home directory %s does not exist; not binding it", home_source)
        home_source = None
    cwd = opts.pwd or os.getcwd()
    bound = [home_dest] + [b.destination for b in binds] + ["/tmp", "/var/tmp"]
    bind_cwd = (opts.pwd is None and not opts.contain and "cwd" not in opts.no_mount
                and cwd != "/" and not any(cwd == d or cwd.startswith(d + "/")
                                           for d in _SYSTEM_DIRS + tuple(bound)))
    # The site's defaults are for users' containers, not the builder's steps.
    defaults = not (opts.root_emulation or opts.environment is not None)
    gpu = None
    if opts.nv or opts.nvccli or opts.rocm or opts.devices or (defaults and (
            site.values.get("always use nv") or site.values.get("always use rocm"))):
        from capsid.gpu.select import edits_for

        gpu = edits_for(opts, site if defaults else config.SiteConfig(
            values={k: v for k, v in site.values.items() if not k.startswith("always use")}))
    mpi = None
    if (opts.mpi or (_site_mpi(site) if defaults else "none")) == "host":
        from capsid.mpi import host

        mpi = host.find(site)
    return Plan(name=name, action=action, argv=argv, options=opts, image=image,
                layers=started.layers, user=user, userns=userns, home_source=home_source,
                home_dest=home_dest, binds=binds, cwd=cwd, bind_cwd=bind_cwd, site=site,
                oci_env=_strings(oci.get("Env")), gpu=gpu, mpi=mpi, home_empty=home_empty,
                oci_command=(_strings(oci.get("Entrypoint")), _strings(oci.get("Cmd")),
                             str(oci.get("WorkingDir") or "")) if oci else None)


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
        raise UsageError(f"overlay directory {path} does not exist",
                         f"create it first (mkdir -p {path}): changes to the image are kept "
                         "there")
    if not os.path.isdir(real):
        raise UsageError(f"overlay {path} is not a directory",
                         "capsid keeps overlays in directories; give an empty directory")
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

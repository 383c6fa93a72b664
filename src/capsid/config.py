"""Site configuration and the environment variables that stand in for flags.

The site file (``/etc/capsid/capsid.conf``, or ``$CAPSID_CONFIG``) uses
Apptainer's ``key = value`` lines; ``bind path`` may repeat. Every flag-like
variable is looked up as ``CAPSID_X``, then ``APPTAINER_X``, then ``SINGULARITY_X``.
"""

from __future__ import annotations

import os
import stat

from capsid.errors import CapsidError

DEFAULT_PATH = "/etc/capsid/capsid.conf"
PREFIXES = ("CAPSID_", "APPTAINER_", "SINGULARITY_")


def env(name: str, default: str | None = None) -> str | None:
    """The first of CAPSID_<name>, APPTAINER_<name>, SINGULARITY_<name> that is set."""
    for prefix in PREFIXES:
        value = os.environ.get(prefix + name)
        if value is not None:
            return value
    return default


def env_seconds(name: str, default: float) -> float:
    """A CAPSID_<name> time in seconds (a tuning knob; not an Apptainer variable)."""
    text = os.environ.get(f"CAPSID_{name}")
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 3600:
        raise CapsidError(f"CAPSID_{name}={text!r} is not a number of seconds",
                          f"set it to e.g. {default}, or unset it")
    return value


def env_flag(name: str) -> bool:
    value = env(name)
    return value is not None and value.strip().lower() not in ("", "0", "false", "no")


def cache_root() -> str:
    """capsid's cache: ``CAPSID_CACHEDIR`` (or Apptainer's), else ``~/.cache/capsid``."""
    explicit = env("CACHEDIR")
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_CACHE_HOME")
    return os.path.join(xdg, "capsid") if xdg else os.path.join(os.path.expanduser("~"),
                                                                  ".cache", "capsid")


DEFAULT_BIND_PATHS = ("/etc/localtime", "/etc/hosts")


class SiteConfig:
    """What a site administrator decides for everyone."""

    __slots__ = ("bind_paths", "mount_dev", "mount_home", "mount_proc", "mount_sys",
                 "mount_tmp", "overlay", "tmpfs_size_mib", "values")

    def __init__(self, bind_paths: tuple[str, ...] = DEFAULT_BIND_PATHS, mount_home: bool = True,
                 mount_tmp: bool = True, mount_proc: bool = True, mount_sys: bool = True,
                 mount_dev: str = "yes", tmpfs_size_mib: int | None = None,
                 values: dict[str, str] | None = None, overlay: bool = True) -> None:
        self.bind_paths, self.mount_home, self.mount_tmp = bind_paths, mount_home, mount_tmp
        self.mount_proc, self.mount_sys, self.mount_dev = mount_proc, mount_sys, mount_dev
        self.tmpfs_size_mib, self.values = tmpfs_size_mib, values or {}
        #: ``enable overlay``: mount points missing from a read-only image are made in
        #: an overlayfs layer over it; ``no``: in tmpfs copies of their directories
        self.overlay = overlay

    def yes(self, key: str) -> bool:
        """Whether the site's *key* is set to yes (true, 1); anything else is no."""
        return self.values.get(key, "no").strip().lower() in ("yes", "true", "1")


def _yes(value: str, key: str, path: str) -> bool:
    v = value.strip().lower()
    if v in ("yes", "true", "1"):
        return True
    if v in ("no", "false", "0"):
        return False
    raise CapsidError(f"{path}: '{key} = {value}' is not yes or no",
                      "fix the site configuration file")


#: the last file read, by its path and identity: a start asks several times
_LOADED: dict[tuple[str, int, int, int, int], SiteConfig] = {}


def load(path: str | None = None) -> SiteConfig:
    """Read the site configuration; a missing file means the defaults. The same file,
    unchanged, is read once per process."""
    path = path or env("CONFIG") or DEFAULT_PATH
    try:
        # O_NONBLOCK: a FIFO named by CAPSID_CONFIG must not hang every container start
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise CapsidError(f"configuration {path} is not a regular file",
                              "point CAPSID_CONFIG at a file")
        identity = (path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        if identity in _LOADED:
            os.close(fd)
            return _LOADED[identity]
        with open(fd, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return SiteConfig()
    except OSError as err:
        raise CapsidError(f"cannot read configuration {path}: {err.strerror}",
                          "fix its permissions or point CAPSID_CONFIG elsewhere") from None
    binds: list[str] = []
    values: dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise CapsidError(f"{path}:{number}: expected 'key = value', got {raw.strip()!r}",
                              "fix the site configuration file")
        key, value = " ".join(key.split()).lower(), value.strip()
        if key == "bind path":
            binds.append(value)
        else:
            values[key] = value
    size = values.get("sessiondir max size")
    if size is not None and not size.isdigit():
        raise CapsidError(f"{path}: 'sessiondir max size = {size}' is not a number of MiB",
                          "fix the site configuration file")
    mount_dev = values.get("mount dev", "yes").lower()
    if mount_dev not in ("yes", "no", "minimal"):
        raise CapsidError(f"{path}: 'mount dev = {values['mount dev']}' is not yes, no or "
                          "minimal", "fix the site configuration file")
    overlay = values.get("enable overlay", "try").lower()
    if overlay not in ("yes", "try", "driver", "no"):
        raise CapsidError(f"{path}: 'enable overlay = {values['enable overlay']}' is not yes, "
                          "try or no", "fix the site configuration file")
    _LOADED.clear()
    _LOADED[identity] = SiteConfig(
        bind_paths=tuple(binds) if binds else DEFAULT_BIND_PATHS,
        mount_home=_yes(values.get("mount home", "yes"), "mount home", path),
        mount_tmp=_yes(values.get("mount tmp", "yes"), "mount tmp", path),
        mount_proc=_yes(values.get("mount proc", "yes"), "mount proc", path),
        mount_sys=_yes(values.get("mount sys", "yes"), "mount sys", path),
        mount_dev=mount_dev,
        tmpfs_size_mib=int(size) if size else None,
        values=values,
        overlay=overlay != "no",
    )
    return _LOADED[identity]

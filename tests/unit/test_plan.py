"""What the runtime decides about a container's home, as a table (no namespaces needed).

Each row cites the Apptainer behaviour it follows (userdocs bind_paths_and_mounts,
container_linux.go addHomeMount): the home directory is decided in one place,
:func:`capsid.runtime.plan.home`.
"""

from __future__ import annotations

import pytest

from capsid import config
from capsid.runtime import identity, plan
from capsid.runtime.options import Options

USER = identity.User(1000, 1000, "ada", "ada", "", "/home/ada", "/bin/sh")
NO_HOME_SITE = config.SiteConfig(mount_home=False)

# (options, site mounts home, expected (source, destination, empty writable))
ROWS = [
    # default: the user's home, at its own path
    ({}, True, ("/home/ada", "/home/ada", False)),
    # --contain: an empty writable home in memory; nothing of the host's
    ({"contain": True}, True, (None, "/home/ada", True)),
    # explicit --home under --contain is bound (only the default one is dropped): cwltool
    ({"contain": True, "home": "/work/job:/var/lib/cwl/home"}, True,
     ("/work/job", "/var/lib/cwl/home", False)),
    ({"home": "/work/job"}, True, ("/work/job", "/work/job", False)),
    # --no-home, --no-mount home and the site's mount home = no: no home bound
    ({"no_home": True}, True, (None, "/home/ada", False)),
    ({"no_mount": ("home",)}, True, (None, "/home/ada", False)),
    ({}, False, (None, "/home/ada", False)),
    # --fakeroot: the user's home at /root ...
    ({"fakeroot": True}, True, ("/home/ada", "/root", False)),
    # ... and --no-mount home, --no-home and the site's choice hold with it too
    ({"fakeroot": True, "no_mount": ("home",)}, True, (None, "/root", False)),
    ({"fakeroot": True, "no_home": True}, True, (None, "/root", False)),
    ({"fakeroot": True}, False, (None, "/root", False)),
    ({"fakeroot": True, "contain": True}, True, (None, "/root", True)),
    ({"fakeroot": True, "home": "/work/job:/home/x"}, True, ("/work/job", "/home/x", False)),
    # a build step (root emulation, no home): /root, nothing bound
    ({"root_emulation": True, "no_home": True, "contain": True}, True, (None, "/root", False)),
]


@pytest.mark.parametrize(("options", "site_home", "expected"), ROWS)
def test_home(options: dict[str, object], site_home: bool,
              expected: tuple[str | None, str, bool]) -> None:
    site = config.SiteConfig() if site_home else NO_HOME_SITE
    assert plan.home(Options(**options), site, USER) == expected  # type: ignore[arg-type]


# --- the whole mount plan, as a table -------------------------------------------------
#
# plan.make() decides every mount of a container once, as a list of operations
# (capsid.runtime.ops); these rows drive it without any namespace and compare the list,
# each op written short by _short(). HOME stands for the user's home directory, CWD for
# the working directory, BIND for a bind source; the site binds nothing by default here
# (its bind paths have a row of their own).

from capsid.image.locate import SANDBOX, Image  # noqa: E402
from capsid.runtime import early, ops  # noqa: E402
from capsid.runtime.binds import BindSpec  # noqa: E402

DEFAULTS = ["proc:host", "bind /sys", "dev:host"]
PASSWD = ["identity HOME"]
RESOLV = ["bind /etc/resolv.conf"]


def _short(op: ops.Op, names: dict[str, str]) -> str:
    def n(path: str) -> str:
        for real, name in names.items():
            if path == real or path.startswith(real + "/"):
                return name + path[len(real):]
        return path

    if isinstance(op, ops.Proc):
        return "proc:" + ("new" if op.new_pid else "host") + (",protected" if op.protect
                                                              else "")
    if isinstance(op, ops.MinimalDev):
        return "dev:minimal"
    if isinstance(op, ops.Bind):
        if op.source == "/dev" and op.device:
            return "dev:host"
        where = n(op.destination) if op.source == op.destination else \
            f"{n(op.source)}:{n(op.destination)}"
        return f"bind {where}" + (":ro" if op.readonly else "")
    if isinstance(op, ops.OwnDir):
        return f"own {n(op.destination)}" + (" in WORKDIR" if op.workdir else "")
    if isinstance(op, ops.Target):
        return f"target {n(op.destination)}"
    if isinstance(op, ops.Identity):
        return f"identity {n(op.home)}"
    if isinstance(op, ops.File):
        return f"file {op.destination}"
    if isinstance(op, ops.Overlay):
        return f"overlay {n(op.source)}:{n(op.destination)}"
    return type(op).__name__


# (options, site, expected list; "tmp" and "tmp:own" expand below)
TMP = ["bind /tmp", "bind /var/tmp"]
OWN_TMP = ["own /tmp", "own /var/tmp"]
MATRIX: list[tuple[str, dict[str, object], dict[str, object], list[str]]] = [
    # Apptainer's defaults: /proc, /sys, /dev, home, /tmp, /var/tmp, the working directory
    ("defaults", {}, {}, [*DEFAULTS, "bind HOME", *TMP, *PASSWD, *RESOLV, "bind CWD"]),
    # --contain: minimal /dev, empty home, /tmp and /var/tmp; no working directory
    ("contain", {"contain": True}, {},
     ["proc:host", "bind /sys", "dev:minimal", "own HOME", *OWN_TMP, *PASSWD, *RESOLV]),
    # --containall = --contain --pid --ipc --cleanenv: a /proc of its own PID namespace
    ("containall", {"contain": True, "pid": True, "ipc": True, "cleanenv": True}, {},
     ["proc:new", "bind /sys", "dev:minimal", "own HOME", *OWN_TMP, *PASSWD, *RESOLV]),
    # --contain --workdir DIR: home and /tmp kept in DIR (userdocs: --workdir)
    ("contain+workdir", {"contain": True, "workdir": "WORKDIR"}, {},
     ["proc:host", "bind /sys", "dev:minimal", "own HOME in WORKDIR", "own /tmp in WORKDIR",
      "own /var/tmp in WORKDIR", *PASSWD, *RESOLV]),
    # --no-home: no home bound, but the directory exists (the user's passwd entry)
    ("no-home", {"no_home": True}, {},
     [*DEFAULTS, "target HOME", *TMP, *PASSWD, *RESOLV, "bind CWD"]),
    # --no-mount home,tmp,cwd,proc,sys,dev (Apptainer 1.1+)
    ("no-mount all", {"no_mount": ("home", "tmp", "cwd", "proc", "sys", "dev")}, {},
     ["target HOME", *PASSWD, *RESOLV]),
    # the site's mount home = no and mount tmp = no hold as --no-mount does
    ("site no home, no tmp", {}, {"mount_home": False, "mount_tmp": False},
     [*DEFAULTS, "target HOME", *PASSWD, *RESOLV, "bind CWD"]),
    # the site's mount dev = minimal; mount dev = no
    ("site dev minimal", {}, {"mount_dev": "minimal"},
     ["proc:host", "bind /sys", "dev:minimal", "bind HOME", *TMP, *PASSWD, *RESOLV,
      "bind CWD"]),
    ("site dev no", {}, {"mount_dev": "no"},
     ["proc:host", "bind /sys", "bind HOME", *TMP, *PASSWD, *RESOLV, "bind CWD"]),
    # --home SRC:DST binds SRC at DST, also with --contain (cwltool relies on it)
    ("home src:dst + contain", {"home": "BIND:/home/job", "contain": True}, {},
     ["proc:host", "bind /sys", "dev:minimal", "bind BIND:/home/job", *OWN_TMP,
      "identity /home/job", *RESOLV]),
    # --fakeroot: home at /root, no passwd of the user's (root's is the image's)
    ("fakeroot", {"fakeroot": True}, {},
     [*DEFAULTS, "bind HOME:/root", *TMP, *RESOLV, "bind CWD"]),
    # --fakeroot --no-mount home: no home (Apptainer honours it; a bug of capsid's once)
    ("fakeroot no-mount home", {"fakeroot": True, "no_mount": ("home",)}, {},
     [*DEFAULTS, "target /root", *TMP, *RESOLV, "bind CWD"]),
    # binds come after /tmp (they may lie below it), read-only ones stay so
    ("binds", {"binds": [BindSpec("BIND", "/data", True), BindSpec("BIND", "/tmp/x", False)]},
     {}, [*DEFAULTS, "bind HOME", *TMP, "bind BIND:/data:ro", "bind BIND:/tmp/x", *PASSWD,
          *RESOLV, "bind CWD"]),
    # --bind SRC:DST:scratch... keeps the changes apart (an overlay of the source)
    ("scratch bind", {"binds": [BindSpec("BIND", "/data", False, "WORKDIR")]}, {},
     [*DEFAULTS, "bind HOME", *TMP, "overlay BIND:/data", *PASSWD, *RESOLV, "bind CWD"]),
    # --scratch DIR, --hostname, --dns: directories and files of the container's own
    ("scratch, hostname, dns", {"scratch": ("/scratch",), "hostname": "n1", "uts": True,
                                "dns": ("10.0.0.1",)}, {},
     [*DEFAULTS, "bind HOME", *TMP, *PASSWD, "file /etc/resolv.conf", "own /scratch",
      "file /etc/hostname", "bind CWD"]),
    # --pwd: the working directory is the container's, not bound
    ("pwd", {"pwd": "/opt"}, {}, [*DEFAULTS, "bind HOME", *TMP, *PASSWD, *RESOLV]),
    # the site's bind paths, left out with --no-mount bind-paths
    ("site bind paths", {}, {"bind_paths": ("/etc/hosts",)},
     [*DEFAULTS, "bind /etc/hosts", "bind HOME", *TMP, *PASSWD, *RESOLV, "bind CWD"]),
    ("no-mount bind-paths", {"no_mount": ("bind-paths",)}, {"bind_paths": ("/etc/hosts",)},
     [*DEFAULTS, "bind HOME", *TMP, *PASSWD, *RESOLV, "bind CWD"]),
    # a build step: its own /proc with the kernel's knobs read-only, /sys read-only,
    # a minimal /dev, copies of hosts and resolv.conf; never the site's GPU or MPI
    ("build step", {"root_emulation": True, "no_home": True, "contain": True, "pid": True,
                    "environment": {}}, {"values": {"always use nv": "yes", "mpi": "host"}},
     ["proc:new,protected", "bind /sys:ro", "dev:minimal", "file /etc/hosts",
      "file /etc/resolv.conf", "target /root", *OWN_TMP]),
    # the site's always use nv = no is no (it once counted as yes)
    ("always use nv = no", {}, {"values": {"always use nv": "no", "always use rocm": "0"}},
     [*DEFAULTS, "bind HOME", *TMP, *PASSWD, *RESOLV, "bind CWD"]),
    # --writable-tmpfs changes no mount (the root is writable instead)
    ("writable-tmpfs", {"writable_tmpfs": True}, {},
     [*DEFAULTS, "bind HOME", *TMP, *PASSWD, *RESOLV, "bind CWD"]),
]


@pytest.mark.parametrize(("options", "site", "expected"),
                         [row[1:] for row in MATRIX], ids=[row[0] for row in MATRIX])
def test_mount_plan(tmp_path: object, monkeypatch: pytest.MonkeyPatch,
                    options: dict[str, object], site: dict[str, object],
                    expected: list[str]) -> None:
    import os
    from pathlib import Path

    base = Path(str(tmp_path))
    home_dir, bind, workdir = (base / n for n in ("home", "bind", "workdir"))
    for d in (home_dir, bind, workdir):
        d.mkdir()
    # the working directory is not bound from under /tmp (bound already), where tmp_path is
    names = {str(home_dir): "HOME", "/work/job": "CWD", str(bind): "BIND",
             str(workdir): "WORKDIR"}
    monkeypatch.setattr(os, "getcwd", lambda: "/work/job")
    user = identity.User(1000, 1000, "ada", "ada", "", str(home_dir), "/bin/sh")

    def real(value: object) -> object:
        if isinstance(value, str):
            for path, name in names.items():
                value = value.replace(name, path)
        elif isinstance(value, list):
            value = [BindSpec(str(real(b.source)), b.destination, b.readonly,
                              str(real(b.scratch)) if b.scratch else None) for b in value]
        return value

    opts = Options(**{k: real(v) for k, v in options.items()})  # type: ignore[arg-type]
    started = early.Started(Image(str(base), SANDBOX), user, True, None, [], None)
    made = plan.make(str(base), "exec", ("true",), opts, started,
                     config.SiteConfig(**{"bind_paths": (), **site}))  # type: ignore[arg-type]
    if not os.path.exists("/etc/resolv.conf"):
        expected = [e for e in expected if e != "bind /etc/resolv.conf"]
    assert [_short(op, names) for op in made.mounts] == expected
    # the mount points are read off the same list
    assert [p for p, _ in made.mount_points("/")] == [
        p for op in made.mounts for p, _ in op.points("/")]


def test_mpi_and_gpu_go_in_the_plan_once(tmp_path: object) -> None:
    """--mpi host: the check, the libraries, then one LD_LIBRARY_PATH operation that
    puts the MPI directory first (it was added in two places once)."""
    from capsid.mpi.host import LIBS_DIR, HostMPI

    mpi = HostMPI("openmpi", "openmpi", {"libmpi.so.40": "/usr/lib/libmpi.so.40"}, ["/etc/x"])
    mpi.passthrough = {"OMPI_COMM_WORLD_RANK": "0"}
    import unittest.mock

    with unittest.mock.patch("capsid.mpi.host.find", return_value=mpi):
        made = plan.make(str(tmp_path), "exec", ("true",), Options(mpi="host", pwd="/"),
                         early.Started(Image(str(tmp_path), SANDBOX), USER, True, None, [],
                                       None), config.SiteConfig(bind_paths=()))
    kinds = [type(op).__name__ for op in made.mounts]
    assert kinds.count("LibraryPath") == 1 and kinds.count("CheckMPI") == 1
    assert kinds.index("CheckMPI") < kinds.index("LibraryPath")
    library = next(op for op in made.mounts if isinstance(op, ops.LibraryPath))
    assert library.mpi_dir == LIBS_DIR and library.gpu is None
    assert ops.Bind("/usr/lib/libmpi.so.40", f"{LIBS_DIR}/libmpi.so.40", readonly=True,
                    required=False) in made.mounts
    assert ops.Env("OMPI_COMM_WORLD_RANK", "0") in made.mounts

"""Runtime rules that need no namespaces: flags, binds, environment, config, messages."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from capsid import config
from capsid.cli import actions
from capsid.errors import UsageError
from capsid.runtime import binds, env, identity, userns


def test_action_flags_follow_pflag_rules() -> None:
    values, image, args = actions.parse("exec", [
        "-B", "/a:/b", "--bind=/c", "-ec", "--env", "X=1", "--cwd", "/w", "img.sif", "ls",
        "-la", "--bind", "x"])
    assert image == "img.sif" and args == ["ls", "-la", "--bind", "x"]
    assert values["bind"] == ["/a:/b", "/c"]
    assert values["cleanenv"] is True and values["contain"] is True
    assert values["env"] == ["X=1"] and values["pwd"] == "/w"
    values, image, _ = actions.parse("exec", ["-B/x", "--", "-weird-image"])
    assert values["bind"] == ["/x"] and image == "-weird-image"


@pytest.mark.parametrize(("argv", "message"), [
    (["--bogus", "img"], "unknown flag --bogus"),
    (["-Z", "img"], "unknown flag -Z"),
    (["--bind"], "--bind needs a value"),
    (["--pid=yes", "img"], "--pid takes no value"),
])
def test_bad_action_flags(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        actions.parse("exec", argv)


def test_bind_specs() -> None:
    assert binds.parse_bind("/data") == [binds.BindSpec("/data", "/data")]
    assert binds.parse_bind("/a:/b:ro,/c:rw") == [binds.BindSpec("/a", "/b", True),
                                                   binds.BindSpec("/c", "/c", False)]
    assert binds.parse_mount("type=bind,src=/a,dst=/b,ro") == binds.BindSpec("/a", "/b", True)
    with pytest.raises(UsageError, match="not an absolute path"):
        binds.parse_bind("/a:relative")
    with pytest.raises(UsageError, match="unknown bind option"):
        binds.parse_bind("/a:/b:rx")
    with pytest.raises(UsageError, match="only type=bind"):
        binds.parse_mount("type=tmpfs,dst=/x")


def test_container_env_blocks_and_forwards() -> None:
    host = {"HOME": "/h", "PATH": "/host/bin", "LD_LIBRARY_PATH": "/l", "FOO": "bar",
            "APPTAINER_BIND": "/x", "APPTAINERENV_INJ": "1", "SINGULARITYENV_OLD": "2",
            "TERM": "xterm", "bad-name": "x"}
    result = env.container_env(env.EnvOptions(home="/home/me", env=("A=1,B=2",)), host)
    assert result["PATH"] == env.DEFAULT_PATH and result["HOME"] == "/home/me"
    assert result["CAPSID_HOSTVARS"].split() == ["FOO"]
    assert result["CAPSID_H_FOO"] == "bar" and "CAPSID_H_LD_LIBRARY_PATH" not in result
    assert sorted(result["CAPSID_FORCED"].split()) == ["A", "B", "INJ", "OLD"]
    assert result["TERM"] == "xterm"
    clean = env.container_env(env.EnvOptions(cleanenv=True), host)
    assert clean["CAPSID_HOSTVARS"] == "" and clean["LANG"] == "C"


def test_no_env_keeps_those_host_variables_out() -> None:
    host = {"FOO": "x", "BAR": "y", "TERM": "t"}
    result = env.container_env(env.EnvOptions(no_env=("FOO", "TERM")), host)
    assert result["CAPSID_HOSTVARS"] == "BAR" and "TERM" not in result


def test_prepend_path_goes_to_the_runtime_script() -> None:
    result = env.container_env(env.EnvOptions(env=("PREPEND_PATH=/opt/bin",)), {})
    assert result["CAPSID_FORCED"] == "SING_USER_DEFINED_PREPEND_PATH"
    assert result["CAPSID_F_SING_USER_DEFINED_PREPEND_PATH"] == '"/opt/bin"'
    literal = env.container_env(env.EnvOptions(env=("A=$B'c",), no_eval=True), {})
    assert literal["CAPSID_F_A"] == "'$B'\"'\"'c'"


def test_forced_values_are_evaluated_as_apptainer_evaluates_them() -> None:
    """As the body of a double-quoted word, after the image's scripts; --no-eval: as given;
    a user's LD_LIBRARY_PATH keeps the run-time libraries."""
    scripts = {name: text.encode() for name, text in env.ENV_SCRIPTS.items()
               if name in ("99-base.sh", "99-runtimevars.sh")}
    opts = env.EnvOptions(env=("PATH=$PATH:/foo", "A=${UNSET:-d}/$HOME", 'Q=say "hi"',
                               "LD_LIBRARY_PATH=/l"), home="/h")
    done = env.finished_env(opts, scripts, {})
    assert done is not None
    assert done["PATH"] == env.DEFAULT_PATH + ":/foo"
    assert (done["A"], done["Q"]) == ("d//h", 'say "hi"')
    assert done["LD_LIBRARY_PATH"] == "/l:/.singularity.d/libs"
    as_given = env.finished_env(env.EnvOptions(env=("A=$HOME",), no_eval=True), scripts, {})
    assert as_given is not None and as_given["A"] == "$HOME"
    # a command substitution is left to the shell; a broken word is one error
    assert env.finished_env(env.EnvOptions(env=("A=$(id -u)",)), scripts, {}) is None
    with pytest.raises(UsageError, match="cannot be evaluated"):
        env.finished_env(env.EnvOptions(env=("A=${B",)), scripts, {})


def test_env_file(tmp_path: Path) -> None:
    f = tmp_path / "e"
    f.write_text("A=1\nexport B='two words'\n# c\n")
    assert env.read_env_file(str(f)) == {"A": "1", "B": "two words"}
    f.write_text("not an assignment\n")
    with pytest.raises(UsageError, match="line 1: 'not' is a command"):
        env.read_env_file(str(f))
    # read as a shell reads it: the host's variables, escapes, the file's own
    f.write_text('P="\\$PATH:/x"\nexport H=$HOME/y Q="$H z" # note\n')
    assert env.read_env_file(str(f), {"HOME": "/h"}) == {"P": "$PATH:/x", "H": "/h/y",
                                                          "Q": "/h/y z"}
    with pytest.raises(UsageError, match="larger than 1024 KiB"):
        env.read_env_file("/dev/zero")


def test_userns_error_names_the_sysctl() -> None:
    err = userns._userns_error(OSError(errno.EPERM, "Operation not permitted"))
    assert "user.max_user_namespaces" in err.hint
    assert "kernel.unprivileged_userns_clone" in err.hint


def test_site_config(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text("bind path = /scratch\nbind path = /a:/b\nmount home = no\n"
                    "sessiondir max size = 2048\n")
    site = config.load(str(conf))
    assert site.bind_paths == ("/scratch", "/a:/b")
    assert site.mount_home is False and site.tmpfs_size_mib == 2048
    assert config.load(str(tmp_path / "absent")).bind_paths == config.DEFAULT_BIND_PATHS


def test_passwd_and_group_generation() -> None:
    user = identity.User(1234, 1234, "alice", "alice", "Alice", "/home/alice", "/bin/bash")
    out = identity.passwd(b"root:x:0:0:root:/root:/bin/sh\n", user, "/home/alice").decode()
    assert out.splitlines()[-1] == "alice:x:1234:1234:Alice:/home/alice:/bin/bash"
    again = identity.passwd(out.encode(), user, "/elsewhere").decode()
    assert again.count("alice") == 1 and ":/elsewhere:" in again
    assert identity.group(b"root:x:0:\n", user).decode().endswith("alice:x:1234:alice\n")


def test_how_an_overlay_server_ended(tmp_path: Path) -> None:
    """Only a server that ended is blamed, with its status and its last words."""
    from capsid.runtime import overlayimg

    log = tmp_path / "overlay-image.log"
    assert overlayimg.ended(str(log)) is None  # no log yet
    log.write_text("Mounting read-only.\n")
    assert overlayimg.ended(str(log)) is None  # its greeting: still serving
    log.write_text("Mounting read-only.\n"
                   "capsid: a FUSE server of the overlay ended with status 137\n")
    assert overlayimg.ended(str(log)) == ("a FUSE server of the overlay ended with status 137 "
                                          "after: Mounting read-only.")


@pytest.mark.parametrize(("release", "version"), [
    ("6.18.44-fc-v1272", (6, 18)), ("4.18.0-553.el8_10.x86_64", (4, 18)),
    ("5.14.0-427.13.1.el9_4.x86_64", (5, 14)), ("6.10-rc1", (6, 10)), ("weird", (0, 0))])
def test_kernel_version(monkeypatch: pytest.MonkeyPatch, release: str,
                        version: tuple[int, int]) -> None:
    import os
    from types import SimpleNamespace

    from capsid.runtime import linux

    monkeypatch.setattr(os, "uname", lambda: SimpleNamespace(release=release))
    assert linux.kernel_version() == version


def test_an_overlay_image_that_cannot_be_served_is_one_error(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A kernel without what serving needs (here: no mount namespace of its own) gets a
    RuntimeSetupError, not an OSError, and the image's fd is closed."""
    import os

    from capsid.errors import RuntimeSetupError
    from capsid.runtime import linux, overlayimg

    def refused(_flags: int) -> None:
        raise OSError(errno.EPERM, "unshare: Operation not permitted")

    monkeypatch.setattr(linux, "unshare", refused)
    image = tmp_path / "overlay.img"
    image.write_bytes(b"")
    fd = os.open(image, os.O_RDONLY)
    with pytest.raises(RuntimeSetupError, match="cannot serve the overlay image"):
        overlayimg.serve(fd, str(tmp_path), True, str(tmp_path / "log"))
    with pytest.raises(OSError):
        os.fstat(fd)

"""Running containers as whoever runs the suite: root (kernel squashfs) and an ordinary user
(FUSE). scripts/test.sh runs the suite both ways."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CAPSID, live_squashfuse, run_capsid, until_gone, wait_for

pytestmark = pytest.mark.unprivileged
ROOT = os.geteuid() == 0


_TAKES_VALUE = {"-B", "--bind", "--mount", "--home", "--pwd", "--env", "--env-file",
                "--overlay", "--hostname"}


def capsid_exec(image: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    """``capsid exec [options] IMAGE command``, from (IMAGE, options..., command...)."""
    options = []
    rest = list(args)
    while rest and rest[0].startswith("-"):
        options.append(rest.pop(0))
        if options[-1] in _TAKES_VALUE:
            options.append(rest.pop(0))
    return run_capsid("exec", *options, image, *rest, **kw)


def test_apptainer_built_image_runs(shared_sifs: Path) -> None:
    image = shared_sifs / "apptainer-busybox_amd64.sif"
    assert capsid_exec(image, "echo", "hi").stdout == "hi\n"
    run = run_capsid("run", image, input="echo from the runscript; exit 3\n")
    assert (run.stdout, run.returncode) == ("from the runscript\n", 3)


def test_identity_inside_is_identity_outside(busybox_sif: Path) -> None:
    out = capsid_exec(busybox_sif, "sh", "-c", "id -u; id -g; echo $HOME; whoami",
                      check=True).stdout.split()
    me = pwd.getpwuid(os.getuid())
    assert out == [str(os.getuid()), str(os.getgid()), me.pw_dir, me.pw_name]


def test_python_in_debian_image(debian_sif: Path) -> None:
    assert capsid_exec(debian_sif, "python3", "-c", "print(6*9)", check=True).stdout == "54\n"


def test_exit_codes_pass_through(busybox_sif: Path) -> None:
    assert capsid_exec(busybox_sif, "sh", "-c", "exit 7").returncode == 7
    assert capsid_exec(busybox_sif, "false").returncode == 1


def test_signal_death_is_reported_as_a_signal(debian_sif: Path) -> None:
    result = capsid_exec(debian_sif, "sh", "-c", "kill -TERM $$")
    assert result.returncode == -signal.SIGTERM


def test_sigterm_from_outside_reaches_the_command(busybox_sif: Path, tmp_path: Path) -> None:
    """Slurm's SIGTERM at the time limit goes to the command itself (it is capsid's PID)."""
    proc = subprocess.Popen([str(CAPSID), "exec", "-B", f"{tmp_path}:/out", str(busybox_sif),
                             "sh", "-c", "trap 'echo got TERM > /out/t; exit 42' TERM; "
                             "touch /out/up; while :; do sleep 0.1; done"])
    wait_for((tmp_path / "up").exists, "the container's command started")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 42
    assert (tmp_path / "t").read_text() == "got TERM\n"


def test_background_job_and_wait_finish(busybox_sif: Path) -> None:
    start = time.monotonic()
    result = capsid_exec(busybox_sif, "sh", "-c", "sleep 1 & wait; echo done", timeout=20)
    assert result.stdout == "done\n" and time.monotonic() - start < 10


def test_stdin_and_pipes_pass_through(busybox_sif: Path) -> None:
    result = capsid_exec(busybox_sif, "tr", "a-z", "A-Z", input="hello\n", timeout=20)
    assert result.stdout == "HELLO\n"


def test_nothing_left_running_after_exit(busybox_sif: Path) -> None:
    capsid_exec(busybox_sif, "true", check=True)
    assert until_gone(lambda: live_squashfuse(busybox_sif)) == []


def test_kill_9_leaves_nothing_behind(busybox_sif: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen([str(CAPSID), "exec", "-B", f"{tmp_path}:/out", str(busybox_sif),
                             "sh", "-c", "touch /out/up; sleep 60"])
    wait_for((tmp_path / "up").exists, "the container's command started")
    proc.kill()
    proc.wait()
    assert until_gone(lambda: live_squashfuse(busybox_sif)) == []
    if ROOT:
        def loops() -> list[str]:
            listed = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
            return [line for line in listed.splitlines() if str(busybox_sif) in line]
        assert until_gone(loops) == []


def test_binds_read_write_and_read_only(busybox_sif: Path, tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    out.mkdir()
    (data / "in.txt").write_text("input\n")
    script = "cat /data/in.txt > /results/copy.txt; touch /data/x 2>/dev/null || echo ro"
    result = capsid_exec(busybox_sif, "-B", f"{data}:/data:ro,{out}:/results", "sh", "-c", script)
    assert result.stdout == "ro\n", result.stderr
    assert (out / "copy.txt").read_text() == "input\n"
    assert not (data / "x").exists()


def test_bind_same_path_and_mount_syntax_and_env(busybox_sif: Path, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("same\n")
    assert capsid_exec(busybox_sif, "-B", str(tmp_path), "cat", str(tmp_path / "f"),
                       cwd="/").stdout == "same\n"
    assert capsid_exec(busybox_sif, "--mount", f"type=bind,src={tmp_path},dst=/m,ro",
                       "cat", "/m/f").stdout == "same\n"
    env = dict(os.environ, APPTAINER_BIND=f"{tmp_path}:/viaenv")
    assert capsid_exec(busybox_sif, "cat", "/viaenv/f", env=env).stdout == "same\n"


def test_bind_into_a_directory_the_user_cannot_write(debian_sif: Path, tmp_path: Path) -> None:
    """/usr/share is root's in the image; the mount point is still made."""
    (tmp_path / "f").write_text("deep\n")
    result = capsid_exec(debian_sif, "-B", f"{tmp_path}:/usr/share/capsid-data/x", "sh", "-c",
                         "cat /usr/share/capsid-data/x/f; ls /usr/share | grep -c .")
    lines = result.stdout.split()
    assert lines[0] == "deep" and int(lines[1]) > 5, result.stderr


def test_missing_bind_source_is_a_clear_error(busybox_sif: Path, tmp_path: Path) -> None:
    result = capsid_exec(busybox_sif, "-B", f"{tmp_path}/absent:/x", "true")
    assert result.returncode == 255
    assert result.stderr == (f"capsid: error: bind source {tmp_path}/absent does not exist; "
                             "create it first or fix the --bind argument\n")


def test_home_cwd_and_their_options(busybox_sif: Path, tmp_path: Path) -> None:
    here = tmp_path / "work"
    here.mkdir()
    (here / "marker").write_text("cwd\n")
    assert capsid_exec(busybox_sif, "sh", "-c", "pwd; cat marker", cwd=here).stdout == \
        f"{here}\ncwd\n"
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    inside = capsid_exec(busybox_sif, "ls", "-d", str(home), cwd="/").stdout.strip()
    assert inside == str(home)
    alt = tmp_path / "althome"
    alt.mkdir()
    (alt / ".profile-marker").write_text("alt\n")
    result = capsid_exec(busybox_sif, "--home", f"{alt}:/home/me", "sh", "-c",
                         "echo $HOME; cat ~/.profile-marker", cwd="/")
    assert result.stdout == "/home/me\nalt\n", result.stderr
    result = capsid_exec(busybox_sif, "--pwd", "/etc", "pwd", cwd=here)
    assert result.stdout == "/etc\n"
    # as Apptainer's: a --pwd the container lacks is an error; a host directory it lacks
    # (--contain binds none) gives way to the home directory, with a warning
    missing = capsid_exec(busybox_sif, "--pwd", "/nonexistent", "pwd", cwd=here)
    assert (missing.returncode, missing.stdout) == (255, ""), missing.stderr
    assert missing.stderr == ("capsid: error: --pwd /nonexistent: no such file or directory "
                              "in the container; give a directory of the image, or one bound "
                              "into it\n")
    contained = capsid_exec(busybox_sif, "--contain", "pwd", cwd=here)
    assert contained.stdout == f"{home}\n"
    assert contained.stderr == f"WARNING: {here} is not in the container (no such file or " \
                               f"directory); starting in {home}\n"


def test_environment_rules(debian_sif: Path, tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("# comment\nFROM_FILE=file\nexport QUOTED='a b'\n")
    host = dict(os.environ, HOSTVAR="host", LD_LIBRARY_PATH="/host/lib",
                APPTAINERENV_INJECTED="injected", SINGULARITY_SECRET="x")
    script = ('echo "$HOSTVAR|$INJECTED|$FROM_FILE|$QUOTED|$SET|${SINGULARITY_SECRET:-unset}|'
              '$LD_LIBRARY_PATH|$APPTAINER_COMMAND"')
    result = capsid_exec(debian_sif, "--env", "SET=flag", "--env-file", str(env_file),
                         "sh", "-c", script, env=host)
    assert result.stdout == ("host|injected|file|a b|flag|unset|/.singularity.d/libs|exec\n"), \
        result.stderr
    clean = capsid_exec(debian_sif, "--cleanenv", "sh", "-c", 'echo "${HOSTVAR:-gone}|$LANG"',
                        env=host)
    assert clean.stdout == "gone|C\n"


def test_image_environment_wins_over_host_but_not_over_env_flag(
        busybox_sandbox: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "envimg"
    shutil.copytree(busybox_sandbox, root, symlinks=True)
    (root / ".singularity.d" / "env").mkdir(parents=True)
    (root / ".singularity.d" / "env" / "90-environment.sh").write_text(
        "#!/bin/sh\nexport WHO=image\nexport PATH=/opt/tools:$PATH\n")
    image = tmp_path / "env.sif"
    run_capsid("build", image, root, check=True)
    host = dict(os.environ, WHO="host")
    assert capsid_exec(image, "sh", "-c", 'echo "$WHO $PATH"', env=host).stdout == \
        "image /opt/tools:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    assert capsid_exec(image, "--env", "WHO=flag", "sh", "-c", "echo $WHO", env=host).stdout \
        == "flag\n"


@pytest.fixture
def shell_less_sif(tmp_path: Path) -> Path:
    """An image holding only a static busybox: no /bin/sh to source env scripts with."""
    root = tmp_path / "static"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "busybox").write_bytes(Path("/bin/busybox").read_bytes())
    (root / "bin" / "busybox").chmod(0o755)
    image = tmp_path / "static.sif"
    run_capsid("build", image, root, check=True)
    return image


def test_image_without_a_shell_runs(shell_less_sif: Path) -> None:
    image = shell_less_sif
    assert capsid_exec(image, "/bin/busybox", "echo", "no shell needed").stdout == \
        "no shell needed\n"
    # no shell to evaluate --env with: capsid does, as far as that goes without one
    values = dict(line.partition("=")[::2] for line in capsid_exec(
        image, "--env", "P=$PATH:/x", "--env", "PREPEND_PATH=/pre", "/bin/busybox",
        "env").stdout.splitlines())
    assert values["PATH"].startswith("/pre:") and values["P"] == values["PATH"][5:] + ":/x"


def test_read_only_by_default_writable_tmpfs_and_overlay(busybox_sif: Path,
                                                         tmp_path: Path) -> None:
    """busybox_sif was built by the current user, so its files are the user's to change."""
    ro = capsid_exec(busybox_sif, "sh", "-c", "echo x > /etc/new 2>/dev/null || echo ro")
    assert ro.stdout == "ro\n"
    tmpfs = capsid_exec(busybox_sif, "--writable-tmpfs", "sh", "-c", "echo x > /etc/new && "
                        "cat /etc/new")
    assert tmpfs.stdout == "x\n", tmpfs.stderr
    assert capsid_exec(busybox_sif, "cat", "/etc/new").returncode != 0
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    capsid_exec(busybox_sif, "--overlay", str(overlay), "sh", "-c", "echo kept > /etc/new",
                check=True)
    assert capsid_exec(busybox_sif, "--overlay", str(overlay), "cat", "/etc/new").stdout == \
        "kept\n"


def test_writable_sandbox(busybox_sandbox: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "sandbox"
    shutil.copytree(busybox_sandbox, root, symlinks=True)
    capsid_exec(root, "--writable", "sh", "-c", "echo persisted > /persisted", check=True)
    assert (root / "persisted").read_text() == "persisted\n"


def test_writable_on_a_sif_is_refused(busybox_sif: Path) -> None:
    result = capsid_exec(busybox_sif, "--writable", "true")
    assert result.returncode == 255
    assert result.stderr.startswith("capsid: error: --writable needs a sandbox directory")


def test_setuid_binary_in_image_gives_no_privilege(debian_sif: Path) -> None:
    result = capsid_exec(debian_sif, "sh", "-c", "stat -c %a:%u /usr/local/suid/busybox; "
                         "/usr/local/suid/busybox id -u; grep NoNewPrivs /proc/self/status")
    lines = result.stdout.splitlines()
    assert lines[0] in ("4755:0", "4755:65534"), result.stderr
    assert lines[1] == str(os.getuid())
    assert lines[2].split() == ["NoNewPrivs:", "1"]


def test_mounts_are_nosuid(busybox_sif: Path, tmp_path: Path) -> None:
    result = capsid_exec(busybox_sif, "-B", f"{tmp_path}:/data", "cat", "/proc/self/mountinfo")
    assert result.returncode == 0, result.stderr
    seen = set()
    for line in result.stdout.splitlines():
        fields = line.split()
        if fields[4] in ("/", "/data"):
            seen.add(fields[4])
            assert "nosuid" in fields[5].split(","), line
    assert seen == {"/", "/data"}, result.stdout


@pytest.mark.skipif(ROOT, reason="root may write anywhere on the host")
def test_fakeroot_cannot_touch_host_files_the_user_cannot(busybox_sif: Path) -> None:
    result = capsid_exec(busybox_sif, "--fakeroot", "-B", "/etc:/hostetc", "sh", "-c",
                         "id -u; touch /hostetc/capsid-was-here 2>/dev/null || echo denied")
    assert result.stdout == "0\ndenied\n", result.stderr
    assert not Path("/etc/capsid-was-here").exists()


def test_fakeroot_is_uid_zero(busybox_sif: Path) -> None:
    assert capsid_exec(busybox_sif, "--fakeroot", "id", "-u").stdout == "0\n"


def test_fakeroot_without_subordinate_ids_feigns_what_package_managers_need(
        busybox_sif: Path) -> None:
    """Where only the user is mapped, --fakeroot answers chown, set*id and device mknod
    with success and keeps apt root, as Apptainer's fakeroot command does there, so a
    package manager runs; --ignore-fakeroot-command lets them fail."""
    uid_map = capsid_exec(busybox_sif, "--fakeroot", "cat", "/proc/self/uid_map").stdout
    if uid_map.split()[2] != "1":
        pytest.skip("this user's --fakeroot maps more ids than its own: owners are real")
    script = ("touch /made && chown 5:5 /made && echo chowned; "
              "mknod /null c 1 3 && echo mknod; cat $APT_CONFIG")
    result = capsid_exec(busybox_sif, "--fakeroot", "--writable-tmpfs", "sh", "-c", script)
    assert result.stdout == 'chowned\nmknod\nAPT::Sandbox::User "root";\n', result.stderr
    result = capsid_exec(busybox_sif, "--fakeroot", "--ignore-fakeroot-command",
                         "--writable-tmpfs", "sh", "-c", script)
    assert "chowned" not in result.stdout and "mknod" not in result.stdout
    assert "APT" not in result.stdout
    # without --fakeroot nothing is feigned
    result = capsid_exec(busybox_sif, "--writable-tmpfs", "sh", "-c", "echo ${APT_CONFIG:-none}")
    assert result.stdout == "none\n"


def test_namespaces(busybox_sif: Path) -> None:
    # PID 1 is capsid's init; the command is PID 2 and gets signals like any process.
    pid = capsid_exec(busybox_sif, "--pid", "sh", "-c", "echo $$; cat /proc/1/comm").stdout
    assert 1 < int(pid.split()[0]) < 10 and pid.split()[1] != "sh"
    assert capsid_exec(busybox_sif, "--hostname", "capsid-node", "hostname").stdout == \
        "capsid-node\n"
    devs = capsid_exec(busybox_sif, "--net", "cat", "/proc/net/dev").stdout
    assert [line.split(":")[0].strip() for line in devs.splitlines()[2:]] == ["lo"]
    assert capsid_exec(busybox_sif, "--pid", "sh", "-c", "exit 9").returncode == 9
    assert capsid_exec(busybox_sif, "--pid", "sh", "-c", "kill -TERM $$").returncode == \
        -signal.SIGTERM


def test_containall_hides_host_dirs(busybox_sif: Path, tmp_path: Path) -> None:
    (tmp_path / "hostfile").write_text("x")
    result = capsid_exec(busybox_sif, "--containall", "sh", "-c",
                         f"ls {tmp_path} 2>/dev/null || echo hidden; ls /dev | wc -l; echo $$",
                         cwd=tmp_path)
    hidden, devices, pid = result.stdout.split()
    assert hidden == "hidden" and int(devices) < 25 and 1 < int(pid) < 10
    # /tmp and /var/tmp are empty and writable, the container's own
    tmp = capsid_exec(busybox_sif, "--contain", "sh", "-c",
                      "ls -A /tmp /var/tmp; touch /tmp/a /var/tmp/b && stat -c %a /tmp")
    assert tmp.stdout.splitlines()[-1] == "1777", tmp.stdout + tmp.stderr
    assert not [x for x in tmp.stdout.splitlines()[:-1] if x and not x.endswith(":")]


def test_unsquash_runs_without_fuse(busybox_sif: Path) -> None:
    assert capsid_exec(busybox_sif, "--unsquash", "echo", "unpacked").stdout == "unpacked\n"


def _job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMIX_", "PMI_", "CAPSID_CONFIG"))}
    return {**env, "SLURM_JOB_ID": "4242", "TMPDIR": str(tmp_path), **extra}


def _trees(tmp_path: Path) -> list[Path]:
    top = tmp_path / f"capsid-{os.getuid()}" / "unsquash"
    return sorted(p for p in top.iterdir() if p.is_dir()) if top.is_dir() else []


def test_unsquash_in_a_job_unpacks_once_per_node(busybox_sif: Path, tmp_path: Path) -> None:
    """In a job, --unsquash unpacks the image once into node-local storage; the next
    containers of the job bind it read-only instead of unpacking again."""
    env = _job_env(tmp_path)
    first = capsid_exec(busybox_sif, "--unsquash", "cat", "/etc/passwd", env=env)
    assert first.returncode == 0 and first.stdout.startswith("root:"), first.stderr
    [tree] = _trees(tmp_path)
    assert tree.name.startswith("4242-")
    made = tree.stat().st_ino, (tree / "bin" / "busybox").stat().st_ino
    again = capsid_exec(busybox_sif, "--unsquash", "sh", "-c",
                        "cat /etc/passwd >/dev/null && touch /bin/x 2>/dev/null || echo ro",
                        env=env)
    assert again.stdout == "ro\n", again.stderr
    assert (tree.stat().st_ino, (tree / "bin" / "busybox").stat().st_ino) == made
    assert _trees(tmp_path) == [tree] and not (tree / "bin" / "x").exists()
    # another job gets its own; outside a job nothing is kept
    other = capsid_exec(busybox_sif, "--unsquash", "true", env={**env, "SLURM_JOB_ID": "7"})
    assert other.returncode == 0 and len(_trees(tmp_path)) == 2
    env.pop("SLURM_JOB_ID")
    assert capsid_exec(busybox_sif, "--unsquash", "true", env=env).returncode == 0
    assert len(_trees(tmp_path)) == 2


def test_site_makes_unsquash_the_default_for_large_jobs(busybox_sif: Path,
                                                       tmp_path: Path) -> None:
    conf = tmp_path / "capsid.conf"
    conf.write_text("unsquash ranks = 4\n")
    small = _job_env(tmp_path, CAPSID_CONFIG=str(conf), OMPI_COMM_WORLD_SIZE="3",
                     OMPI_COMM_WORLD_LOCAL_SIZE="3")
    assert capsid_exec(busybox_sif, "--no-sharens", "true", env=small).returncode == 0
    assert _trees(tmp_path) == []
    large = {**small, "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    result = capsid_exec(busybox_sif, "--no-sharens", "echo", "ok", env=large)
    assert result.stdout == "ok\n", result.stderr
    assert len(_trees(tmp_path)) == 1


def test_run_test_and_shell_actions(busybox_sandbox: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "actions"
    shutil.copytree(busybox_sandbox, root, symlinks=True)
    sd = root / ".singularity.d"
    sd.mkdir()
    (sd / "runscript").write_text('#!/bin/sh\necho "run: $*"\n')
    (sd / "test").write_text("#!/bin/sh\necho testing; exit 4\n")
    (sd / "runscript").chmod(0o755)
    (sd / "test").chmod(0o755)
    image = tmp_path / "actions.sif"
    run_capsid("build", image, root, check=True)
    assert run_capsid("run", image, "a", "b").stdout == "run: a b\n"
    result = run_capsid("test", image)
    assert (result.stdout, result.returncode) == ("testing\n", 4)
    shell = run_capsid("shell", image, input='echo "prompt=$PS1"\n')
    assert shell.stdout == "prompt=Capsid> \n"


def test_command_not_found_and_bad_images(busybox_sif: Path, tmp_path: Path) -> None:
    result = capsid_exec(busybox_sif, "no-such-command")
    assert result.returncode == 255
    # Apptainer's phrase, which cwltool probes for, and capsid's hint
    assert result.stderr.startswith('capsid: error: "no-such-command": executable file not '
                                    "found in $PATH of the container; check the name")
    missing = run_capsid("exec", tmp_path / "none.sif", "true")
    assert missing.returncode == 255 and "does not exist" in missing.stderr
    junk = tmp_path / "junk"
    junk.write_text("junk")
    bad = run_capsid("exec", junk, "true")
    assert bad.returncode == 255 and "is not a container image" in bad.stderr


@pytest.mark.subids
def test_fakeroot_maps_subordinate_ids_when_granted(busybox_sif: Path) -> None:
    import getpass

    granted = any(line.split(":")[0] in (getpass.getuser(), str(os.getuid()))
                  for line in Path("/etc/subuid").read_text().splitlines() if line.strip()) \
        if Path("/etc/subuid").exists() else False
    if ROOT or not granted:
        pytest.skip("needs an ordinary user with an /etc/subuid entry")
    result = capsid_exec(busybox_sif, "--fakeroot", "cat", "/proc/self/uid_map")
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["0", str(os.getuid()), "1"], result.stderr
    assert len(rows) == 2 and rows[1][0] == "1" and int(rows[1][2]) >= 65536


def test_site_config_bind_paths(busybox_sif: Path, tmp_path: Path) -> None:
    shared = tmp_path / "site-data"
    shared.mkdir()
    (shared / "f").write_text("from the site\n")
    conf = tmp_path / "capsid.conf"
    conf.write_text(f"# site configuration\nbind path = {shared}:/site\nmount tmp = no\n")
    env = dict(os.environ, CAPSID_CONFIG=str(conf))
    assert capsid_exec(busybox_sif, "cat", "/site/f", env=env).stdout == "from the site\n"
    conf.write_text("mount home = maybe\n")
    bad = capsid_exec(busybox_sif, "true", env=env)
    assert bad.returncode == 255 and "is not yes or no" in bad.stderr



def test_without_overlay_mount_points_are_made_in_copies(busybox_sif: Path,
                                                          tmp_path: Path) -> None:
    """``enable overlay = no`` (or a kernel whose overlayfs cannot stack on the image):
    the image is bound as it is, and home, the working directory and binds into
    directories the image lacks or owns still land, the rest of those directories kept;
    the root stays read-only. An overlay the user asks for is still made."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("bound\n")
    conf = tmp_path / "capsid.conf"
    conf.write_text("enable overlay = no\n")
    env = dict(os.environ, CAPSID_CONFIG=str(conf))
    script = ("cat /new/deep/f /etc/data/f f; test -d \"$HOME\" && echo home; ls /etc | "
              "grep -c passwd; grep -c ' overlay ' /proc/self/mountinfo; "
              "touch /x 2>/dev/null || echo read-only")
    result = capsid_exec(busybox_sif, "-B", f"{data}:/new/deep", "-B", f"{data}:/etc/data",
                         "sh", "-c", script, env=env, cwd=data)
    assert result.stdout.split("\n") == ["bound", "bound", "bound", "home", "1", "0",
                                         "read-only", ""], result.stderr
    writable = capsid_exec(busybox_sif, "--writable-tmpfs", "sh", "-c", "touch /x && echo ok",
                           env=env)
    assert writable.stdout == "ok\n", writable.stderr
    conf.write_text("enable overlay = perhaps\n")
    bad = capsid_exec(busybox_sif, "true", env=env)
    assert bad.returncode == 255 and "is not yes, try or no" in bad.stderr

@pytest.mark.skipif(not ROOT, reason="changes /dev/fuse, which needs root")
def test_unusable_dev_fuse_falls_back_to_unpacking(busybox_sif: Path) -> None:
    import shutil
    import tempfile

    user = os.environ.get("CAPSID_TEST_USER", "capsid-test")
    try:
        pwd.getpwnam(user)
    except KeyError:
        pytest.skip(f"no user {user}")
    shared = Path(tempfile.mkdtemp(prefix="capsid-fuse-test-", dir="/var/tmp"))
    shared.chmod(0o755)
    image = shared / "image.sif"
    shutil.copyfile(busybox_sif, image)
    image.chmod(0o644)
    mode = os.stat("/dev/fuse").st_mode & 0o777
    os.chmod("/dev/fuse", 0o600)
    try:
        result = subprocess.run(["runuser", "-u", user, "--", str(CAPSID), "exec", str(image),
                                 "echo", "still runs"], capture_output=True, text=True,
                                cwd="/", check=False)
    finally:
        os.chmod("/dev/fuse", mode)
        shutil.rmtree(shared)
    assert result.stdout == "still runs\n", result.stderr
    assert result.stderr == ("WARNING: /dev/fuse is not usable by you: unpacking the image into "
                             "memory instead (ask an administrator to make /dev/fuse mode "
                             "0666)\n")


def test_image_without_a_shell_gets_its_oci_env(shell_less_sif: Path, tmp_path: Path) -> None:
    """No /bin/sh to source env scripts: the OCI Env kept in the SIF is applied directly."""
    from capsid.image import sif

    plain = shell_less_sif
    part = tmp_path / "part.sqfs"
    with sif.SifImage(plain) as f, open(part, "wb") as out:
        primary = f.primary_partition()
        assert primary is not None
        f.copy_to(primary, out)
    image = tmp_path / "oci.sif"
    with open(image, "wb") as out:
        sif.write(out, [sif.NewObject(sif.DataType.GENERIC_JSON,
                                      b'{"Env": ["GREETING=hello", "PATH=/bin"]}',
                                      "oci-config.json"),
                        sif.NewObject.partition(part, "amd64")], created_at=0)
    result = capsid_exec(image, "--env", "FORCED=yes", "/bin/busybox", "env")
    lines = result.stdout.splitlines()
    assert "GREETING=hello" in lines and "PATH=/bin" in lines and "FORCED=yes" in lines, \
        result.stderr


_WITHOUT_NEW_MOUNT_API = """
import errno, sys
from capsid.runtime import linux

def no_fsopen(*args, **kwargs):
    raise OSError(errno.ENOSYS, "fsopen: Function not implemented")

linux.fs_mount = no_fsopen
from capsid.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(ROOT, reason="root mounts squashfs with the kernel, not FUSE")
def test_fuse_without_the_new_mount_api(busybox_sif: Path) -> None:
    """Kernels before 5.2: the fd is mounted in the container, the helper waits for it."""
    argv = [sys.executable, "-c", _WITHOUT_NEW_MOUNT_API, "-d", "exec", str(busybox_sif),
            "sh", "-c", "sleep 0.2 & wait; cat /etc/hostname >/dev/null; echo done"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert "no detached FUSE mount" in proc.stderr
    assert until_gone(lambda: live_squashfuse(busybox_sif)) == []


@pytest.mark.skipif(ROOT, reason="root mounts squashfs with the kernel, not FUSE")
def test_squashfuse_is_not_the_commands_child(busybox_sif: Path) -> None:
    """A bare `wait` in the container must not wait for the image's server."""
    script = ("for s in /proc/[0-9]*/stat; do read -r line < $s; set -- $line; "
              "[ \"$4\" = $$ ] && echo \"child $2\"; done; echo checked")
    result = capsid_exec(busybox_sif, "sh", "-c", script, check=True, timeout=20)
    assert result.stdout.strip() == "checked", result.stdout


_WITH_SHELL_PRELUDE = """
import sys
from capsid.runtime import env

env.finished_env = lambda *args, **kwargs: None
from capsid.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _env_lines(text: str) -> dict[str, str]:
    """`env` output, without what each shell sets its own way (prompt, nesting level)."""
    pairs = (line.partition("=") for line in text.splitlines())
    return {k: v for k, _, v in pairs if k not in ("PS1", "SHLVL", "_")}


def test_starting_without_the_shell_gives_the_shells_environment(busybox_sif: Path) -> None:
    """Stock env scripts are applied in Python; the result must be what the shell makes."""
    host = {**os.environ, "FOO": "bar", "APPTAINERENV_PREPEND_PATH": "/pre",
            "APPTAINERENV_X": "forced", "LD_LIBRARY_PATH": "/host/lib",
            "APPTAINERENV_E": '${FOO:-unset} "$LD_LIBRARY_PATH" \\$PATH'}
    flags = ["--env", "Y=1", "--env", "P=$PATH:/foo"]
    direct = capsid_exec(busybox_sif, *flags, "env", env=host, check=True)
    shell = subprocess.run([sys.executable, "-c", _WITH_SHELL_PRELUDE, "exec", *flags,
                            str(busybox_sif), "env"], env=host, capture_output=True, text=True,
                           timeout=30)
    assert shell.returncode == 0, shell.stderr
    assert _env_lines(direct.stdout) == _env_lines(shell.stdout)
    values = _env_lines(direct.stdout)
    assert values["PATH"].startswith("/pre:") and values["X"] == "forced"
    assert values["FOO"] == "bar" and values["LD_LIBRARY_PATH"] == "/.singularity.d/libs"
    # evaluated as Apptainer evaluates them: after the image's scripts, before the host's
    # variables come back
    assert values["P"] == values["PATH"].removeprefix("/pre:") + ":/foo"
    assert values["E"] == 'unset "/.singularity.d/libs" $PATH'


def test_damaged_squashfs_is_a_clear_error(busybox_sif: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.sif"
    data = bytearray(busybox_sif.read_bytes())
    offset = data.find(b"hsqs")
    data[offset:offset + 4] = b"XXXX"
    damaged.write_bytes(bytes(data))
    result = capsid_exec(damaged, "true", timeout=30)
    assert result.returncode == 255
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capsid: error:"), result.stderr
    assert "internal error" not in result.stderr
    assert until_gone(lambda: live_squashfuse(damaged)) == []


def _cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        low, _, high = part.partition("-")
        cpus |= set(range(int(low), int(high or low) + 1))
    return cpus


@pytest.mark.skipif(ROOT, reason="root mounts squashfs with the kernel, not FUSE")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to pin")
@pytest.mark.parametrize("flags", [[], ["--pid"]])
def test_the_image_server_gets_all_the_cpus_once_the_command_runs(
        busybox_sif: Path, tmp_path: Path, flags: list[str]) -> None:
    """The start shares one CPU with squashfuse; the server must not keep it while the
    command reads through it (#22: seen pinned to CPU 0 for a container's whole life)."""
    proc = subprocess.Popen([str(CAPSID), "exec", *flags, "-B", f"{tmp_path}:/out",
                             str(busybox_sif), "sh", "-c", "touch /out/up; sleep 30"])
    try:
        wait_for((tmp_path / "up").exists, "the container's command started")
        (server,) = [int(line.split(":")[0]) for line in live_squashfuse(busybox_sif)]
        for task in Path(f"/proc/{server}/task").iterdir():
            status = (task / "status").read_text()
            listed = status.split("Cpus_allowed_list:", 1)[1].splitlines()[0]
            assert _cpu_list(listed) == os.sched_getaffinity(0), (task.name, listed)
    finally:
        proc.kill()
        proc.wait()


def test_the_command_gets_all_the_cpus_it_was_given(busybox_sif: Path) -> None:
    """The start runs on one CPU beside squashfuse; the command must not inherit that."""
    allowed = os.sched_getaffinity(0)
    result = capsid_exec(busybox_sif, "grep", "Cpus_allowed_list", "/proc/self/status",
                         check=True)
    listed = result.stdout.split(":", 1)[1].strip()
    inside: set[int] = set()
    for part in listed.split(","):
        low, _, high = part.partition("-")
        inside |= set(range(int(low), int(high or low) + 1))
    assert inside == allowed

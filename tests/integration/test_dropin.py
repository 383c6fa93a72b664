"""capsid as a drop-in Apptainer (#12): the apptainer/singularity/run-singularity names,
executable SIFs, Apptainer's pull options, sandboxes from registries, and Snakemake's
--sdm apptainer running unchanged."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import (
    CAPSID,
    live_squashfuse,
    process_identity,
    run_capsid,
    until_gone,
    wait_for,
)

ROOT = os.geteuid() == 0

pytestmark = pytest.mark.unprivileged
BIN = CAPSID.parent
NAMES = ("apptainer", "singularity")


def named(name: str, *args: str | os.PathLike[str], **kw: object
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / name), *map(str, args)], capture_output=True, text=True,
                          check=False, **kw)  # type: ignore[call-overload]


@pytest.mark.parametrize("name", NAMES)
def test_version_in_apptainers_form(name: str) -> None:
    from capsid import __version__
    from capsid.cli.main import APPTAINER_VERSION

    line = named(name, "--version").stdout
    assert line == f"apptainer version {APPTAINER_VERSION}+capsid.{__version__}\n"
    assert named(name, "version").stdout == f"{APPTAINER_VERSION}+capsid.{__version__}\n"
    verbose = named(name, "-v", "version").stdout.splitlines()
    assert verbose[1] == f"capsid version {__version__}"
    assert run_capsid("--version").stdout == f"capsid version {__version__}\n"
    # Snakemake's and other parsers: the last word is a PEP 440 version >= 1.0.0
    from packaging.version import Version

    assert Version(line.split()[-1]) >= Version("1.0.0")


@pytest.mark.parametrize("name", (*NAMES, "capsid"))
@pytest.mark.parametrize("verb", ("remote", "plugin", "oci", "checkpoint"))
def test_verbs_capsid_lacks_are_one_line(name: str, verb: str) -> None:
    result = named(name, verb, "list")
    assert result.returncode == 255
    assert result.stderr.count("\n") == 1 and "does not support" in result.stderr
    assert result.stderr.startswith(f"{name}: error: '{verb}'")


@pytest.mark.parametrize(("source", "hint"), [
    ("library://alpine:3", "docker:// or oras://"),
    ("shub://vsoch/hello-world", "Singularity Hub is gone"),
    ("docker-daemon:alpine:3", "docker save"),
    ("gopher://example.org/x", "docker://"),
])
def test_apptainer_sources_capsid_does_not_take_are_one_line(source: str, hint: str,
                                                             tmp_path: Path) -> None:
    """Every verb that takes an image says the same thing of a source Apptainer knows
    and capsid does not, with what to use instead; nothing is written."""
    scheme = source.split(":", 1)[0]
    for argv in (("exec", source, "true"), ("run", source), ("inspect", source),
                 ("pull", tmp_path / "out.sif", source), ("build", tmp_path / "b.sif", source),
                 ("build", "--sandbox", tmp_path / "box", source)):
        result = run_capsid(*argv, cwd=tmp_path)
        lines = result.stderr.splitlines()
        assert result.returncode == 255, (argv, result.stderr)
        assert len(lines) == 1 and lines[0].startswith(f"capsid: error: {scheme}:"), (argv, lines)
        assert "not supported" in lines[0] and hint in lines[0], (argv, lines)
    assert not list(tmp_path.iterdir())
    # a file of that name is an image like any other
    assert "not supported" not in run_capsid("exec", "library:x", "true", cwd=tmp_path).stderr


@pytest.mark.parametrize("verb", ("inspect", "run-help", "doctor"))
def test_a_uri_where_a_file_is_read_says_to_pull_it(verb: str, tmp_path: Path) -> None:
    for uri in ("docker://registry.example/app:1", "oras://registry.example/app:1",
                "docker-archive:app.tar"):
        result = run_capsid(verb, uri, cwd=tmp_path)
        assert result.returncode == 255
        assert result.stderr == (f"capsid: error: this command reads an image file, not {uri}; "
                                 f"pull it first (capsid pull IMAGE.sif {uri}) and give "
                                 "IMAGE.sif\n")
    result = run_capsid(verb, "instance://web", cwd=tmp_path)
    assert result.returncode == 255 and "exec, run, shell and test only" in result.stderr


def test_messages_name_the_command_as_run(tmp_path: Path) -> None:
    result = named("singularity", "exec", tmp_path / "missing.sif", "true")
    assert result.returncode == 255 and result.stderr.startswith("singularity: error:")
    for verb in ("exec", "pull"):
        usage = named("apptainer", verb, "--help").stdout
        assert usage.lower().startswith(f"usage: apptainer {verb}"), usage


@pytest.fixture
def runscript_sif(busybox_sif: Path, tmp_path: Path) -> Path:
    recipe = tmp_path / "args.def"
    recipe.write_text(textwrap.dedent(f"""\
        Bootstrap: localimage
        From: {busybox_sif}

        %runscript
            echo "args: $*"
        """))
    out = tmp_path / "args.sif"
    result = run_capsid("build", out, recipe)
    assert result.returncode == 0, result.stderr
    return out


def test_executable_sifs(runscript_sif: Path, tmp_path: Path) -> None:
    """A SIF is written 0777 less the umask and runs itself through run-singularity."""
    env = dict(os.environ, PATH=f"{BIN}:/usr/bin:/bin")
    assert runscript_sif.stat().st_mode & 0o777 == 0o777 & ~_umask()
    direct = subprocess.run([str(runscript_sif), "one", "two words"], capture_output=True,
                            text=True, env=env, check=False)
    assert (direct.returncode, direct.stdout) == (0, "args: one two words\n"), direct.stderr
    through = named("run-singularity", runscript_sif, "three")
    assert through.stdout == "args: three\n", through.stderr
    private = tmp_path / "private.sif"
    subprocess.run(["sh", "-c", f'umask 077 && "{CAPSID}" build "{private}" "{runscript_sif}"'],
                   check=True)
    assert private.stat().st_mode & 0o777 == 0o700


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_pull_with_apptainers_options(hub_env: dict[str, str], tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    first = named("apptainer", "pull", "--name", "abc.simg", "docker://busybox:1", cwd=work,
                  env=hub_env)
    assert first.returncode == 0, first.stderr
    assert (work / "abc.simg").is_file()
    again = named("apptainer", "pull", "--name", "abc.simg", "docker://busybox:1", cwd=work,
                  env=hub_env)
    assert again.returncode == 255 and "--force" in again.stderr
    assert named("apptainer", "pull", "--force", "--name", "abc.simg", "docker://busybox:1",
                 cwd=work, env=hub_env).returncode == 0
    (tmp_path / "images").mkdir()
    default = named("singularity", "pull", "--dir", tmp_path / "images", "docker://busybox:1",
                    cwd=work, env=hub_env)
    assert default.returncode == 0, default.stderr
    assert (tmp_path / "images" / "busybox_1.sif").is_file()
    box = named("apptainer", "pull", "--sandbox", "--disable-cache", "docker://busybox:1",
                cwd=work, env=hub_env)
    assert box.returncode == 0, box.stderr
    assert (work / "busybox_1" / "bin" / "busybox").is_file()


def test_the_seeds_sandbox_demo_verbatim(hub_env: dict[str, str], tmp_path: Path) -> None:
    """build --sandbox from a registry (streamed, no SIF), shell --writable, build a SIF of
    the sandbox, run it as a program."""
    env = dict(hub_env, PATH=f"{BIN}:/usr/bin:/bin")

    def apptainer(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["apptainer", *args], capture_output=True, text=True,
                                cwd=tmp_path, env=env, input=stdin, check=False)
        assert result.returncode == 0, (args, result.stderr)
        return result

    apptainer("build", "--sandbox", "alpine-sandbox", "docker://alpine")
    box = tmp_path / "alpine-sandbox"
    assert (box / ".singularity.d" / "runscript").is_file()
    assert (box / ".singularity.d" / "env" / "10-docker2singularity.sh").is_file()
    apptainer("shell", "--writable", "alpine-sandbox", stdin=(
        "mkdir -p /usr/local/bin\n"
        "printf '#!/bin/sh\\necho hello from the sandbox\\n' > /usr/local/bin/hello\n"
        "chmod +x /usr/local/bin/hello\nexit\n"))
    assert (box / "usr/local/bin/hello").is_file()
    # the runscript runs hello: the image's default command is replaced by the user's
    (box / ".singularity.d" / "runscript").write_text("#!/bin/sh\nexec hello \"$@\"\n")
    apptainer("build", "alpine-sandbox.sif", "alpine-sandbox/")
    ran = subprocess.run(["./alpine-sandbox.sif"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, check=False)
    assert (ran.returncode, ran.stdout) == (0, "hello from the sandbox\n"), ran.stderr


SNAKEFILE = """\
rule all:
    input: "shell.txt", "script.txt", "shadow.txt", "local.txt"

rule in_shell:
    output: "shell.txt"
    container: "docker://debian-python3:12"
    shell: "test -d /.singularity.d && echo inside > {output}; ls /mnt/extra >> {output}"

rule in_script:
    output: "script.txt"
    container: "docker://debian-python3:12"
    script: "write.py"

rule in_shadow:
    output: "shadow.txt"
    shadow: "minimal"
    container: "docker://debian-python3:12"
    shell: "test -d /.singularity.d && echo inside > {output}"

rule with_local_sif:
    output: "local.txt"
    container: "local.sif"
    shell: "test -d /.singularity.d && echo inside > {output}"
"""


@pytest.mark.parametrize("name", NAMES)
def test_snakemake_sdm_apptainer(name: str, hub_env: dict[str, str], tmp_path: Path,
                                 debian_sif: Path) -> None:
    """Snakemake 9 unchanged, with the drop-in first (or alone) on PATH."""
    snakemake = shutil.which("snakemake", path=str(Path(sys.executable).parent))
    if snakemake is None:
        pytest.skip("snakemake is not installed (pip install -e '.[dev]' installs it)")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(BIN / name, bindir / name)
    work = tmp_path / "flow"
    work.mkdir()
    (work / "Snakefile").write_text(SNAKEFILE)
    (work / "write.py").write_text(
        "import os\n"
        "open(snakemake.output[0], 'w').write(str(os.path.isdir('/.singularity.d')) + '\\n')\n")
    shutil.copy(debian_sif, work / "local.sif")
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "marker").write_text("")
    env = dict(hub_env, PATH=f"{bindir}:/usr/bin:/bin")
    argv = [snakemake, "--cores", "1", "--sdm", "apptainer", "--apptainer-args",
            f"-B {extra}:/mnt/extra"]
    first = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True,
                           check=False, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    # /.singularity.d exists only inside a container: each rule ran in one
    assert (work / "shell.txt").read_text() == "inside\nmarker\n"
    assert (work / "script.txt").read_text() == "True\n"
    assert (work / "shadow.txt").read_text() == "inside\n"
    assert (work / "local.txt").read_text() == "inside\n"
    pulled = sorted((work / ".snakemake" / "singularity").glob("*.simg"))
    assert len(pulled) == 1
    stamp = pulled[0].stat().st_mtime_ns
    # A second run pulls nothing again; a failing rule fails the workflow.
    (work / "Snakefile").write_text(SNAKEFILE.replace('"local.txt"', '"local.txt", "fail.txt"')
                                    + '\nrule failing:\n    output: "fail.txt"\n'
                                      '    container: "docker://debian-python3:12"\n'
                                      '    shell: "exit 3"\n')
    second = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True,
                            check=False, timeout=600)
    assert second.returncode != 0 and "fail.txt" in second.stdout + second.stderr
    assert pulled[0].stat().st_mtime_ns == stamp
    assert "will be pulled" not in second.stdout + second.stderr


def _fuse_servers() -> list[str]:
    """Live (not zombie) fuse2fs and fuse-overlayfs processes of this user."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[0] == "Z" or os.stat(f"/proc/{pid}").st_uid != os.getuid():
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if argv0.endswith(("fuse2fs", "fuse-overlayfs")):
            found.append(f"{pid} {argv0}")
    return found


def _wait_lock(image: Path, held: bool) -> None:
    """Until a container holds the image's lock (*held*), or none does."""
    import fcntl

    with open(image, "rb") as f:
        for _ in range(300):
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                if not held:
                    return
            except BlockingIOError:
                if held:
                    return
            subprocess.run(["sleep", "0.1"], check=True)
    raise AssertionError(f"the overlay image's lock was never {'held' if held else 'free'}")


def test_persistent_overlay_image(debian_sif: Path, tmp_path: Path) -> None:
    """overlay create; a write in one run is there in the next; a second writer is
    refused while the first runs; readers (:ro) share; kill -9 leaves no server."""
    need_tools = [t for t in ("fuse2fs", "fuse-overlayfs", "mkfs.ext3") if not shutil.which(
        t, path="/usr/sbin:/usr/bin:/sbin:/bin")]
    if need_tools:
        pytest.skip(f"needs {', '.join(need_tools)} (scripts/setup.sh installs them)")
    servers_before = set(_fuse_servers())  # another test's (or run's) are not this one's
    image = tmp_path / "overlay.img"
    made = named("apptainer", "overlay", "create", "--fakeroot", "--size", "96", image)
    assert made.returncode == 0, made.stderr
    assert image.stat().st_size == 96 << 20
    again = named("apptainer", "overlay", "create", "--size", "96", image)
    assert again.returncode == 255 and "already exists" in again.stderr
    forced = named("apptainer", "overlay", "create", "--fakeroot", "--force", "--sparse",
                   "--size", "96", image)
    assert forced.returncode == 0, forced.stderr
    assert image.stat().st_blocks * 512 < 96 << 20  # sparse
    spec = f"{image}"

    def in_overlay(*argv: str, ro: bool = False) -> subprocess.CompletedProcess[str]:
        return run_capsid("exec", "--fakeroot", "--overlay", spec + (":ro" if ro else ""),
                          debian_sif, *argv, timeout=60)

    first = in_overlay("sh", "-c", "echo kept > /etc/kept && mkdir -p /opt/new && "
                       "echo 1 > /opt/new/f")
    assert first.returncode == 0, first.stderr
    second = in_overlay("sh", "-c", "cat /etc/kept /opt/new/f && echo 2 >> /opt/new/f")
    assert (second.returncode, second.stdout) == (0, "kept\n1\n"), second.stderr
    read = in_overlay("cat", "/opt/new/f", ro=True)
    assert (read.returncode, read.stdout) == (0, "1\n2\n"), read.stderr
    plain = run_capsid("exec", debian_sif, "cat", "/etc/kept")
    assert plain.returncode != 0  # the image itself is unchanged
    # One writer at a time; readers together.
    _wait_lock(image, held=False)  # the servers of the runs above have ended
    holder = subprocess.Popen([str(CAPSID), "exec", "--fakeroot", "--overlay", spec,
                               str(debian_sif), "sleep", "30"], stderr=subprocess.PIPE)
    try:
        _wait_lock(image, held=True)
        other = in_overlay("true")
        assert other.returncode == 255 and "in use by another container" in other.stderr
        assert other.stderr.count("\n") == 1, other.stderr
    finally:
        holder.kill()  # SIGKILL of the container
        holder.wait()
    assert until_gone(lambda: sorted(set(_fuse_servers()) - servers_before)) == []
    readers = [subprocess.Popen([str(CAPSID), "exec", "--overlay", f"{spec}:ro",
                                 str(debian_sif), "cat", "/etc/kept"], stdout=subprocess.PIPE,
                                text=True) for _ in range(2)]
    assert [r.communicate(timeout=60)[0] for r in readers] == ["kept\n", "kept\n"]
    after_kill = in_overlay("cat", "/etc/kept")
    assert after_kill.stdout == "kept\n", after_kill.stderr
    bad = run_capsid("exec", "--overlay", str(tmp_path / "args.def"), debian_sif, "true")
    assert bad.returncode == 255


def test_an_overlay_image_made_without_fakeroot_is_written_as_the_user(
        debian_sif: Path, tmp_path: Path) -> None:
    """Apptainer's documented example: 'overlay create --create-dir /var/cache/nginx',
    then a plain exec writes there (and in /, the image's upper root, also the user's);
    the image's own directories stay the image's; no capability is left to the command."""
    if any(shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin") is None
           for t in ("fuse2fs", "fuse-overlayfs", "mkfs.ext3")):
        pytest.skip("needs fuse2fs, fuse-overlayfs and mkfs.ext3 (scripts/setup.sh)")
    image = tmp_path / "nginx.img"
    made = named("apptainer", "overlay", "create", "--size", "64", "--create-dir",
                 "/var/cache/nginx", "--create-dir", "/opt/app/data", image)
    assert made.returncode == 0, made.stderr
    wrote = run_capsid("exec", "--overlay", image, debian_sif, "sh", "-c",
                       "cat > /var/cache/nginx/test && echo 2 > /opt/app/data/f && "
                       "echo 3 > /top && grep CapInh /proc/self/status && "
                       "stat -c %u /var/cache/nginx", input="1\n", timeout=60)
    assert wrote.returncode == 0, wrote.stderr
    assert wrote.stdout == f"CapInh:\t0000000000000000\n{os.getuid()}\n"
    etc = run_capsid("exec", "--overlay", image, debian_sif, "sh", "-c", "echo x > /etc/z",
                     timeout=60)
    assert (etc.returncode == 0) == ROOT, etc.stderr  # the image's /etc is root's
    # an instance on the image is joined (its root is served by FUSE in its user
    # namespace, which answers nobody outside it: it is opened once inside)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    name = f"ovl{os.getpid()}"
    started = run_capsid("instance", "start", "--overlay", image, debian_sif, name, env=env,
                         timeout=60)
    assert started.returncode == 0, started.stderr
    try:
        joined = run_capsid("exec", f"instance://{name}", "sh", "-c",
                            "echo 4 >> /top && cat /top", env=env, timeout=60)
        assert (joined.returncode, joined.stdout) == (0, "3\n4\n"), joined.stderr
    finally:
        assert run_capsid("instance", "stop", name, env=env).returncode == 0
    _wait_lock(image, held=False)
    read = run_capsid("exec", "--overlay", f"{image}:ro", debian_sif, "cat",
                      "/var/cache/nginx/test", "/opt/app/data/f", "/top", timeout=60)
    assert (read.returncode, read.stdout) == (0, "1\n2\n3\n4\n"), read.stderr
    for bad, why in (("relative", "not an absolute path"), ("/a/../b", "not an absolute"),
                     ("/", "names the root")):
        refused = run_capsid("overlay", "create", "--create-dir", bad, tmp_path / "x.img")
        assert refused.returncode == 255 and why in refused.stderr, refused.stderr
        assert refused.stderr.count("\n") == 1
    assert not (tmp_path / "x.img").exists()
    missing = run_capsid("exec", "--overlay", tmp_path / "x.img", debian_sif, "true")
    assert missing.returncode == 255 and missing.stderr.count("\n") == 1
    assert "capsid overlay create --size 1024" in missing.stderr, missing.stderr


def _overlay_processes(capsid: int) -> list[int]:
    """The read-only overlay image's script (which names capsid process *capsid*), and
    the server and watcher it started, alive."""
    scripts, parents = [], {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        parents[int(pid)] = int(fields[1])
        if b"capsid-overlay" in argv and str(capsid).encode() in argv:
            scripts.append(int(pid))
    return scripts + [pid for pid, parent in parents.items() if parent in scripts]


def test_an_overlay_images_server_lives_outside_the_container(debian_sif: Path,
                                                               tmp_path: Path) -> None:
    """fuse2fs serving an ``--overlay IMG:ro``, and its watcher, run in a mount namespace
    of their own, with the host's root, on every CPU. In the container's, its
    ``pivot_root`` moved a watcher still starting into the session or the image, where it
    found no ``tail`` (or the image's own) and stopped the server at once: the root then
    could not be stacked ("Transport endpoint is not connected"), now and then."""
    if shutil.which("fuse2fs", path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
        pytest.skip("needs fuse2fs (scripts/setup.sh installs it)")
    image = tmp_path / "overlay.img"
    assert run_capsid("overlay", "create", "--size", "64", image).returncode == 0
    host_root = os.stat("/")
    container = subprocess.Popen(
        [str(CAPSID), "exec", "--overlay", f"{image}:ro", str(debian_sif), "sh", "-c",
         "readlink /proc/self/ns/mnt; exec sleep 30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert container.stdout is not None
        namespace = container.stdout.readline().strip()
        assert namespace.startswith("mnt:["), container.stderr.read() if container.stderr else ""
        wait_for(lambda: len(_overlay_processes(container.pid)) >= 4,
                 "the overlay image's script, fuse2fs, the watcher and its tail")
        for pid in _overlay_processes(container.pid):
            assert os.readlink(f"/proc/{pid}/ns/mnt") != namespace
            root = os.stat(f"/proc/{pid}/root")  # not the image's, nor the session's
            assert (root.st_dev, root.st_ino) == (host_root.st_dev, host_root.st_ino)
            # not left on the one CPU the set-up shared with squashfuse
            assert os.sched_getaffinity(pid) == os.sched_getaffinity(0)
    finally:
        container.kill()
        container.wait()
    assert until_gone(lambda: [str(p) for p in _overlay_processes(container.pid)]) == []


def _loop_devices(image: Path) -> list[str]:
    """Loop devices backed by *image* (root mounts a SIF's squashfs with the kernel)."""
    if not ROOT:
        return []
    listed = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False)
    return [line for line in listed.stdout.splitlines() if str(image.resolve()) in line]


def test_instances(busybox_sif: Path, tmp_path: Path) -> None:
    """instance start runs %startscript in the background and outlives its shell; list
    (JSON); exec instance:// joins it and sees its processes (--pid); a second start
    of the name is one error; stop leaves no process, mount or state file."""
    recipe = tmp_path / "service.def"
    recipe.write_text(textwrap.dedent(f"""\
        Bootstrap: localimage
        From: {busybox_sif}

        %startscript
            echo "started with $*" > /data/service.log
            exec sleep 1000
        """))
    image = tmp_path / "service.sif"
    assert run_capsid("build", image, recipe).returncode == 0
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    name = f"svc{os.getpid()}"
    # started from a shell that exits at once: the instance lives on
    shell = subprocess.run(["sh", "-c", f'"{CAPSID}" instance start --pid -B "{tmp_path}:/data" '
                            f'"{image}" {name} one two; exit 0'], env=env, capture_output=True,
                           text=True, timeout=60, check=False)
    assert shell.returncode == 0 and f"instance {name} started" in shell.stderr, shell.stderr
    try:
        import json

        listed = json.loads(run_capsid("instance", "list", "--json", env=env).stdout)
        (entry,) = listed["instances"]
        assert entry["instance"] == name and entry["img"] == str(image.resolve())
        pid = int(entry["pid"])
        # the listed process is the instance: in a mount namespace other than ours, the
        # image's server alive beside it; its start time tells it from a later one
        identity = process_identity(pid)
        assert identity is not None
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert live_squashfuse(image) or _loop_devices(image)
        wait_for(lambda: Path(tmp_path / "service.log").exists(), "the startscript ran")
        log = run_capsid("exec", f"instance://{name}", "cat", "/data/service.log", env=env)
        assert log.stdout == "started with one two\n", log.stderr
        seen = run_capsid("exec", f"instance://{name}", "ps", "-o", "args", env=env).stdout
        assert "sleep 1000" in seen, seen  # its processes: the same PID namespace
        assert process_identity(pid) == identity
        again = run_capsid("instance", "start", image, name, env=env)
        assert again.returncode == 255 and "running already" in again.stderr
        assert again.stderr.count("\n") == 1
        assert "apptainer instance list" not in named("apptainer", "instance", "list",
                                                      env=env).stdout
        # Apptainer's patterns and --logs
        assert name in run_capsid("instance", "list", "svc*", env=env).stdout
        assert name not in run_capsid("instance", "list", "other*", env=env).stdout
        logs = run_capsid("instance", "list", "--logs", name, env=env).stdout.split()
        assert logs[:3] == ["INSTANCE", "NAME", "PID"] and logs[3] == "LOGS"
        assert logs[4:6] == [name, str(pid)] and logs[6] == entry["logErrPath"]
        assert logs[7] == entry["logOutPath"]
    finally:  # a pattern, as Apptainer's 'instance stop mysql*'
        stopped = run_capsid("instance", "stop", "svc*", env=env)
    assert stopped.returncode == 0 and f"instance {name} stopped" in stopped.stderr, \
        stopped.stderr
    # nothing of it runs on: not its first process (the same PID with the same start
    # time), nor the image's server that held its mounts
    assert until_gone(lambda: [identity] if process_identity(pid) == identity else []) == []
    assert until_gone(lambda: live_squashfuse(image) + _loop_devices(image)) == []
    assert list((runtime / "capsid" / "instances").glob("*.json")) == []
    assert run_capsid("instance", "list", "--json", env=env).stdout.count(name) == 0
    none = run_capsid("instance", "stop", "svc*", env=env)
    assert none.returncode == 255 and "no instance matches 'svc*'" in none.stderr
    gone = run_capsid("exec", f"instance://{name}", "true", env=env)
    assert gone.returncode == 255 and "no instance named" in gone.stderr
    failed = run_capsid("instance", "start", "--overlay", tmp_path / "missing-dir", image, name,
                        env=env)
    assert failed.returncode == 255 and failed.stderr.count("\n") == 1, failed.stderr
    assert not any((runtime / "capsid" / "instances").rglob(f"{name}*"))

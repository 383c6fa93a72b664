"""Drop-in for real clients and published recipes (#20): what cwltool, singularity-compose
and recipes from Apptainer's docs, Jupyter and BioContainers rely on, as root and as an
ordinary user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import CAPSID, one_error, run_capsid
from tests.support.registry import Registry

pytestmark = pytest.mark.unprivileged


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


# -- flags -------------------------------------------------------------------------------

def test_cwltools_command_line(busybox_sif: Path, tmp_path: Path) -> None:
    """cwltool's own flags for Apptainer >= 1.1: --no-eval, --userns, an explicit --home
    under --contain (bound, and writable), --net --network none, --pwd."""
    outdir = tmp_path / "out"
    outdir.mkdir()
    result = subprocess.run(
        [str(CAPSID), "--quiet", "exec", "--contain", "--ipc", "--cleanenv", "--no-eval",
         "--userns", "--home", f"{outdir}:/var/lib/cwl/home", "--bind",
         f"{tmp_path}:/tmp:rw", "--pwd", "/var/lib/cwl/home", "--net", "--network", "none",
         "--network-args", "portmap=8080:80/tcp", str(busybox_sif), "sh", "-c",
         'echo out > result.txt; echo "$HOME $PWD"'],
        capture_output=True, text=True, timeout=60, check=False,
        env=dict(os.environ, SINGULARITYENV_TMPDIR="/tmp"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "/var/lib/cwl/home /var/lib/cwl/home\n"
    assert (outdir / "result.txt").read_text() == "out\n"


def test_contain_gives_an_empty_writable_home(busybox_sif: Path) -> None:
    result = run_capsid("exec", "--contain", busybox_sif, "sh", "-c",
                        'ls -A "$HOME" | wc -l; touch "$HOME/x" && echo writable')
    assert result.stdout.split() == ["0", "writable"], result.stderr


def test_cwltools_userns_probe_finds_apptainers_words(busybox_sif: Path) -> None:
    """cwltool decides whether --userns works by the words of a missing command's error."""
    result = run_capsid("exec", "--userns", busybox_sif, "no-such-program")
    assert "executable file not found in" in one_error(result)


def test_apptainerenv_home_is_a_warning(busybox_sif: Path) -> None:
    for name in ("APPTAINERENV_HOME", "SINGULARITYENV_HOME"):
        result = run_capsid("exec", busybox_sif, "sh", "-c", 'echo "$HOME"',
                            env=dict(os.environ, **{name: "/elsewhere"}))
        assert result.returncode == 0 and result.stdout != "/elsewhere\n", result.stderr
        assert "WARNING" in result.stderr and "HOME" in result.stderr


def test_every_apptainer_flag_is_taken_or_refused_in_one_line(busybox_sif: Path,
                                                             tmp_path: Path) -> None:
    """Each flag of capsid.cli.compat: accepted (the command runs) or refused with one
    line naming the flag — never 'unknown flag'."""
    from capsid.cli import compat

    for name, _, value, _, kind, _ in compat.rows("exec"):
        argv = [f"--{name}", *(["x"] if value else [])]
        result = run_capsid("exec", *argv, busybox_sif, "true")
        assert "unknown flag" not in result.stderr, (name, result.stderr)
        if kind == "refused":
            one_error(result, f"--{name}")
        else:
            assert result.returncode == 0, (name, result.stderr)
    for verb, argv in (("build", ["--encrypt", str(tmp_path / "o.sif"), str(busybox_sif)]),
                       ("pull", ["--library", "x", "docker://busybox"])):
        one_error(run_capsid(verb, *argv), argv[0])
    apps = run_capsid("inspect", "--list-apps", busybox_sif)  # none, listed
    assert (apps.returncode, apps.stdout, apps.stderr) == (0, "", "")
    accepted = run_capsid("build", "--fix-perms", "--no-cleanup", tmp_path / "o.sif",
                          busybox_sif)
    assert accepted.returncode == 0, accepted.stderr


#: Apptainer 1.4's flags of each command (a name ending in = takes a value), from its
#: cmd/internal/cli sources: capsid must take each, or refuse it in one line
APPTAINER_FLAGS = {
    "pull": "allow-unauthenticated allow-unsigned arch-variant= arch= dir= disable-cache "
            "library= name= reproducible sandbox",
    "push": "allow-unsigned annotation= description= library=",
    "build": "arch-variant= arch= bind= build-arg-file= build-arg= compat32 data "
             "disable-cache encrypt fakeroot fix-perms ignore-fakeroot-command ignore-proot "
             "ignore-subuid ignore-userns json library= mksquashfs-args= mount= no-cleanup "
             "notest nv nvccli remote reproducible rocm sandbox section= update userns "
             "warn-unused-build-args writable-tmpfs",
    "inspect": "all app= deffile environment helpfile json labels list-apps runscript "
               "startscript test",
    "cache clean": "days= dry-run force type=",
    "cache list": "type= verbose",
    "instance list": "all json logs user=",
    "instance stop": "all force signal= timeout= user=",
    "overlay create": "create-dir= fakeroot size= sparse",
    "key newpair": "comment= email= name= password= push",
    "key list": "secret",
    "key export": "armor secret",
    "key import": "new-password",
    "sign": "all group-id= groupid= id= key= keyidx= sif-id=",
    "verify": "all certificate-intermediates= certificate-roots= certificate= group-id= "
              "groupid= id= json key= legacy-insecure local ocsp-verify sif-id= url=",
    "registry login": "config= password-stdin password= username=",
    "run-help": "app=",
    "exec": "add-caps= allow-setuid app= apply-cgroups= bind= blkio-weight-device= "
            "blkio-weight= boot cdi-dirs= cleanenv compat compat32 contain containall "
            "containlibs= cpu-shares= cpus= cpuset-cpus= cpuset-mems= cwd= device= "
            "disable-cache dmtcp-launch= dmtcp-restart= dns= drop-caps= env-file= env= "
            "fakeroot fusemount= home= hostname= ignore-fakeroot-command ignore-subuid "
            "ignore-userns intel-hpu ipc keep-privs memory-reservation= memory-swap= memory= "
            "mount= net netns-path= network-args= network= no-env= no-eval no-home no-init "
            "no-mount= no-nv no-pid no-privs no-rocm no-umask nv nvccli oom-kill-disable "
            "overlay= pid pids-limit= pwd= rocm runscript-timeout= scratch= security= "
            "sharens shell= tmpdir= underlay unsquash userns uts workdir= writable "
            "writable-tmpfs",
}


def test_every_flag_of_apptainers_commands_parses(tmp_path: Path) -> None:
    """Each flag of each Apptainer command, with arguments that fail after parsing (no
    such image, no input): never 'unrecognized arguments', 'unknown flag', a missing
    value or an internal error. (build --help crashed on one; key newpair --push took
    the next flag as its value.)"""
    missing = str(tmp_path / "missing.sif")
    after = {"pull": [str(tmp_path / "o.sif"), "docker-archive:" + missing],
             "push": [missing, "oras://registry.invalid/x:1"],
             "build": [str(tmp_path / "o.sif"), str(tmp_path / "missing.def")],
             "cache clean": ["--dry-run"], "cache list": [], "key list": [],
             "instance list": [], "instance stop": ["no-such-instance"],
             "overlay create": [str(tmp_path / "no" / "o.img")],
             "key newpair": ["--password", "x"], "key export": ["ABCDEF0123", missing],
             "key import": [missing], "registry login": ["-u", "u", "--password-stdin",
                                                         "registry.invalid"],
             "exec": [missing, "true"]}
    env = {**os.environ, "HOME": str(tmp_path), "CAPSID_CACHEDIR": str(tmp_path / "cache"),
           "CAPSID_KEYSDIR": str(tmp_path / "keys")}
    for verb, flags in APPTAINER_FLAGS.items():
        for flag in flags.split():
            name, takes = flag.rstrip("="), flag.endswith("=")
            argv = [*verb.split(), f"--{name}", *(["1"] if takes else []),
                    *after.get(verb, [missing])]
            result = subprocess.run([str(CAPSID), *argv], capture_output=True, text=True,
                                    env=env, stdin=subprocess.DEVNULL, timeout=60,
                                    check=False)
            for wrong in ("unrecognized arguments", "unknown flag", "expected one argument",
                          "internal error", "Traceback"):
                assert wrong not in result.stderr, (argv, result.stderr)


def test_flags_capsid_implements_for_apptainers_sake(busybox_sif: Path,
                                                     tmp_path: Path) -> None:
    """--no-umask, --compat, --no-pid, --dns, --scratch, --workdir."""
    umask = run_capsid("exec", "--no-umask", busybox_sif, "sh", "-c", "umask")
    assert umask.stdout.strip() in ("0022", "022"), umask.stderr
    compat = run_capsid("exec", "--compat", busybox_sif, "sh", "-c",
                        'echo "${FROM_HOST:-clean}"; umask; touch /x && echo writable; '
                        "ls /proc | grep -c '^[0-9]'", env=dict(os.environ, FROM_HOST="x"))
    lines = compat.stdout.split()
    assert lines[0] == "clean" and lines[1] in ("0022", "022") and lines[2] == "writable", \
        compat.stderr
    assert int(lines[3]) < 10  # a PID namespace of its own
    no_pid = run_capsid("exec", "--containall", "--no-pid", busybox_sif, "sh", "-c", "echo $$")
    assert no_pid.stdout.strip() != "1"
    dns = run_capsid("exec", "--dns", "10.1.1.1,10.2.2.2", busybox_sif, "cat",
                     "/etc/resolv.conf")
    assert dns.stdout == "nameserver 10.1.1.1\nnameserver 10.2.2.2\n", dns.stderr
    work = tmp_path / "work"
    work.mkdir()
    kept = run_capsid("exec", "--contain", "--workdir", work, "--scratch", "/scratch",
                      busybox_sif, "sh", "-c", "touch /tmp/t /scratch/s && echo ok")
    assert kept.stdout == "ok\n", kept.stderr
    assert (work / "tmp" / "t").exists() and list(work.glob("scratch*/s"))


def test_instance_hints_name_the_verb_run(busybox_sif: Path) -> None:
    result = run_capsid("instance", "start", "--frobnicate", busybox_sif, "x")
    one_error(result, "--frobnicate", "capsid instance start --help")


# -- recipes --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Singularity", "Apptainer", "recipe.txt"])
def test_a_definition_file_by_its_content(busybox_sif: Path, tmp_path: Path,
                                          name: str) -> None:
    """singularity-compose and Singularity Hub name it Singularity: decided by content."""
    recipe = write(tmp_path, name, f"""
        # a comment first
        Bootstrap: localimage
        From: {busybox_sif}

        %runscript
            echo from {name}
        """)
    out = tmp_path / "o.sif"
    result = run_capsid("build", out, recipe)
    assert result.returncode == 0, result.stderr
    assert run_capsid("run", out).stdout == f"from {name}\n"


def test_run_of_an_image_without_a_shell(tmp_path: Path) -> None:
    """FROM scratch: no /bin/sh for a runscript, so ENTRYPOINT and CMD run directly, with
    arguments replacing CMD, as docker run does."""
    shutil.copy("/bin/busybox", tmp_path / "busybox")
    recipe = write(tmp_path, "Dockerfile", """
        FROM scratch
        COPY busybox /bin/busybox
        ENTRYPOINT ["/bin/busybox"]
        CMD ["echo", "from CMD"]
        """)
    out = tmp_path / "scratch.sif"
    assert run_capsid("build", out, recipe).returncode == 0
    assert run_capsid("run", out).stdout == "from CMD\n"
    assert run_capsid("run", out, "echo", "from args").stdout == "from args\n"


def test_env_extends_the_base_path_and_copy_flags_expand(hub_env: dict[str, str],
                                                         tmp_path: Path) -> None:
    """ENV PATH=/x:$PATH keeps the base's PATH (sh, mkdir stay found); COPY --chown and
    --chmod values are expanded and unquoted (Jupyter's docker-stacks write them so)."""
    write(tmp_path, "data.txt", "data\n")
    recipe = write(tmp_path, "Dockerfile", """
        FROM busybox:1
        ARG NB_UID=1000
        ARG NB_GID=100
        ENV PATH=/opt/tool/bin:$PATH
        RUN mkdir -p /opt/tool/bin && echo 'echo tool' > /opt/tool/bin/tool && \\
            chmod 755 /opt/tool/bin/tool
        COPY --chown="${NB_UID}:${NB_GID}" --chmod="0640" data.txt /home/data.txt
        RUN tool > /ran && sh -c 'echo $PATH' > /path
        """)
    out = tmp_path / "env.sif"
    result = run_capsid("build", out, recipe, env=hub_env, timeout=300)
    assert result.returncode == 0, result.stderr
    check = run_capsid("exec", out, "cat", "/ran", "/path", env=hub_env)
    lines = check.stdout.splitlines()
    assert lines[0] == "tool" and lines[1].startswith("/opt/tool/bin:/"), check.stdout
    assert "/bin" in lines[1].split(":")[1:], lines[1]
    mode = run_capsid("exec", out, "stat", "-c", "%a", "/home/data.txt", env=hub_env)
    assert mode.stdout.strip() == "640", mode.stderr


def test_push_of_a_build_on_a_local_image_keeps_the_base(hub_env: dict[str, str],
                                                         registry: Registry,
                                                         busybox_sif: Path,
                                                         tmp_path: Path) -> None:
    """Bootstrap: localimage has no registry layers: its files are pushed as a layer of
    their own, so the image pulled back is whole (it held only the steps' files)."""
    recipe = write(tmp_path, "local.def", f"""
        Bootstrap: localimage
        From: {busybox_sif}

        %post
            echo added > /added
        %runscript
            cat /added; ls /bin/sh
        """)
    out = tmp_path / "local.sif"
    assert run_capsid("build", out, recipe, env=hub_env).returncode == 0
    target = f"docker://{registry.host}/test/local:1"
    pushed = run_capsid("push", out, target, env=hub_env)
    assert pushed.returncode == 0, pushed.stderr
    layers = registry.manifest(target)["layers"]
    assert isinstance(layers, list) and len(layers) >= 2  # the base's files, then the steps'
    back = tmp_path / "back.sif"
    assert run_capsid("pull", back, target, env=hub_env).returncode == 0
    result = run_capsid("exec", back, "sh", "-c", "cat /added; ls /bin/sh", env=hub_env)
    assert (result.returncode, result.stdout) == (0, "added\n/bin/sh\n"), result.stderr


def test_a_name_the_mirror_lacks_fails_fast_and_says_so(hub_env: dict[str, str],
                                                       registry: Registry,
                                                       tmp_path: Path) -> None:
    """docker.io through a mirror that has no such image: docker.io itself is tried
    briefly (offline here), and the error says the mirror answered 'not found'."""
    import time

    env = {k: v for k, v in hub_env.items() if k != "CAPSID_RETRY_DELAY"}  # real back-off
    started = time.monotonic()
    result = run_capsid("pull", tmp_path / "o.sif", "docker://no-such-image:1", env=env,
                        timeout=120)
    assert time.monotonic() - started < 10
    line = one_error(result, "no-such-image", registry.host)
    assert "no such image" in line


def test_files_copies_host_paths_as_apptainer(busybox_sif: Path, tmp_path: Path) -> None:
    """%files takes host paths (absolute, or relative to where you build), not only the
    context: the docs' example copies a file its own %setup made. An unreadable one is
    one line."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "abs.txt").write_text("absolute\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "rel.txt").write_text("relative\n")
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    recipe = write(recipes, "files.def", f"""
        Bootstrap: localimage
        From: {busybox_sif}

        %setup
            echo made-by-setup > {tmp_path}/from-setup.txt
        %files
            {outside}/abs.txt /abs.txt
            rel.txt /rel.txt
            {tmp_path}/from-setup.txt /setup.txt
        """)
    out = tmp_path / "files.sif"
    result = run_capsid("build", out, recipe, cwd=work)
    assert result.returncode == 0, result.stderr
    check = run_capsid("exec", out, "cat", "/abs.txt", "/rel.txt", "/setup.txt")
    assert check.stdout == "absolute\nrelative\nmade-by-setup\n", check.stderr
    if os.getuid() != 0:
        (outside / "abs.txt").chmod(0)
        denied = run_capsid("build", "--force", out, recipe, cwd=work)
        one_error(denied, "abs.txt", "cannot read")


# -- real clients, from PyPI (the dev extra installs them) ----------------------------------

TOOL = """\
cwlVersion: v1.2
class: CommandLineTool
requirements:
  DockerRequirement:
    {requirement}
baseCommand: [sh, -c]
arguments: ["{script}"]
inputs:
  name: {{type: string, default: world}}
  infile: {{type: File?}}
outputs:
  out: {{type: File, outputBinding: {{glob: out.txt}}}}
"""

WORKFLOW = """\
cwlVersion: v1.2
class: Workflow
inputs:
  name: string
outputs:
  final: {type: File, outputSource: second/out}
steps:
  first:
    run: first.cwl
    in: {name: name}
    out: [out]
  second:
    run: second.cwl
    in: {infile: first/out}
    out: [out]
"""


def _cwltool(tmp_path: Path, env: dict[str, str], *args: str | Path
             ) -> subprocess.CompletedProcess[str]:
    cwltool = CAPSID.parent / "cwltool"
    if not cwltool.exists():
        pytest.skip("cwltool is not installed (pip install -e '.[dev]' installs it)")
    run_env = dict(env, PATH=f"{CAPSID.parent}:/usr/local/bin:/usr/bin:/bin",
                   CWL_SINGULARITY_CACHE=str(tmp_path / "images"))
    (tmp_path / "images").mkdir(exist_ok=True)
    return subprocess.run([str(cwltool), "--singularity", "--outdir", str(tmp_path / "out"),
                           *map(str, args)], capture_output=True, text=True, env=run_env,
                          cwd=tmp_path, timeout=600, check=False)


def test_cwltool_runs_tools_and_workflows(hub_env: dict[str, str], tmp_path: Path) -> None:
    """cwltool --singularity, unchanged: a dockerPull tool (its output file checked), a
    two-step workflow passing a file, and a tool's non-zero exit seen by cwltool."""
    pull = 'dockerPull: "busybox:1"'
    write(tmp_path, "tool.cwl", TOOL.format(
        requirement=pull, script="echo hello from $(inputs.name) > out.txt"))
    result = _cwltool(tmp_path, hub_env, "tool.cwl", "--name", "capsid")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "out.txt").read_text() == "hello from capsid\n"

    write(tmp_path, "first.cwl", TOOL.format(
        requirement=pull, script="echo passed $(inputs.name) > out.txt"))
    write(tmp_path, "second.cwl", TOOL.format(
        requirement=pull, script="tr a-z A-Z < $(inputs.infile.path) > out.txt"))
    write(tmp_path, "flow.cwl", WORKFLOW)
    flow = _cwltool(tmp_path, hub_env, "flow.cwl", "--name", "along")
    assert flow.returncode == 0, flow.stderr[-3000:]
    assert (tmp_path / "out" / "out.txt").read_text() == "PASSED ALONG\n"

    write(tmp_path, "fails.cwl", TOOL.format(requirement=pull, script="exit 3"))
    failed = _cwltool(tmp_path, hub_env, "fails.cwl")
    assert failed.returncode != 0 and "permanentFail" in failed.stderr, failed.stderr[-3000:]


def test_cwltool_docker_load(tmp_path: Path) -> None:
    """dockerLoad: cwltool builds the SIF from a docker-archive:// itself."""
    archive = Path(os.environ.get("CAPSID_TEST_CACHE", "/var/cache/capsid-test")) / "oci" / \
        "busybox.docker.tar"
    if not archive.is_file():
        pytest.skip(f"{archive} is absent: scripts/oci-images.sh makes it")
    write(tmp_path, "load.cwl", TOOL.format(
        requirement=f'dockerLoad: "{archive}"\n    dockerImageId: "busybox-loaded"',
        script="echo loaded > out.txt"))
    result = _cwltool(tmp_path, dict(os.environ), "load.cwl")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "out.txt").read_text() == "loaded\n"


COMPOSE = """\
version: "2.0"
instances:
  web:
    build:
      context: ./web
      recipe: Singularity
      options:
        - fakeroot
    volumes:
      - ./data:/data
  worker:
    build:
      context: ./worker
      recipe: Singularity
      options:
        - fakeroot
    volumes:
      - ./data:/data
    depends_on:
      - web
"""

SERVICE = """\
Bootstrap: localimage
From: {base}

%startscript
    echo "{name} started" >> /data/{name}.log
    exec sleep 1000
"""


def test_singularity_compose_up_ps_exec_down(busybox_sif: Path, tmp_path: Path) -> None:
    """singularity-compose, unchanged: build from files named Singularity, then up (two
    instances with a startscript, a volume and the hosts file), ps, exec and down."""
    compose = CAPSID.parent / "singularity-compose"
    if not compose.exists():
        pytest.skip("singularity-compose is not installed (the dev extra installs it)")
    for name in ("web", "worker"):
        (tmp_path / name).mkdir()
        write(tmp_path / name, "Singularity", SERVICE.format(base=busybox_sif, name=name))
    (tmp_path / "data").mkdir()
    write(tmp_path, "singularity-compose.yml", COMPOSE)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, PATH=f"{CAPSID.parent}:/usr/local/bin:/usr/bin:/bin",
               XDG_RUNTIME_DIR=str(runtime))

    def sc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(compose), *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300, check=False)

    built = sc("build")
    assert built.returncode == 0, built.stdout + built.stderr
    up = sc("up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        ps = sc("ps")
        assert ps.returncode == 0 and "web" in ps.stdout and "worker" in ps.stdout, ps.stdout
        # instances are named by replica: worker1 reaches web1 through the hosts file
        hosts = sc("exec", "worker1", "cat", "/etc/hosts")
        assert hosts.returncode == 0 and "web1" in hosts.stdout, hosts.stdout + hosts.stderr
        import time

        for _ in range(100):
            if (tmp_path / "data" / "worker.log").exists():
                break
            time.sleep(0.1)
        assert (tmp_path / "data" / "web.log").read_text() == "web started\n"
    finally:
        down = sc("down")
    assert down.returncode == 0, down.stdout + down.stderr
    listed = run_capsid("instance", "list", "--json", env=env)
    assert json.loads(listed.stdout)["instances"] == []


def test_instance_start_pid_file(busybox_sif: Path, tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    pid_file = tmp_path / "instance.pid"
    name = f"pidfile{os.getpid()}"
    started = run_capsid("instance", "start", "--pid-file", pid_file, busybox_sif, name,
                         env=env, timeout=60)
    try:
        assert started.returncode == 0, started.stderr
        listed = json.loads(run_capsid("instance", "list", "--json", env=env).stdout)
        assert pid_file.read_text() == f"{listed['instances'][0]['pid']}\n"
    finally:
        assert run_capsid("instance", "stop", name, env=env).returncode == 0

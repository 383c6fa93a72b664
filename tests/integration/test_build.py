"""Building from recipes (#11): Dockerfiles and definition files, as whoever runs the suite
(root and an ordinary user; no /etc/subuid is used), from real base images in the local
registry, with real Debian packages from the mirror."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import one_error, process_identity, run_capsid, until_gone, wait_for
from tests.support.registry import Registry

pytestmark = pytest.mark.unprivileged


@pytest.fixture
def env(hub_env: dict[str, str]) -> dict[str, str]:
    """docker.io served by the test registry's mirror, a private cache, credentials."""
    return hub_env


def build(env: dict[str, str], out: Path, recipe: Path, *extra: str,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    result = run_capsid("build", *extra, out, recipe, env=env, timeout=900)
    if check:
        assert result.returncode == 0, result.stderr
        assert "internal error" not in result.stderr
    return result


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def ran(result: subprocess.CompletedProcess[str]) -> int:
    """How many steps a build ran (were not cached), from its summary line."""
    line = [x for x in result.stderr.splitlines() if x.startswith("built: ")][-1]
    return int(line.split(", ")[2].split()[0])


def test_the_seed_workflow_verbatim(env: dict[str, str], tmp_path: Path) -> None:
    """capsid build fib.sif Dockerfile (FROM python:3.12.0-alpine3.18, COPY fib.py src/),
    then capsid exec fib.sif python /src/fib.py 10 prints 55."""
    write(tmp_path, "fib.py", """
        import sys

        def fib(n):
            return n if n < 2 else fib(n - 1) + fib(n - 2)

        print(fib(int(sys.argv[1])))
        """)
    recipe = write(tmp_path, "Dockerfile", """
        FROM python:3.12.0-alpine3.18
        COPY fib.py src/
        """)
    result = run_capsid("build", "fib.sif", "Dockerfile", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert recipe.exists()
    out = run_capsid("exec", tmp_path / "fib.sif", "python", "/src/fib.py", "10", env=env)
    assert (out.returncode, out.stdout) == (0, "55\n"), out.stderr


def test_dockerfile_instructions_and_the_cache(env: dict[str, str], tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    write(ctx, "hello.txt", "hello\n")
    write(ctx, ".dockerignore", "secret*\n")
    write(ctx, "secret.key", "do not copy\n")
    (ctx / "tree").mkdir()
    write(ctx / "tree", "a", "A\n")
    recipe = write(ctx, "Dockerfile", """
        # escape=\\
        ARG BASE=busybox:1
        FROM ${BASE} AS first
        ARG WHO=world
        ENV GREETING="hello ${WHO}" \\
            EXTRA=1
        LABEL org.example.who=$WHO purpose="a test"
        WORKDIR /app
        COPY hello.txt ./
        COPY tree /app/tree/
        COPY --chmod=0700 . /ctx/
        RUN echo "$GREETING" > greeting && mkdir -p /gone && rm -rf /mnt && \\
            echo "arg=$WHO" > /app/arg
        RUN <<EOF
        echo from a heredoc > /app/heredoc
        EOF
        USER root
        EXPOSE 8080
        ENTRYPOINT ["cat"]
        CMD ["/app/greeting"]

        FROM first AS second
        COPY --from=first /app/heredoc /copied
        """)
    out = tmp_path / "img.sif"
    first = build(env, out, recipe, "--build-arg", "WHO=capsid")
    assert ran(first) >= 6
    run = run_capsid("run", out, env=env)
    assert (run.returncode, run.stdout) == (0, "hello capsid\n"), run.stderr
    check = run_capsid("exec", out, "sh", "-c",
                       "cat /app/hello.txt /app/tree/a /app/arg /app/heredoc /copied; "
                       "ls /app; ls -A /ctx; stat -c %a /ctx/hello.txt; "
                       "test -e /mnt && echo mnt-still-there; echo $EXTRA", env=env)
    assert check.stdout.splitlines() == [
        "hello", "A", "arg=capsid", "from a heredoc", "from a heredoc",
        "arg", "greeting", "hello.txt", "heredoc", "tree",
        ".dockerignore", "Dockerfile", "hello.txt", "tree", "700", "1"], check.stderr
    labels = run_capsid("inspect", "--labels", out, env=env).stdout
    assert "org.example.who: capsid" in labels and "purpose: a test" in labels
    from capsid.image.sif import DataType, SifImage

    with SifImage(out) as image:  # the OCI config keeps what docker run would use
        found = image.find(DataType.GENERIC_JSON, "oci-config.json")
        assert found is not None
        config = json.loads(image.read(found))
    assert config["Entrypoint"] == ["cat"] and config["Cmd"] == ["/app/greeting"]
    assert config["User"] == "root" and config["WorkingDir"] == "/app"
    assert config["ExposedPorts"] == {"8080/tcp": {}}
    assert "GREETING=hello capsid" in config["Env"]
    # run starts in WORKDIR, as docker run does (the relative path proves it)
    relative = run_capsid("run", out, "greeting", env=env)
    assert relative.stdout == "hello capsid\n", relative.stderr
    # Unchanged: every step comes from the cache, and so does the SIF.
    made = hashlib.sha256(out.read_bytes()).hexdigest()
    again = build(env, out, recipe, "--force", "--build-arg", "WHO=capsid")
    assert ran(again) == 0 and "CACHED" in again.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == made
    # Another build argument reruns the steps that use it.
    other = build(env, out, recipe, "--force", "--build-arg", "WHO=else")
    assert 0 < ran(other) < ran(first) + 1
    # An edit of a copied file reruns from its COPY on (the later COPYs and the RUNs).
    write(ctx, "hello.txt", "changed\n")
    edited = build(env, out, recipe, "--force", "--build-arg", "WHO=capsid")
    assert ran(edited) == 6, edited.stderr  # its COPY, every later COPY and RUN
    assert run_capsid("exec", out, "cat", "/app/hello.txt", env=env).stdout == "changed\n"
    fresh = build(env, out, recipe, "--force", "--no-cache", "--build-arg", "WHO=capsid")
    assert ran(fresh) == ran(first)


SSH_RECIPE = """
    FROM debian-python3:12
    RUN apt-get update -qq && \\
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
            openssh-client >/dev/null && \\
        rm -rf /var/lib/apt/lists/* && \\
        cat /proc/self/uid_map > /uid_map
    COPY --chown=nobody:_ssh hello.txt /hello.txt
    RUN mkdir /work && chown nobody /work
    USER nobody
    RUN (id -un; echo "$HOME") > /work/who
    USER root
    """


def _sif_owners(sif: Path, *paths: str) -> dict[str, str]:
    """``user/group mode`` of *paths* as the SIF's squashfs records them (numeric)."""
    objects = run_capsid("sif", "list", sif, check=True).stdout.splitlines()
    start = next(line.split("|")[3].split("-")[0] for line in objects if "|FS " in line)
    listing = subprocess.run(["unsquashfs", "-o", start, "-lln", "-d", "", str(sif), *paths],
                             capture_output=True, text=True, check=True).stdout
    owners = {}
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[-1] in paths:
            owners[fields[-1]] = f"{fields[1]} {fields[0]}"
    return owners


def test_apt_get_install_without_subuid(env: dict[str, str], tmp_path: Path) -> None:
    """Root emulation: dpkg creates the _ssh group and gives ssh-agent its setgid bit.

    Nothing reads /etc/subuid (``--ignore-subuid``): only the user is mapped, to root,
    and every file ends up root's. Root itself keeps real owners, its steps running as
    an unused range of host ids (not as the host's root): the step sees 65536 ids.
    """
    recipe = write(tmp_path, "Dockerfile", SSH_RECIPE)
    write(tmp_path, "hello.txt", "hello\n")
    out = tmp_path / "ssh.sif"
    result = build(env, out, recipe, "--ignore-subuid")
    uid_map = run_capsid("exec", out, "cat", "/uid_map", env=env).stdout.split()
    check = run_capsid("exec", out, "sh", "-c",
                       "ssh -V 2>&1 | cut -c1-7; stat -c %A /usr/bin/ssh-agent; "
                       "getent group _ssh | cut -d: -f1", env=env)
    assert check.stdout.splitlines() == ["OpenSSH", "-rwxr-sr-x", "_ssh"], check.stderr
    owners = _sif_owners(out, "/usr/bin/ssh-agent", "/hello.txt")
    who = run_capsid("exec", out, "cat", "/work/who", env=env).stdout.splitlines()
    if os.getuid() == 0:
        assert uid_map == ["0", "0", "65536"]
        ssh_gid = run_capsid("exec", out, "getent", "group", "_ssh", env=env).stdout
        gid = ssh_gid.split(":")[2]
        assert owners["/usr/bin/ssh-agent"] == f"0/{gid} -rwxr-sr-x", owners
        assert owners["/hello.txt"] == f"65534/{gid} -rw-r--r--", owners
        assert who == ["nobody", "/nonexistent"]
    else:
        # the step's own namespace (it owns none of its mounts), nested in the user's
        assert uid_map == ["0", "0", "1"]
        assert owners["/usr/bin/ssh-agent"] == "0/0 -rwxr-sr-x", owners
        assert owners["/hello.txt"] == "0/0 -rw-r--r--", owners
        assert "--chown=nobody:_ssh: files stay owned by root" in result.stderr
        assert who == ["root", "/root"]  # USER needs other ids mapped
        assert "RUN steps after USER nobody run as root" in result.stderr


def _granted() -> bool:
    from capsid.runtime import identity, userns

    user = identity.User.current()
    return all(userns.subordinate_range(user, f) for f in ("/etc/subuid", "/etc/subgid"))


@pytest.mark.subids
def test_owners_real_with_subordinate_ids(env: dict[str, str], tmp_path: Path) -> None:
    """Where /etc/subuid and /etc/subgid grant ranges, the build maps them: the group
    dpkg gives ssh-agent and COPY --chown's owners reach the SIF; the build's cache, a
    sandbox and the SIF stay removable by the user."""
    if os.getuid() == 0 or not _granted():
        pytest.skip("needs an ordinary user with subordinate ids (scripts/test.sh: capsid-sub)")
    recipe = write(tmp_path, "Dockerfile", SSH_RECIPE)
    write(tmp_path, "hello.txt", "hello\n")
    out = tmp_path / "ssh.sif"
    build(env, out, recipe)
    uid_map = run_capsid("exec", out, "cat", "/uid_map", env=env).stdout.split()
    # The step's namespace nests in the build's, which maps the user to 0 and the range.
    assert uid_map == ["0", "0", "1", "1", "1", "65536"], uid_map
    ssh = run_capsid("exec", out, "getent", "group", "_ssh", env=env).stdout
    gid = ssh.split(":")[2]
    owners = _sif_owners(out, "/usr/bin/ssh-agent", "/hello.txt")
    assert owners["/usr/bin/ssh-agent"] == f"0/{gid} -rwxr-sr-x", owners
    assert owners["/hello.txt"] == f"65534/{gid} -rw-r--r--", owners
    who = run_capsid("exec", out, "cat", "/work/who", env=env).stdout.splitlines()
    assert who == ["nobody", "/nonexistent"]  # USER applies to RUN
    # The sandbox of the same build is the user's, set-id bits kept.
    box = tmp_path / "box"
    build(env, box, recipe, "--sandbox")
    agent = (box / "usr/bin/ssh-agent").stat()
    assert (agent.st_uid, agent.st_gid, oct(agent.st_mode & 0o7777)) == (
        os.getuid(), os.getgid(), "0o2755")
    subprocess.run(["rm", "-rf", str(box)], check=True)
    # The step directories hold files of subordinate ids; cache clean reaches them.
    assert run_capsid("cache", "clean", env=env).returncode == 0
    assert not any((tmp_path / "cache").rglob("*.deb*")), "cache clean left files behind"
    subprocess.run(["rm", "-rf", str(tmp_path / "cache")], check=True)


def test_multi_stage_c_build(env: dict[str, str], tmp_path: Path) -> None:
    write(tmp_path, "hello.c", """
        #include <stdio.h>
        int main(void) { puts("hello from C"); return 0; }
        """)
    recipe = write(tmp_path, "Dockerfile", """
        FROM debian-python3:12 AS build
        RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive \\
            apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null
        COPY hello.c /src/
        RUN gcc -O2 -o /src/hello /src/hello.c

        FROM debian-python3:12
        COPY --from=build /src/hello /usr/local/bin/hello
        CMD ["hello"]
        """)
    out = tmp_path / "c.sif"
    build(env, out, recipe)
    result = run_capsid("run", out, env=env)
    assert (result.returncode, result.stdout) == (0, "hello from C\n"), result.stderr
    assert run_capsid("exec", out, "sh", "-c", "command -v gcc || echo none",
                      env=env).stdout == "none\n"


def test_build_arguments_reach_the_metadata_of_a_cached_build(env: dict[str, str],
                                                               tmp_path: Path) -> None:
    """{{ VAR }} in %environment, %runscript and %labels changes no step: a build with
    another --build-arg is all cached steps, and still gets its own metadata."""
    recipe = write(tmp_path, "args.def", """
        Bootstrap: docker
        From: busybox:1

        %arguments
            WHO=world

        %post
            echo built > /built

        %environment
            export GREETING="hello {{ WHO }}"

        %runscript
            echo "$GREETING, runscript of {{ WHO }}"

        %labels
            Audience {{ WHO }}
        """)
    outputs = {}
    for who in ("world", "moon", "world"):
        out = tmp_path / f"{who}.sif"
        extra = () if who == "world" else ("--build-arg", f"WHO={who}")
        result = build(env, out, recipe, "--force", *extra)
        assert ran(result) == (1 if not outputs else 0), result.stderr
        outputs[who] = run_capsid("run", out, env=env).stdout
        assert f"Audience: {who}" in run_capsid("inspect", out, env=env).stdout
    assert outputs == {"world": "hello world, runscript of world\n",
                       "moon": "hello moon, runscript of moon\n"}


def test_definition_file(env: dict[str, str], tmp_path: Path) -> None:
    write(tmp_path, "data.txt", "data\n")
    recipe = write(tmp_path, "app.def", """
        Bootstrap: docker
        From: busybox:1
        Stage: final

        %arguments
            GREETING=hello

        %setup
            touch ${APPTAINER_ROOTFS}/from-setup

        %files
            data.txt /opt/data.txt

        %post
            echo "{{ GREETING }} from post" > /post.txt
            mkdir -p /srv && chown nobody:nogroup /srv
            echo 'export FROM_POST=yes' >> $APPTAINER_ENVIRONMENT
            echo "post.label set-in-post" >> $APPTAINER_LABELS

        %environment
            export MYVAR="from environment"

        %runscript
            echo "runscript: $MYVAR $FROM_POST $*"

        %test
            test -f /post.txt

        %labels
            Maintainer capsid

        %help
            Some help.
        """)
    out = tmp_path / "app.sif"
    build(env, out, recipe, "--build-arg", "GREETING=hi")
    run = run_capsid("run", out, "arg1", env=env)
    assert run.stdout == "runscript: from environment yes arg1\n", run.stderr
    files = run_capsid("exec", out, "cat", "/post.txt", "/opt/data.txt", "/from-setup",
                       env=env)
    assert files.stdout == "hi from post\ndata\n", files.stderr
    labels = run_capsid("inspect", "--labels", out, env=env).stdout
    assert "Maintainer: capsid" in labels and "post.label: set-in-post" in labels
    assert "org.label-schema.usage.singularity.deffile.bootstrap: docker" in labels
    assert run_capsid("inspect", "--deffile", out, env=env).stdout.startswith(
        "Bootstrap: docker")
    assert "Some help." in run_capsid("inspect", "--helpfile", out, env=env).stdout
    # A failing %test leaves no image.
    failing = write(tmp_path, "fail.def", """
        Bootstrap: docker
        From: busybox:1

        %test
            exit 3
        """)
    result = build(env, tmp_path / "fail.sif", failing, check=False)
    one_error(result, "%test failed with exit code 3")
    assert not (tmp_path / "fail.sif").exists()
    assert build(env, tmp_path / "fail.sif", failing, "--notest").returncode == 0


def test_bootstrap_debootstrap(env: dict[str, str], tmp_path: Path) -> None:
    """A Debian root from the mirror by mmdebstrap, unprivileged (Apptainer needs real
    root for this), then %post on it; the bootstrap is cached. The package lists stay,
    as debootstrap leaves them: %post installs without apt-get update, as Apptainer's
    own Debian example does (#20)."""
    if subprocess.run(["getent", "hosts", "deb.debian.org"], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("the Debian mirror's name does not resolve here")
    recipe = write(tmp_path, "debian.def", """
        Bootstrap: debootstrap
        OSVersion: bookworm
        MirrorURL: http://deb.debian.org/debian
        Include: hello

        %post
            hello -g "from debootstrap" > /greeting
            apt-get install -y -q --no-install-recommends sl >/dev/null
        %runscript
            cat /greeting
        """)
    out = tmp_path / "debian.sif"
    build(env, out, recipe)
    run = run_capsid("run", out, env=env)
    assert (run.returncode, run.stdout) == (0, "from debootstrap\n"), run.stderr
    check = run_capsid("exec", out, "sh", "-c", ". /etc/os-release; echo $VERSION_CODENAME; "
                       "dpkg-query -W -f '${Status}\\n' hello sl", env=env)
    assert check.stdout.splitlines() == ["bookworm", "install ok installed",
                                         "install ok installed"], check.stderr
    # what package scripts wrote to a /dev/null that was no device is not in the image
    assert _sif_owners(out, "/dev/null") == {}
    again = build(env, out, recipe, "--force")
    assert ran(again) == 0 and "mmdebstrap" not in again.stderr


def test_scif_apps_are_built_run_tested_and_listed(env: dict[str, str],
                                                  tmp_path: Path) -> None:
    """A definition file's SCIF apps as Apptainer's documentation writes them."""
    write(tmp_path, "tool.sh", "echo tool\n")
    recipe = write(tmp_path, "apps.def", """
        Bootstrap: docker
        From: busybox:1

        %runscript
            echo main
        %appinstall foo
            echo "built in $(pwd) for $SCIF_APPNAME" > installed
            echo "echo foo-cmd" > bin/foo-cmd
            chmod +x bin/foo-cmd
        %appfiles foo
            tool.sh
        %appenv foo
            export FOO=bar
        %apprun foo
            echo "foo got $@ FOO=$FOO"
            foo-cmd
        %applabels foo
            Kind tool
        %apphelp foo
            Foo helps.
        %apptest foo
            test -f "$SCIF_APPROOT/installed"
        %apprun bar
            echo bar
        """)
    out = tmp_path / "apps.sif"
    build(env, out, recipe)

    def capsid(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return run_capsid(*args, env=env, timeout=120)

    assert capsid("run", out).stdout == "main\n"
    assert capsid("run", "--app", "foo", out, "a").stdout == "foo got a FOO=bar\nfoo-cmd\n"
    assert capsid("run", "--app", "bar", out).stdout == "bar\n"
    inside = capsid("exec", "--app", "foo", out, "sh", "-c",
                    'echo $SCIF_APPNAME $SCIF_APPROOT_bar; cat "$SCIF_APPROOT/installed" '
                    '"$SCIF_APPROOT/tool.sh"')
    assert inside.stdout == "foo /scif/apps/bar\nbuilt in /scif/apps/foo for foo\necho tool\n", \
        inside.stderr
    assert capsid("exec", out, "sh", "-c", 'echo "[$FOO]"').stdout == "[]\n"
    assert capsid("test", "--app", "foo", out).returncode == 0
    missing = capsid("run", "--app", "nope", out)
    assert missing.returncode == 255 and missing.stderr.count("\n") == 1
    assert "no SCIF app called 'nope'" in missing.stderr
    assert capsid("inspect", "--list-apps", out).stdout == "bar\nfoo\n"
    labels = capsid("inspect", "--app", "foo", out).stdout
    assert "Kind: tool\n" in labels and "SCIF_APP_NAME: foo\n" in labels
    assert "Foo helps." in capsid("run-help", "--app", "foo", out).stdout
    everything = json.loads(capsid("inspect", "--all", out).stdout)["data"]["attributes"]
    assert everything["runscript"].endswith("echo main\n") and "deffile" in everything
    assert sorted(everything["apps"]) == ["bar", "foo"]
    assert everything["apps"]["foo"]["labels"]["Kind"] == "tool"


@pytest.mark.parametrize(("name", "text", "words"), [
    ("Dockerfile", "FROM busybox:1\nFROBNICATE x\n", ["Dockerfile:2", "unknown instruction"]),
    ("Dockerfile", "FROM busybox:1\nCOPY nothere /x\n", ["Dockerfile:2", "nothere",
                                                          "does not exist"]),
    ("Dockerfile", "FROM nosuchimage:7\n", ["nosuchimage"]),
    ("Dockerfile", "RUN true\n", ["Dockerfile:1", "before the first FROM"]),
    ("x.def", "Bootstrap: docker\nFrom: busybox:1\n%post\n  echo {{ nope }}\n",
     ["x.def:4", "build var nope is not defined"]),
    ("x.def", "Bootstrap: library\nFrom: alpine\n", ["library", "not supported"]),
    ("x.def", "Bootstrap: docker\nFrom: busybox:1\n%appinstall\n  true\n",
     ["x.def:3", "needs an app name"]),
    ("x.def", "Bootstrap: docker\nFrom: busybox:1\n%bogus\n", ["x.def:3", "%bogus"]),
])
def test_recipe_errors_are_one_line(env: dict[str, str], tmp_path: Path, name: str,
                                    text: str, words: list[str]) -> None:
    recipe = tmp_path / name
    recipe.write_text(text)
    out = tmp_path / "out.sif"
    one_error(build(env, out, recipe, check=False), *words)
    assert not out.exists()


def test_a_failing_run_keeps_the_earlier_steps(env: dict[str, str], tmp_path: Path) -> None:
    write(tmp_path, "f", "x\n")
    recipe = write(tmp_path, "Dockerfile", """
        FROM busybox:1
        COPY f /f
        RUN echo ok > /ok
        RUN exit 7
        """)
    out = tmp_path / "out.sif"
    result = build(env, out, recipe, check=False)
    one_error(result, "Dockerfile:4", "exit code 7")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".capsid-tmp")]
    recipe.write_text(recipe.read_text().replace("exit 7", "true"))
    assert ran(build(env, out, recipe)) == 1


def test_reproducible_and_sandbox_outputs(env: dict[str, str], tmp_path: Path) -> None:
    write(tmp_path, "f", "content\n")
    recipe = write(tmp_path, "Dockerfile", """
        FROM busybox:1
        COPY f /f
        RUN echo built > /built && ln -s /f /link
        """)
    digests = []
    for n in (1, 2):
        fresh = {**env, "CAPSID_CACHEDIR": str(tmp_path / f"cache{n}"),
                 "SOURCE_DATE_EPOCH": "1700000000"}
        out = tmp_path / f"r{n}.sif"
        build(fresh, out, recipe)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    sandbox = tmp_path / "sb"
    images = Path(env["CAPSID_CACHEDIR"]) / ("build-root" if os.getuid() == 0 else "build") \
        / "images"
    before = sorted(images.iterdir()) if images.is_dir() else []
    build(env, sandbox, recipe, "--sandbox")
    assert (sandbox / "built").read_text() == "built\n"
    assert os.readlink(sandbox / "link") == "/f"
    # streamed into the directory: no SIF kept for it, and the same tree as the SIF's
    assert (sorted(images.iterdir()) if images.is_dir() else []) == before
    unpacked = tmp_path / "unpacked"
    run_capsid("build", "--sandbox", unpacked, tmp_path / "r1.sif", env=env, check=True)

    def tree(root: Path) -> list[tuple[str, int]]:
        return sorted((str(p.relative_to(root)), os.lstat(p).st_mode)
                      for p in root.rglob("*"))
    assert tree(sandbox) == tree(unpacked)


def test_reproducible_flag_dates_files_by_the_base(env: dict[str, str], tmp_path: Path) -> None:
    """Apptainer's build --reproducible: SOURCE_DATE_EPOCH is the base image's creation
    (two fresh builds, the same bytes); a base that records none is one error."""
    import datetime

    write(tmp_path, "f", "content\n")
    recipe = write(tmp_path, "Dockerfile", "FROM busybox:1\nCOPY f /f\nRUN echo b > /b\n")
    outs = []
    for n in (1, 2):
        fresh = {**env, "CAPSID_CACHEDIR": str(tmp_path / f"cache{n}")}
        outs.append(tmp_path / f"r{n}.sif")
        build(fresh, outs[-1], recipe, "--reproducible")
        time.sleep(1.1)  # a clock second apart
    assert outs[0].read_bytes() == outs[1].read_bytes()
    stamp = run_capsid("exec", outs[0], "stat", "-c", "%Y", "/f", "/b", env=env, check=True)
    created = json.loads(subprocess.run(
        ["skopeo", "inspect", "--config", f"oci-archive:{_busybox_archive()}"],
        capture_output=True, text=True, check=True).stdout)["created"]
    when = datetime.datetime.fromisoformat(created[:26].rstrip("Z") + "+00:00")
    assert stamp.stdout.split() == [str(int(when.timestamp()))] * 2, created
    scratch = write(tmp_path, "scratch.def", "Bootstrap: scratch\n")
    refused = build(env, tmp_path / "s.sif", scratch, "--reproducible", check=False)
    assert refused.returncode == 255 and "records none" in refused.stderr
    assert "SOURCE_DATE_EPOCH" in refused.stderr


def _busybox_archive() -> Path:
    return Path(os.environ.get("CAPSID_TEST_CACHE", "/var/cache/capsid-test")) / "oci" / \
        "busybox.oci.tar"


def _unpacked_bases(cache: Path) -> list[Path]:
    store = cache / ("build-root" if os.getuid() == 0 else "build") / "bases"
    return sorted(store.glob("*/rootfs"))


def test_copy_steps_run_on_the_pulled_squashfs(env: dict[str, str], tmp_path: Path) -> None:
    """#22: a base 'capsid pull' left in the cache is served to COPY and WORKDIR from its
    squashfs (FUSE), never unpacked; the image is the one an unpacked base gives."""
    write(tmp_path, "fib.py", "print(55)\n")
    recipe = write(tmp_path, "Dockerfile", """
        FROM busybox:1
        COPY fib.py /src/
        WORKDIR /w/x
        COPY fib.py .
        """)
    epoch = {"SOURCE_DATE_EPOCH": "1700000000"}
    pulled = {**env, **epoch, "CAPSID_CACHEDIR": str(tmp_path / "pulled")}
    run_capsid("pull", tmp_path / "base.sif", "docker://busybox:1", env=pulled, check=True)
    build(pulled, tmp_path / "served.sif", recipe)
    assert _unpacked_bases(tmp_path / "pulled") == []
    fresh = {**env, **epoch, "CAPSID_CACHEDIR": str(tmp_path / "fresh")}
    build(fresh, tmp_path / "unpacked.sif", recipe)
    assert len(_unpacked_bases(tmp_path / "fresh")) == 1
    assert (tmp_path / "served.sif").read_bytes() == (tmp_path / "unpacked.sif").read_bytes()
    assert run_capsid("exec", tmp_path / "served.sif", "cat", "/src/fib.py", "/w/x/fib.py",
                      env=env, check=True).stdout == "print(55)\n" * 2
    # the pull's output is the cached SIF under another name: once changed through it,
    # the build makes its own base instead of taking those bytes into its image
    time.sleep(0.02)
    with open(tmp_path / "base.sif", "ab") as f:
        f.write(b"\0" * 4096)
    made = run_capsid("-v", "build", "--no-cache", tmp_path / "own.sif", recipe, env=pulled,
                      timeout=900)
    assert made.returncode == 0, made.stderr
    assert "for later builds to be laid over" in made.stderr
    assert (tmp_path / "own.sif").read_bytes() == (tmp_path / "unpacked.sif").read_bytes()


def test_a_copy_the_served_base_cannot_take_goes_on_unpacked(
        env: dict[str, str], registry: Registry, busybox_sandbox: Path, tmp_path: Path) -> None:
    """/owned belongs to uid 1234, whom an ordinary user's COPY namespace does not map:
    in the served squashfs it is out of reach, so the step (a heredoc's: its body, kept
    in the step's scratch directory) starts again over the base unpacked (where the
    files are the user's), and succeeds."""
    import io
    import tarfile

    from tests.support.bombs import MEDIA, make_layout

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            return info
        tar.add(busybox_sandbox, arcname=".", filter=as_root)
        owned = tarfile.TarInfo("owned")
        owned.type, owned.mode, owned.uid, owned.gid = tarfile.DIRTYPE, 0o755, 1234, 1234
        tar.addfile(owned)
    make_layout(tmp_path / "layout", [(layer.getvalue(), MEDIA["plain"])])
    registry.skopeo_copy(f"oci:{tmp_path / 'layout'}:bomb", "hub/library/owned:1")
    recipe = write(tmp_path, "Dockerfile", "FROM owned:1\nCOPY <<EOF /owned/f\nmine\nEOF\n")
    run_capsid("pull", tmp_path / "base.sif", "docker://owned:1", env=env, check=True)
    out = tmp_path / "out.sif"
    result = run_capsid("-d", "build", out, recipe, env=env, timeout=900)
    assert result.returncode == 0, result.stderr
    # root's builds map the image's ids (a range of their own): the served base is enough
    fell_back = os.getuid() != 0
    assert ("served base's files are out of reach" in result.stderr) == fell_back
    assert len(_unpacked_bases(Path(env["CAPSID_CACHEDIR"]))) == int(fell_back)
    assert run_capsid("exec", out, "cat", "/owned/f", env=env, check=True).stdout == "mine\n"


def test_a_base_squashfuse_cannot_serve_is_unpacked(env: dict[str, str],
                                                     tmp_path: Path) -> None:
    """A server that dies at once (here /bin/false) leaves a mount nothing answers: the
    step goes on over the base unpacked, and the build succeeds."""
    write(tmp_path, "f", "x\n")
    recipe = write(tmp_path, "Dockerfile", "FROM busybox:1\nCOPY f /f\n")
    run_capsid("pull", tmp_path / "base.sif", "docker://busybox:1", env=env, check=True)
    broken = {**env, "CAPSID_SQUASHFUSE": "/bin/false"}
    out = tmp_path / "out.sif"
    result = run_capsid("-d", "build", out, recipe, env=broken, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "unpacking it for this step" in result.stderr
    assert len(_unpacked_bases(Path(env["CAPSID_CACHEDIR"]))) == 1
    assert run_capsid("exec", out, "cat", "/f", env=env, check=True).stdout == "x\n"


def test_the_builder_and_runtime_as_a_library(env: dict[str, str], tmp_path: Path) -> None:
    """capsid.build and capsid.runtime.api work from Python, without the CLI."""
    write(tmp_path, "Dockerfile", "FROM busybox:1\nRUN echo lib > /lib.txt\n")
    script = textwrap.dedent(f"""
        from capsid import build
        from capsid.build.builder import BuildOptions
        from capsid.runtime import api
        from capsid.runtime.options import Options

        build.build("{tmp_path}/Dockerfile", "{tmp_path}/lib.sif", BuildOptions(quiet=True))
        status = api.run("{tmp_path}/lib.sif", ["cat", "/lib.txt"], Options(cleanenv=True))
        other = api.run("docker://busybox:1", ["true"], Options())
        print("status", status, other)
        """)
    import sys

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300, check=False)
    assert result.stdout == "lib\nstatus 0 0\n", result.stderr


def test_cache_list_and_clean_cover_build_steps(env: dict[str, str], tmp_path: Path) -> None:
    recipe = write(tmp_path, "Dockerfile", "FROM busybox:1\nRUN echo a > /a\nRUN echo b > /b\n")
    out = tmp_path / "out.sif"
    assert ran(build(env, out, recipe)) == 2
    listing = run_capsid("cache", "list", env=env).stdout
    layers = [line for line in listing.splitlines() if line.startswith("layers")]
    assert layers and int(layers[0].split()[1]) >= 2, listing
    run_capsid("cache", "clean", env=env, check=True)
    assert "layers         0" in run_capsid("cache", "list", env=env).stdout
    assert ran(build(env, out, recipe, "--force")) == 2


def test_kill_9_during_a_step_leaves_a_consistent_cache(env: dict[str, str],
                                                        tmp_path: Path) -> None:
    """Nothing outlives the killed build (its RUN dies with it), no output appears, and the
    next build reuses the steps that were finished and reruns the one that was not."""
    import signal
    import time

    from tests.conftest import CAPSID

    write(tmp_path, "f", "x\n")
    recipe = write(tmp_path, "Dockerfile", """
        FROM busybox:1
        COPY f /f
        RUN touch /started && sleep 30.37 && touch /finished
        """)
    out = tmp_path / "out.sif"
    proc = subprocess.Popen([str(CAPSID), "build", str(out), str(recipe)], env=env,
                            stderr=subprocess.PIPE, text=True)
    def sleepers() -> list[str]:  # any user's: a root build's steps run as another range
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and \
                        (entry / "cmdline").read_bytes() == b"sleep\x0030.37\x00":
                    found.append(entry.name)
            except OSError:
                continue
        return [p for p in found if process_identity(int(p)) is not None]
    wait_for(sleepers, "the step's command started")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert until_gone(sleepers) == [], "the step's command outlived the build"
    assert not out.exists()
    recipe.write_text(recipe.read_text().replace("sleep 30.37", "true"))
    # the killed step's temporary, once past the grace period, is recognised as stale
    tmp = Path(env["CAPSID_CACHEDIR"]) / ("build-root" if os.getuid() == 0 else "build") / "tmp"
    for left in tmp.iterdir():
        os.utime(left, (time.time() - 60, time.time() - 60), follow_symlinks=False)
    rebuilt = build(env, out, recipe)
    assert ran(rebuilt) == 1  # the COPY came from the cache
    # root's build layers are kept apart (their files belong to its build range)
    assert not any(tmp.iterdir())


@pytest.mark.parametrize("syntax", ["docker", "singularity"])
def test_hpccm_recipes_build_in_both_formats(env: dict[str, str], tmp_path: Path,
                                             syntax: str) -> None:
    """hpccm (NVIDIA's HPC Container Maker) writes the recipes many sites start from."""
    import sys

    hpccm = Path(sys.executable).parent / "hpccm"
    if not hpccm.exists():
        pytest.skip("hpccm is not installed (pip install '.[dev]')")
    write(tmp_path, "recipe.py", """
        Stage0 += baseimage(image='debian-python3:12', _distro='ubuntu22')
        Stage0 += shell(commands=['echo built-by-hpccm > /hpccm.txt'])
        Stage0 += environment(variables={'HPCCM_VAR': 'set'})
        Stage0 += label(metadata={'maker': 'hpccm'})
        Stage0 += runscript(commands=['cat /hpccm.txt'])
        """)
    text = subprocess.run([str(hpccm), "--recipe", str(tmp_path / "recipe.py"), "--format",
                           syntax], capture_output=True, text=True, check=True).stdout
    recipe = tmp_path / ("Dockerfile" if syntax == "docker" else "recipe.def")
    recipe.write_text(text)
    out = tmp_path / "hpccm.sif"
    build(env, out, recipe)
    assert run_capsid("run", out, env=env).stdout == "built-by-hpccm\n"
    assert run_capsid("exec", out, "sh", "-c", "echo $HPCCM_VAR",
                      env=env).stdout == "set\n"
    assert "maker: hpccm" in run_capsid("inspect", "--labels", out, env=env).stdout


def test_add_unpacks_local_archives_and_fetches_urls(env: dict[str, str],
                                                     tmp_path: Path) -> None:
    import http.server
    import tarfile
    import threading

    served = tmp_path / "served"
    served.mkdir()
    (served / "remote.txt").write_text("from a URL\n")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *a, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ctx = tmp_path / "ctx"
        (ctx / "pkg" / "bin").mkdir(parents=True)
        (ctx / "pkg" / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
        with tarfile.open(ctx / "pkg.tar.gz", "w:gz") as tar:
            tar.add(ctx / "pkg", arcname="pkg")
        port = server.server_address[1]
        recipe = write(ctx, "Dockerfile", f"""
            FROM busybox:1
            ADD pkg.tar.gz /opt/
            ADD http://127.0.0.1:{port}/remote.txt /data/
            """)
        out = tmp_path / "add.sif"
        build(env, out, recipe)
        # the URL's file is root's and mode 600, as Docker makes it: read it as root
        check = run_capsid("exec", "--fakeroot", out, "sh", "-c",
                           "cat /opt/pkg/bin/tool /data/remote.txt; "
                           "stat -c %a /data/remote.txt", env=env)
        assert check.stdout == "#!/bin/sh\necho tool\nfrom a URL\n600\n", check.stderr
        # ADD --checksum: the download must hash to it (it was ignored)
        import hashlib

        url = f"http://127.0.0.1:{port}/remote.txt"
        right = hashlib.sha256(b"from a URL\n").hexdigest()
        for checksum, fails in ((f"sha256:{right}", None), ("sha256:" + "0" * 64, "not the"),
                                ("md5:abc", "is not a digest")):
            checked = write(ctx, "checked.dockerfile", f"FROM busybox:1\nADD --checksum={checksum} "
                            f"{url} /data/\n")
            result = build(env, tmp_path / "c.sif", checked, "--force", check=False)
            if fails is None:
                assert result.returncode == 0, result.stderr
            else:
                assert result.returncode == 255 and fails in result.stderr, result.stderr
        local = write(ctx, "local.dockerfile", f"FROM busybox:1\nADD --checksum=sha256:{right} "
                      "pkg.tar.gz /x/\n")
        result = build(env, tmp_path / "c.sif", local, "--force", check=False)
        assert "is for one http(s) URL" in result.stderr
    finally:
        server.shutdown()


def test_build_secrets_reach_a_step_and_stay_out_of_the_image(env: dict[str, str],
                                                               tmp_path: Path) -> None:
    """docker build --secret and RUN --mount=type=secret: a file at /run/secrets/ID (or a
    target), a variable (env=), nothing where not given unless required; never in a
    layer."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (tmp_path / "token").write_text("s3cret-file")
    recipe = write(ctx, "Dockerfile", """
        FROM busybox:1
        RUN --mount=type=secret,id=tok cat /run/secrets/tok > /seen-file
        RUN --mount=type=secret,id=api,env=API_KEY,target=/etc/api echo "$API_KEY" > /seen-env
        RUN --mount=type=secret,id=absent ls /run/secrets > /seen-absent 2>&1 || true
        """)
    out = tmp_path / "s.sif"
    result = build({**env, "API": "s3cret-env"}, out, recipe, "--secret",
                   f"id=tok,src={tmp_path / 'token'}", "--secret", "id=api,env=API")
    assert "s3cret" not in result.stderr
    check = run_capsid("exec", out, "sh", "-c", "cat /seen-file; echo; cat /seen-env; "
                       "ls /run/secrets /etc/api 2>&1", env=env)
    assert check.stdout.startswith("s3cret-file\ns3cret-env\n"), check.stdout
    assert check.stdout.count("No such file or directory") == 2, check.stdout  # no trace
    assert b"s3cret" not in out.read_bytes()
    required = write(ctx, "required.dockerfile",
                     "FROM busybox:1\nRUN --mount=type=secret,id=must,required cat "
                     "/run/secrets/must\n")
    refused = build(env, tmp_path / "r.sif", required, check=False)
    assert refused.returncode == 255 and "needs the secret 'must'" in refused.stderr
    missing = build(env, tmp_path / "m.sif", recipe, "--secret", "id=tok,env=NOT_SET_X",
                    check=False)
    assert "no variable NOT_SET_X is set" in missing.stderr


def test_dash_f_as_docker_and_as_apptainer(env: dict[str, str], tmp_path: Path) -> None:
    """``-f FILE CONTEXT`` is Docker's; ``-f OUT.sif RECIPE`` is Apptainer's --fakeroot."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    write(ctx, "a", "from the context\n")
    recipe = write(tmp_path, "app.dockerfile", "FROM busybox:1\nCOPY a /a\n")
    result = run_capsid("build", "-f", recipe, tmp_path / "d.sif", ctx, env=env)
    assert result.returncode == 0, result.stderr
    assert run_capsid("exec", tmp_path / "d.sif", "cat", "/a",
                      env=env).stdout == "from the context\n"
    definition = write(tmp_path, "a.def", "Bootstrap: docker\nFrom: busybox:1\n%post\n"
                       "  echo fakeroot > /f\n")
    result = run_capsid("build", "-f", tmp_path / "f.sif", definition, env=env)
    assert result.returncode == 0, result.stderr
    assert run_capsid("exec", tmp_path / "f.sif", "cat", "/f", env=env).stdout == "fakeroot\n"


def test_a_directory_with_a_dockerfile_is_a_build_context(env: dict[str, str],
                                                          tmp_path: Path) -> None:
    """``capsid build OUT DIR`` reads DIR/Dockerfile (or Containerfile) with DIR as the
    context, as ``docker build DIR`` does; a sandbox (a root file system) stays an image."""
    ctx = tmp_path / "project"
    ctx.mkdir()
    write(ctx, "a", "from the context\n")
    write(ctx, "Containerfile", "FROM busybox:1\nCOPY a /a\n")
    result = run_capsid("build", tmp_path / "c.sif", ctx, cwd=ctx, env=env)
    assert result.returncode == 0, result.stderr
    assert run_capsid("exec", tmp_path / "c.sif", "cat", "/a",
                      env=env).stdout == "from the context\n"
    result = run_capsid("build", "--sandbox", tmp_path / "box", ".", cwd=ctx, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "box" / "a").read_text() == "from the context\n"
    write(tmp_path / "box", "Dockerfile", "FROM scratch\n")  # a sandbox holding a recipe
    result = run_capsid("build", tmp_path / "s.sif", tmp_path / "box", env=env)
    assert result.returncode == 0, result.stderr
    assert run_capsid("exec", tmp_path / "s.sif", "cat", "/a",
                      env=env).stdout == "from the context\n"


def test_copy_heredoc(env: dict[str, str], tmp_path: Path) -> None:
    recipe = tmp_path / "Dockerfile"
    recipe.write_text("FROM busybox:1\nCOPY <<EOF /etc/motd\nwritten by a heredoc\nEOF\n"
                      "COPY --chmod=0755 <<-SCRIPT /usr/local/bin/hi\n"
                      "\t#!/bin/sh\n\techo hi\n\tSCRIPT\n")
    out = tmp_path / "h.sif"
    build(env, out, recipe)
    check = run_capsid("exec", out, "sh", "-c", "cat /etc/motd; hi; stat -c %a "
                       "/usr/local/bin/hi", env=env)
    assert check.stdout == "written by a heredoc\nhi\n755\n", check.stderr


def test_push_of_a_built_image_keeps_its_layers(env: dict[str, str], registry: Registry,
                                                tmp_path: Path) -> None:
    write(tmp_path, "f", "copied\n")
    recipe = write(tmp_path, "Dockerfile", """
        FROM busybox:1
        COPY f /f
        RUN echo ran > /ran
        CMD ["cat", "/f", "/ran"]
        """)
    out = tmp_path / "built.sif"
    build(env, out, recipe)
    target = f"docker://{registry.host}/test/built:1"
    pushed = run_capsid("push", out, target, env=env)
    assert pushed.returncode == 0, pushed.stderr
    layers = registry.manifest(target)["layers"]
    assert isinstance(layers, list) and len(layers) == 3  # busybox's, then COPY's and RUN's
    back = tmp_path / "back.sif"
    assert run_capsid("pull", back, target, env=env).returncode == 0
    result = run_capsid("run", back, env=env)
    assert (result.returncode, result.stdout) == (0, "copied\nran\n"), result.stderr


def test_run_mounts(env: dict[str, str], tmp_path: Path) -> None:
    """RUN --mount: a cache directory kept between builds, a bind from the context, a tmpfs;
    none of them ends up in the image."""
    write(tmp_path, "data.txt", "from the context\n")
    recipe = write(tmp_path, "Dockerfile", """
        FROM busybox:1
        RUN --mount=type=cache,target=/var/cache/x sh -c \\
            'echo run >> /var/cache/x/log; wc -l < /var/cache/x/log > /count'
        RUN --mount=type=bind,source=data.txt,target=/in \\
            --mount=type=tmpfs,target=/scratch \\
            sh -c 'cat /in > /copied; touch /scratch/x; ls /scratch > /listed'
        """)
    out = tmp_path / "m.sif"
    build(env, out, recipe)
    build(env, out, recipe, "--force", "--no-cache")
    check = run_capsid("exec", out, "sh", "-c", "cat /count /copied /listed; "
                       "ls /var/cache/x /in /scratch 2>&1 | wc -l", env=env)
    lines = check.stdout.split("\n")
    assert lines[:3] == ["2", "from the context", "x"], check.stderr


def test_a_step_that_cannot_start_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    recipe = write(tmp_path, "Dockerfile", "FROM busybox:1\nRUN true\n")
    result = build(env, tmp_path / "o.sif", recipe, "-B", f"{tmp_path}/nowhere:/x",
                   check=False)
    one_error(result, "Dockerfile:2", "could not start", "bind source", "does not exist")

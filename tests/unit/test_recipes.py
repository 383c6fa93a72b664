"""Recipe parsers: Dockerfiles (BuildKit's rules) and Apptainer definition files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from capsid.build import deffile, dockerfile, words
from capsid.build.recipe import Config, Copy, Run, Setup, Where, resolve
from capsid.errors import UsageError


@pytest.mark.parametrize(("word", "expected"), [
    ("$A", "a"), ("${A}b", "ab"), ("${NONE:-d}", "d"), ("${A:+alt}", "alt"),
    ("${NONE:+alt}", ""), ("'$A'", "$A"), ('"$A x"', "a x"), ("\\$A", "$A"),
    ("${EMPTY:-e}", "e"), ("${EMPTY-e}", ""), ("a\\ b", "a b"), ("$", "$"),
])
def test_expansion_as_buildkit(word: str, expected: str) -> None:
    assert words.expand(word, {"A": "a", "EMPTY": ""}) == expected


def test_expansion_errors_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="missing"):
        words.expand("${A", {})
    with pytest.raises(UsageError, match="needed"):
        words.expand("${A:?needed}", {})


def test_split_keeps_quoted_blanks() -> None:
    assert words.split('a="b c" d\\ e \'f g\'') == ['a="b c"', "d\\ e", "'f g'"]


def parse(text: str, **args: str) -> list[object]:
    return dockerfile.parse(text, "Dockerfile", args).stages[-1].steps  # type: ignore[return-value]


def test_run_forms_heredocs_and_shell() -> None:
    steps = parse('FROM a\nRUN echo hi \\\n  there\nRUN ["ls", "-l"]\nSHELL ["/bin/bash", "-c"]\n'
                  'RUN <<EOF\nset -e\necho x\nEOF\nRUN cat <<END > /f\nbody\nEND\n')
    runs = [s for s in steps if isinstance(s, Run)]
    assert runs[0].argv == ("/bin/sh", "-c", "echo hi there")
    assert runs[1].argv == ("ls", "-l")
    assert runs[2].argv == ("/bin/bash", "-c", "set -e\necho x\n")
    assert runs[3].argv == ("/bin/bash", "-c", "cat <<END > /f\nbody\nEND\n")


def test_args_env_and_expansion_scopes() -> None:
    recipe = dockerfile.parse(
        "ARG TAG=12\nFROM debian:${TAG} AS base\nARG TAG\nARG N=1\n"
        "ENV A=x B=$A C=${N}\nCOPY $TARGETARCH /d\nFROM base\nARG TARGETARCH\n"
        "WORKDIR /w/$TARGETARCH\n", "Dockerfile", {"N": "7"}, arch="arm64")
    first, second = recipe.stages
    assert first.base.ref == "debian:12" and second.base.kind == "stage"
    env = next(s for s in first.steps if isinstance(s, Config) and s.key == "Env")
    # B sees A from before the line: unset, unless the base image's environment has it
    assert resolve(env.value, {}) == {"A": "x", "B": "", "C": "7"}
    assert resolve(env.value, {"A": "base"}) == {"A": "x", "B": "base", "C": "7"}
    copy = next(s for s in first.steps if isinstance(s, Copy))
    # TARGETARCH not declared in the stage: empty, as Docker
    assert resolve(copy, {}).sources == ("",)
    workdir = next(s for s in second.steps if isinstance(s, Config) and s.key == "WorkingDir")
    assert workdir.value == "/w/arm64"


def test_env_extends_the_base_images_environment() -> None:
    """ENV PATH=/x:$PATH sees the PATH the stage inherited from its base (#20)."""
    recipe = dockerfile.parse("FROM debian:12\nENV PATH=/opt/x/bin:$PATH HOME2=${HOME}\n"
                              "WORKDIR $HOME/app\n", "Dockerfile", {})
    env, workdir = recipe.stages[0].steps
    base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root"}
    assert resolve(env, base).value == {"PATH": "/opt/x/bin:/usr/local/bin:/usr/bin:/bin",
                                        "HOME2": "/root"}
    assert resolve(workdir, {**base, "HOME": "/home/jovyan"}).value == "/home/jovyan/app"


@pytest.mark.parametrize("flag", ['--chown="${NB_UID}:${NB_GID}"', "--chown=${NB_UID}:${NB_GID}",
                                  '--chown="1000:100"', "--chown='1000:100'"])
def test_copy_flags_follow_the_word_rules(flag: str) -> None:
    recipe = dockerfile.parse(f"FROM x\nARG NB_UID=1000\nARG NB_GID=100\n"
                              f"COPY {flag} --chmod=\"0755\" a.txt /b/\n", "Dockerfile", {})
    copy = next(s for s in recipe.stages[0].steps if isinstance(s, Copy))
    assert (copy.chown, copy.chmod, copy.sources) == ("1000:100", 0o755, ("a.txt",))


def test_escape_directive_and_comments() -> None:
    steps = parse("# escape=`\nFROM a\n# a comment\nRUN echo a `\n  # inside\n  b\n")
    assert [s.argv for s in steps if isinstance(s, Run)] == [("/bin/sh", "-c", "echo a b")]


@pytest.mark.parametrize(("text", "message"), [
    ("RUN x\n", "before the first FROM"),
    ("FROM a\nBOGUS x\n", "Dockerfile:2: unknown instruction BOGUS"),
    ("FROM a\nCOPY --chmod=9 a b\n", "not an octal mode"),
    ("FROM a\nCOPY only\n", "a source and a destination"),
    ("FROM a\nRUN <<EOF\nno end\n", "is not closed"),
    ("FROM a\nRUN --mount=type=ssh true\n", "not supported"),
    ("FROM a\nRUN --mount=type=secret true\n", "names no secret"),
    ("", "no FROM"),
])
def test_dockerfile_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        dockerfile.parse(text, "Dockerfile", {})


def test_target_stops_at_the_stage() -> None:
    recipe = dockerfile.parse("FROM a AS one\nFROM b AS two\n", "Dockerfile", {}).up_to("one")
    assert [s.name for s in recipe.stages] == ["one"]
    with pytest.raises(UsageError, match="no stage called"):
        dockerfile.parse("FROM a\n", "Dockerfile", {}).up_to("x")


DEF = """\
Bootstrap: docker
From: {{ base }}:1
Stage: build

%arguments
    base=busybox

%setup
    touch $APPTAINER_ROOTFS/x
%files
    a.txt /opt/a
    "with space" /opt/b
%post -c /bin/bash
    echo one
%post
    echo two
%environment
    export A=1
%runscript
    echo run
%labels
    Author someone
%help
    help text

Bootstrap: localimage
From: base.sif

%files from build
    /opt/a /a
"""


def test_definition_file_sections_stages_and_order() -> None:
    recipe = deffile.parse(DEF, "x.def", {})
    build, final = recipe.stages
    assert build.name == "build" and build.base.ref == "busybox:1"
    kinds = [type(s).__name__ for s in build.steps]
    assert kinds == ["Setup", "Copy", "Copy", "Run"]  # setup, files, then post
    copies = [s for s in build.steps if isinstance(s, Copy)]
    assert (copies[1].sources, copies[1].dest) == (("with space",), "/opt/b")
    run = next(s for s in build.steps if isinstance(s, Run))
    # repeated sections are concatenated; the first one's arguments count
    assert run.argv == ("/bin/bash", Run.SCRIPT)
    assert run.script == "    echo one\n    echo two\n"
    assert build.metadata is not None
    assert build.metadata.runscript == "#!/bin/sh\n\n    echo run\n"
    assert build.metadata.labels == {"Author": "someone"}
    assert build.metadata.help == "    help text\n"
    assert isinstance(build.steps[0], Setup)
    assert final.base.kind == "localimage"
    assert isinstance(final.steps[0], Copy) and final.steps[0].from_stage == "build"
    assert deffile.parse(DEF, "x.def", {"base": "alpine"}).stages[0].base.ref == "alpine:1"


@pytest.mark.parametrize(("text", "message"), [
    ("Bootstrap: docker\nFrom: {{ nope }}\n", "x.def:2: build var nope is not defined"),
    ("Bootstrap: yum\n", "not supported"),
    ("Bootstrap: debootstrap\nOSVersion: bookworm\n", "x.def:1: .*needs MirrorURL;"),
    ("Bootstrap: debootstrap\n", "needs OSVersion and MirrorURL"),
    ("Bootstrap: docker\n", "needs a From"),
    ("Bootstrap: docker\nFrom: a\nColour: blue\n", "invalid header keyword"),
    ("Bootstrap: docker\nFrom: a\n%weird\n", "invalid section %weird"),
    ("Bootstrap: docker\nFrom: a\n%apprun\n", "x.def:3: %apprun needs an app name"),
    ("Bootstrap: docker\nFrom: a\n%apprun ../up\n", "needs an app name"),
    ("Bootstrap: docker\nFrom: a\n%appfiles foo\n  a ../../etc/x\n", "leaves the app"),
    ("Bootstrap: docker\nFrom: a\n%files\n  a b c\n", "more than"),
    ("From: a\n", "no Bootstrap"),
])
def test_definition_file_errors(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        deffile.parse(text, "x.def", {})


def test_scif_apps_become_steps_laid_out_as_apptainer_does() -> None:
    import json

    from capsid.build import scif

    recipe = deffile.parse(
        "Bootstrap: docker\nFrom: a\n%post\n  echo main\n%apprun foo\n  echo run\n"
        "%appinstall foo\n  make\n%appfiles foo\n  src.txt\n  src.txt lib/x\n"
        "%applabels foo\n  Kind tool\n%appenv foo\n  export A=1\n%apprun bar\n  true\n",
        "x.def", {})
    layout, *steps = recipe.stages[0].steps
    assert isinstance(layout, Run) and layout.text.startswith("SCIF apps: foo, bar\n")
    copies = [s for s in steps if isinstance(s, Copy)]
    assert [(c.sources, c.dest) for c in copies] == [
        (("src.txt",), "/scif/apps/foo/src.txt"), (("src.txt",), "/scif/apps/foo/lib/x")]
    (post,) = [s for s in steps if isinstance(s, Run)]
    assert post.script is not None and post.script.startswith("  echo main\n")
    assert "cd /scif/apps/foo\n  make\n" in post.script  # after %post, in the app's directory
    apps = {"foo": scif.App("foo", Where("x.def", 5), run="  echo run\n",
                            labels="  Kind tool\n", env="  export A=1\n"),
            "bar": scif.App("bar", Where("x.def", 9), run="  true\n")}
    made = scif.files(list(apps.values()))
    assert json.loads(made["/scif/apps/foo/scif/labels.json"][0]) == {
        "SCIF_APP_NAME": "foo", "Kind": "tool"}
    assert made["/scif/apps/foo/scif/runscript"] == ("#!/bin/sh\n\n  echo run\n\n", 0o755)
    base = made["/.singularity.d/env/94-appsbase.sh"][0]
    assert "SCIF_APPROOT_foo=/scif/apps/foo\n" in base
    assert 'export SCIF_APPENV_foo="/scif/apps/foo/scif/env/90-environment.sh"' in base
    assert "SCIF_APPENV_bar" not in base and 'SCIF_APPRUN_bar="' in base


def test_registry_and_namespace_headers_join_the_name_as_apptainer() -> None:
    """Singularity 2's def files split the name; Apptainer joins REGISTRY/NAMESPACE/FROM."""
    recipe = deffile.parse("Bootstrap: docker\nRegistry: https://quay.io/\n"
                           "Namespace: biocontainers\nFrom: samtools:1.9\n", "x.def", {})
    assert recipe.stages[0].base.ref == "quay.io/biocontainers/samtools:1.9"
    only = deffile.parse("Bootstrap: docker\nNamespace: library\nFrom: busybox:1\n",
                         "x.def", {})
    assert only.stages[0].base.ref == "library/busybox:1"


def test_placeholders_in_comments_are_left_alone() -> None:
    recipe = deffile.parse("Bootstrap: docker\nFrom: a\n%post\n# {{ undefined }}\necho ok\n",
                           "x.def", {})
    run = recipe.stages[0].steps[0]
    assert isinstance(run, Run) and run.script == "# {{ undefined }}\necho ok\n"


def test_build_layers_leave_network_file_systems(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """overlayfs takes no upper directory on NFS: a cache there sends the layers to TMPDIR."""
    from capsid.build import store

    monkeypatch.delenv("CAPSID_BUILD_CACHEDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(store, "filesystem_type", lambda path: "nfs4")
    assert store.build_root(tmp_path / "home" / ".cache" / "capsid") == \
        tmp_path / f"capsid-build-{os.getuid()}"
    monkeypatch.setattr(store, "filesystem_type", lambda path: "ext4")
    assert store.build_root(tmp_path / "c") == tmp_path / "c" / "build"
    monkeypatch.setenv("CAPSID_BUILD_CACHEDIR", str(tmp_path / "chosen"))
    assert store.build_root(tmp_path / "c") == tmp_path / "chosen"


def test_filesystem_type_reads_mountinfo() -> None:
    from capsid.build.store import filesystem_type

    assert filesystem_type(Path("/proc/self")) == "proc"

"""The ``/.singularity.d`` tree: what Apptainer and capsid keep inside an image.

Layout (as Apptainer lays it out, so either tool runs the other's images)::

    /.singularity.d/
        actions/{exec,run,shell,start,test}   POSIX scripts: source env/*.sh, then act
        env/NN-*.sh                           sourced in glob order before the command
        libs/                                 bind target for GPU libraries
        runscript startscript test            what run / instance start / test execute
        runscript.help labels.json Singularity
    /singularity -> .singularity.d/runscript  and /.exec /.run /.shell /.test links

The scripts below are capsid's own; their behaviour follows Apptainer's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from capsid.image.stock import ENV_SCRIPTS

ROOT = ".singularity.d"
ENV = f"{ROOT}/env"

#: Environment scripts that every image carries and that hold nothing image-specific;
#: ``inspect --environment`` leaves them out.
BASE_ENV_SCRIPTS = ("01-base.sh", "94-appsbase.sh", "95-apps.sh", "99-base.sh",
                    "99-runtimevars.sh")

_SOURCE_ENV = """for capsid_env in /.singularity.d/env/*.sh; do
    if [ -f "$capsid_env" ]; then
        . "$capsid_env"
    fi
done
unset capsid_env
"""

ACTIONS = {
    "exec": "#!/bin/sh\n" + _SOURCE_ENV + 'exec "$@"\n',
    "run": "#!/bin/sh\n" + _SOURCE_ENV + """if [ -x /.singularity.d/runscript ]; then
    exec /.singularity.d/runscript "$@"
fi
echo "No runscript found in this container" >&2
exit 1
""",
    "shell": "#!/bin/sh\n" + _SOURCE_ENV + """\
if [ -n "${SINGULARITY_SHELL:-}" ] && [ -x "$SINGULARITY_SHELL" ]; then
    exec "$SINGULARITY_SHELL" "$@"
fi
if [ -x /bin/bash ]; then
    SHELL=/bin/bash
    export SHELL
    exec /bin/bash --norc "$@"
fi
if [ -x /bin/sh ]; then
    SHELL=/bin/sh
    export SHELL
    exec /bin/sh "$@"
fi
echo "This container has no /bin/sh" >&2
exit 1
""",
    "start": "#!/bin/sh\n" + _SOURCE_ENV + """if [ -x /.singularity.d/startscript ]; then
    exec /.singularity.d/startscript "$@"
fi
""",
    "test": "#!/bin/sh\n" + _SOURCE_ENV + """if [ -x /.singularity.d/test ]; then
    exec /.singularity.d/test "$@"
fi
echo "No test script found in this container" >&2
exit 1
""",
}

DEFAULT_RUNSCRIPT = """#!/bin/sh
echo "There is no runscript defined for this container."
"""
DEFAULT_STARTSCRIPT = "#!/bin/sh\n"

#: Links at the image root that older tools and users rely on.
ROOT_LINKS = {
    "singularity": ".singularity.d/runscript",
    ".exec": ".singularity.d/actions/exec",
    ".run": ".singularity.d/actions/run",
    ".shell": ".singularity.d/actions/shell",
    ".test": ".singularity.d/actions/test",
    "environment": ".singularity.d/env/90-environment.sh",
}
#: Directories every image gets, so default binds have somewhere to land.
ROOT_DIRS = ("dev", "proc", "sys", "tmp", "var", "var/tmp", "root", "home", "etc", "mnt",
             ".singularity.d/libs")


def labels_json(labels: dict[str, str]) -> bytes:
    """labels.json as Apptainer writes it: tab-indented, keys sorted."""
    return json.dumps(labels, indent="\t", sort_keys=True).encode()


def quote_sh(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def docker_env_script(env: list[str]) -> str:
    """10-docker2singularity.sh from an OCI ``Env`` list.

    Variables keep a value the user already set (``${K:-value}``) except PATH,
    which the image defines.
    """
    lines = ["#!/bin/sh"]
    for item in env:
        key, _, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            continue
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") \
            .replace("`", "\\`")
        if key == "PATH":
            lines.append(f'export PATH="{escaped}"')
        else:
            lines.append(f'export {key}="${{{key}:-"{escaped}"}}"')
    return "\n".join(lines) + "\n"


def oci_runscript(entrypoint: list[str], cmd: list[str], workdir: str | None = None) -> str:
    """A runscript with Docker's rules: arguments replace CMD and follow ENTRYPOINT.

    With *workdir* (images capsid builds from a Dockerfile) it starts there, as
    ``docker run`` does; pulled images keep Apptainer's rule of starting in the cwd.
    """
    ep = " ".join(quote_sh(a) for a in entrypoint)
    cm = " ".join(quote_sh(a) for a in cmd)
    cd = f"cd {quote_sh(workdir)} || exit 1\n" if workdir and workdir != "/" else ""
    return f"""#!/bin/sh
# Generated from the image's OCI config: ENTRYPOINT then CMD, arguments replace CMD.
{cd}if [ $# -eq 0 ]; then
    set -- {cm}
fi
{f'set -- {ep} "$@"' if ep else ''}
exec "$@"
"""


@dataclass
class Metadata:
    """What ``inspect`` shows about an image."""

    deffile: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    runscript: str | None = None
    startscript: str | None = None
    test: str | None = None
    helpfile: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    oci_config: dict[str, object] | None = None

    @classmethod
    def from_tree(cls, files: dict[str, bytes | str]) -> Metadata:
        """Read it from the files of ``/.singularity.d`` (paths relative to it)."""

        def text(name: str) -> str | None:
            value = files.get(name)
            return value.decode(errors="replace") if isinstance(value, bytes) else None

        labels: dict[str, str] = {}
        raw = text("labels.json")
        if raw:
            try:
                loaded = json.loads(raw)
                labels = {str(k): str(v) for k, v in loaded.items()}
            except (ValueError, AttributeError):
                labels = {}
        environment = {
            f"/{ENV}/{name[4:]}": value.decode(errors="replace")
            for name, value in sorted(files.items())
            if name.startswith("env/") and name.endswith(".sh") and isinstance(value, bytes)
            and name[4:] not in BASE_ENV_SCRIPTS
        }
        return cls(deffile=text("Singularity"), labels=labels, runscript=text("runscript"),
                   startscript=text("startscript"), test=text("test"),
                   helpfile=text("runscript.help"), environment=environment)

    def attributes(self) -> dict[str, object]:
        """The ``data.attributes`` object of Apptainer's inspect JSON."""
        attrs: dict[str, object] = {}
        if self.deffile is not None:
            attrs["deffile"] = self.deffile
        if self.environment:
            attrs["environment"] = dict(self.environment)
        if self.helpfile is not None:
            attrs["helpfile"] = self.helpfile
        attrs["labels"] = dict(self.labels)
        if self.runscript is not None:
            attrs["runscript"] = self.runscript
        if self.startscript is not None:
            attrs["startscript"] = self.startscript
        if self.test is not None:
            attrs["test"] = self.test
        return attrs

    def inspect_json(self) -> bytes:
        """``inspect-metadata.json`` as stored in a SIF."""
        return json.dumps({"data": {"attributes": self.attributes()}, "type": "container"},
                          separators=(",", ":")).encode()

    @classmethod
    def from_inspect_json(cls, raw: bytes) -> Metadata:
        """Read it from a SIF's ``inspect-metadata.json``; fields of the wrong type are left out."""
        try:
            doc = json.loads(raw)
        except ValueError:  # UnicodeDecodeError too
            from capsid.errors import ImageFormatError

            raise ImageFormatError("the image's inspect-metadata.json object is not valid "
                                   "JSON", "the SIF is damaged; rebuild or download it again"
                                   ) from None
        attrs = _object(_object(_object(doc).get("data")).get("attributes"))

        def text(key: str) -> str | None:
            value = attrs.get(key)
            return value if isinstance(value, str) else None

        env = _object(attrs.get("environment"))
        return cls(deffile=text("deffile"),
                   labels={str(k): str(v) for k, v in _object(attrs.get("labels")).items()},
                   runscript=text("runscript"), startscript=text("startscript"),
                   test=text("test"), helpfile=text("helpfile"),
                   environment={str(k): str(v) for k, v in env.items()
                                if str(k).rsplit("/", 1)[-1] not in BASE_ENV_SCRIPTS})


def _object(value: object) -> dict[str, object]:
    """*value* if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def skeleton(runscript: str | None = None) -> dict[str, tuple[int, bytes | str | None]]:
    """The files, links and directories an image must have, relative to its root.

    Values are (mode, content): bytes for a file, str for a symlink target,
    None for a directory. Callers add only what the image does not have yet.
    """
    tree: dict[str, tuple[int, bytes | str | None]] = {}
    for d in ROOT_DIRS:
        tree[d] = (0o1777 if d in ("tmp", "var/tmp") else 0o755, None)
    for d in (ROOT, f"{ROOT}/actions", ENV):
        tree[d] = (0o755, None)
    for name, body in ACTIONS.items():
        tree[f"{ROOT}/actions/{name}"] = (0o755, body.encode())
    for name, script in ENV_SCRIPTS.items():
        if script is not None:
            tree[f"{ENV}/{name}"] = (0o755, script.encode())
    tree[f"{ROOT}/runscript"] = (0o755, (runscript or DEFAULT_RUNSCRIPT).encode())
    tree[f"{ROOT}/startscript"] = (0o755, DEFAULT_STARTSCRIPT.encode())
    tree[f"{ROOT}/labels.json"] = (0o644, labels_json({}))
    for link, target in ROOT_LINKS.items():
        tree[link] = (0o777, target)
    for name in ("etc/hosts", "etc/resolv.conf"):
        tree[name] = (0o644, b"")
    return tree

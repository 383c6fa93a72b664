"""The container's environment, with Apptainer's rules.

The host environment passes in, except what Apptainer blocks (its own
``APPTAINER_*``/``SINGULARITY_*`` variables, ``LD_LIBRARY_PATH``; ``PATH``, ``HOME`` and
``PS1`` are reset). The image's ``/.singularity.d/env/*.sh`` scripts are sourced
with the host variables out of the way, so image values win over host values;
``--env``, ``--env-file`` and ``APPTAINERENV_*`` win over both; host variables the
image did not set are restored last. The sourcing is a short POSIX shell prelude
that ends in ``exec``, so the command keeps the process (PID, signals, exit code).
Images without ``/bin/sh`` get the OCI ``Env`` list applied here instead.
"""

from __future__ import annotations

import os

from capsid.errors import UsageError
from capsid.image.stock import DEFAULT_PATH, ENV_SCRIPTS

TYPE_CHECKING = False
if TYPE_CHECKING:  # collections.abc costs a millisecond of every start
    from collections.abc import Callable, Mapping

#: Always passed, even with --cleanenv.
_ALWAYS = ("TERM", "http_proxy", "https_proxy", "no_proxy", "all_proxy", "ftp_proxy",
           "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "FTP_PROXY")
_BLOCKED = ("PATH", "LD_LIBRARY_PATH", "HOME", "PS1", "PROMPT_COMMAND", "PWD", "OLDPWD", "_",
            "SHLVL")
_BLOCKED_PREFIXES = ("APPTAINER_", "SINGULARITY_", "CAPSID_", "APPTAINERENV_",
                     "SINGULARITYENV_", "SING_USER_DEFINED_")
_ENV_PREFIXES = ("APPTAINERENV_", "SINGULARITYENV_", "CAPSID_ENV_")
_PATH_KEYS = {"PREPEND_PATH": "SING_USER_DEFINED_PREPEND_PATH",
              "APPEND_PATH": "SING_USER_DEFINED_APPEND_PATH",
              "PATH": "SING_USER_DEFINED_PATH"}

#: The prelude run by /bin/sh inside the container: source the image's env scripts,
#: with the forced values injected right after 99-base.sh, as Apptainer injects them
#: (each is shell text, quoted by :func:`container_env`: evaluated unless --no-eval);
#: then the PATH changes, host values the image left unset, and exec.
PRELUDE = r"""
capsid_inject() {
    for capsid_k in $CAPSID_FORCED; do
        eval "capsid_v=\$CAPSID_F_$capsid_k"
        eval "$capsid_k=$capsid_v"
        export "$capsid_k"
        unset "CAPSID_F_$capsid_k"
    done
    CAPSID_FORCED=
}
for capsid_f in /.singularity.d/env/*.sh; do
    [ -f "$capsid_f" ] && . "$capsid_f"
    [ "$capsid_f" != /.singularity.d/env/99-base.sh ] || capsid_inject
done
capsid_inject
[ -z "${SING_USER_DEFINED_PREPEND_PATH:-}" ] || PATH="$SING_USER_DEFINED_PREPEND_PATH:$PATH"
[ -z "${SING_USER_DEFINED_APPEND_PATH:-}" ] || PATH="$PATH:$SING_USER_DEFINED_APPEND_PATH"
[ -z "${SING_USER_DEFINED_PATH:-}" ] || PATH="$SING_USER_DEFINED_PATH"
unset SING_USER_DEFINED_PREPEND_PATH SING_USER_DEFINED_APPEND_PATH SING_USER_DEFINED_PATH
for capsid_k in $CAPSID_HOSTVARS; do
    eval "[ -n \"\${$capsid_k+set}\" ] || { $capsid_k=\$CAPSID_H_$capsid_k; export $capsid_k; }"
    unset "CAPSID_H_$capsid_k"
done
unset capsid_f capsid_k capsid_v CAPSID_FORCED CAPSID_HOSTVARS
unset -f capsid_inject
[ -n "${PATH:-}" ] || PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
if ! command -v "$1" >/dev/null 2>&1; then
    echo "capsid: error: \"$1\": executable file not found in \$PATH of the container;" \
        "check the name and the PATH inside the image ($PATH)" >&2
    exit 255
fi
exec "$@"
"""


def is_name(key: str) -> bool:
    """Whether *key* is a valid shell variable name."""
    return key.isidentifier() and key.isascii()


class EnvOptions:
    """The environment flags of an action command."""

    __slots__ = ("cleanenv", "env", "extra", "file_values", "home", "no_env", "no_eval",
                 "pinned")

    def __init__(self, cleanenv: bool = False, env: tuple[str, ...] = (),
                 file_values: dict[str, str] | None = None, home: str = "/",
                 extra: dict[str, str] | None = None,
                 pinned: dict[str, str] | None = None, no_eval: bool = False,
                 no_env: tuple[str, ...] = ()) -> None:
        self.cleanenv, self.env, self.home = cleanenv, env, home
        #: what the --env-file files set (read on the host: :func:`read_env_files`)
        self.file_values = file_values or {}
        self.extra = extra or {}  #: set before the image's scripts, which may change them
        self.pinned = pinned or {}  #: set after them, like --env (which still wins)
        #: the user's values as they are, not evaluated in the container (--no-eval)
        self.no_eval = no_eval
        self.no_env = frozenset(no_env)  #: host variables not passed in


def parse_assignments(items: list[str], where: str) -> dict[str, str]:
    """``K=V`` strings (comma lists allowed when every part is an assignment)."""
    result: dict[str, str] = {}
    for item in items:
        parts = item.split(",")
        pieces = parts if all("=" in p for p in parts) else [item]
        for piece in pieces:
            key, sep, value = piece.partition("=")
            key = key.strip()
            if not sep or not is_name(key):
                raise UsageError(f"{where} {piece!r} is not NAME=VALUE",
                                 "write variables as NAME=VALUE")
            result[key] = value
    return result


def read_env_file(path: str, host: Mapping[str, str] | None = None) -> dict[str, str]:
    """A ``--env-file``, read as Apptainer reads one: a shell script of assignments
    (``export``, quotes, ``$NAME`` of the host's variables and the file's own), which
    runs no command."""
    from capsid.image.locate import read_limited

    # Values are bytes to the kernel: keep any that are not UTF-8 as they are.
    text = read_limited(path, "env file", "give a file of NAME=VALUE lines"
                        ).decode("utf-8", "surrogateescape")
    from capsid.runtime import shellvars

    try:
        return shellvars.assignments(text, os.environ if host is None else host)
    except ValueError as err:
        raise UsageError(f"env file {path}, {err}",
                         "write NAME=VALUE lines, quoted as for a shell") from None


def read_env_files(paths: tuple[str, ...]) -> dict[str, str]:
    """What the ``--env-file`` files set, later files winning; read on the host."""
    values: dict[str, str] = {}
    for path in paths:
        values.update(read_env_file(path))
    return values


def may_evaluate(values: list[str]) -> bool:
    """Whether any of *values*, or of the ``APPTAINERENV_`` variables, may need
    :mod:`capsid.runtime.shellvars` in the container (to import it on the host, which the
    container's root hides)."""
    return any(map(_evaluable, values)) or any(
        _evaluable(v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES))


def _evaluable(value: str) -> bool:
    """Whether evaluating *value* as a shell word could change it."""
    return "$" in value or "`" in value or "\\" in value


def forced_values(opts: EnvOptions, host: dict[str, str]) -> dict[str, str]:
    """Values the user asked for explicitly; later sources win (files, then --env)."""
    forced: dict[str, str] = dict(opts.pinned)
    for prefix in reversed(_ENV_PREFIXES):
        for key, value in host.items():
            if key.startswith(prefix) and is_name(key[len(prefix):]):
                forced[key[len(prefix):]] = value
    forced.update(opts.file_values)
    forced.update(parse_assignments(list(opts.env), "--env"))
    if "HOME" in forced:  # as Apptainer: a warning, and the home it chose stays
        del forced["HOME"]
        from capsid import log

        log.get(__name__).warning("HOME cannot be set with --env or APPTAINERENV_HOME; "
                                  "ignored (use --home to choose the home directory)")
    return forced


def _prepare(opts: EnvOptions, host: dict[str, str]
             ) -> tuple[dict[str, str], dict[str, str], dict[str, str], set[str]]:
    """(the environment the image's scripts see, host values they may not override,
    values to inject after them (PATH changes under 99-runtimevars.sh's names), the
    keys among those to take as they are)."""
    forced = forced_values(opts, host)
    own = {k for k, v in opts.pinned.items() if forced.get(k) == v}  # capsid's, not the user's
    literal = set(forced) if opts.no_eval else set(own)
    final: dict[str, str] = {"PATH": DEFAULT_PATH, "HOME": opts.home}
    for key in _ALWAYS:
        if key in host and key not in opts.no_env:
            final[key] = host[key]
    if opts.cleanenv:
        final["LANG"] = "C"
        kept: dict[str, str] = {}
    else:
        kept = {k: v for k, v in host.items()
                if k not in _BLOCKED and k not in final and not k.startswith(_BLOCKED_PREFIXES)
                and is_name(k) and k not in opts.no_env}
    for key, target in _PATH_KEYS.items():
        if key in forced:
            forced[target] = forced.pop(key)
            if key in literal:
                literal.add(target)
    for key, value in forced.items():
        if key not in literal and _evaluable(value):
            _check_word(key, value)
    if forced.get("LD_LIBRARY_PATH") and "LD_LIBRARY_PATH" not in own:
        # as Apptainer: the libraries bound in at run time (GPU drivers) stay found
        forced["LD_LIBRARY_PATH"] += ":/.singularity.d/libs"
    final.update(opts.extra)
    return final, kept, forced, literal


def _check_word(key: str, value: str) -> None:
    """A value to evaluate in the container must be one a shell can read."""
    from capsid.runtime import shellvars

    try:
        shellvars.evaluate(value, {})
    except shellvars.NeedsShell:
        pass  # the shell in the container evaluates it
    except ValueError as err:
        raise UsageError(f"the value of {key}, {value!r}, cannot be evaluated in the "
                         f"container: {err}", "fix its quoting, or pass --no-eval to take "
                         "it as it is") from None


def _inject(forced: dict[str, str], literal: set[str], env: dict[str, str]) -> None:
    """Set *forced* in *env* in order, each evaluated against *env* as it is then (as
    the shell evaluates Apptainer's exports); :class:`shellvars.NeedsShell` where only
    a shell can."""
    for key, value in forced.items():
        if key not in literal and _evaluable(value):
            from capsid.runtime import shellvars

            value = shellvars.evaluate(value, env)
        env[key] = value


def _needs_shell(err: Exception) -> bool:
    """Whether *err* is :class:`shellvars.NeedsShell` (which the container's root may hide:
    it is imported on the host only where a value may need it)."""
    return type(err).__name__ == "NeedsShell"


def _shell_word(value: str, literal: bool) -> str:
    """*value* as the prelude injects it: double-quoted (evaluated) or single-quoted."""
    if literal:
        return "'" + value.replace("'", "'\"'\"'") + "'"
    return '"' + value.replace('"', '\\"') + '"'


def _runtime_vars(env: dict[str, str]) -> None:
    """What 99-runtimevars.sh does: the PATH changes asked for on the command line."""
    prepend, append, path = (env.pop(k, "") for k in (
        "SING_USER_DEFINED_PREPEND_PATH", "SING_USER_DEFINED_APPEND_PATH",
        "SING_USER_DEFINED_PATH"))
    current = env.get("PATH", "")
    if prepend:
        current = f"{prepend}:{current}"
    if append:
        current = f"{current}:{append}"
    env["PATH"] = path or current


def container_env(opts: EnvOptions, host: dict[str, str] | None = None,
                  *, use_prelude: bool = True, oci_env: list[str] | None = None
                  ) -> dict[str, str]:
    """The environment to execve with (the prelude then finishes it inside).

    Without the prelude (no shell in the image) the precedence is applied here:
    host values, then the image's OCI ``Env`` (*oci_env*), then forced values
    (evaluated here as far as that can be done without a shell).
    """
    final, kept, forced, literal = _prepare(opts, dict(os.environ if host is None else host))
    if not use_prelude:
        final.update(kept)
        for item in oci_env or ():
            key, sep, value = item.partition("=")
            if sep and is_name(key):
                final[key] = value
        for key, value in forced.items():
            try:
                _inject({key: value}, literal, final)
            except Exception as err:
                if not _needs_shell(err):
                    raise
                final[key] = value  # no shell to evaluate it with
        _runtime_vars(final)
        return final
    for key, value in kept.items():
        final[f"CAPSID_H_{key}"] = value
    final["CAPSID_HOSTVARS"] = " ".join(kept)
    for key, value in forced.items():
        final[f"CAPSID_F_{key}"] = _shell_word(value, key in literal)
    final["CAPSID_FORCED"] = " ".join(forced)
    return final


def finished_env(opts: EnvOptions, scripts: dict[str, bytes],
                 host: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment the prelude would leave, worked out here; None unless it can be.

    *scripts* are the image's ``/.singularity.d/env`` files (name → content). When
    each is one capsid writes (:mod:`capsid.image.stock`, or an OCI ``Env`` script
    of its own making), their effect is known, and the command can be started
    without a shell: Apptainer, too, evaluates these scripts itself. Anything else
    (an image's own ``%environment``, scripts from other tools, a forced value with a
    command substitution) needs the shell.
    """
    final, kept, forced, literal = _prepare(opts, dict(os.environ if host is None else host))
    try:
        if not apply_stock_scripts(scripts, final, lambda env: _inject(forced, literal, env)):
            return None
    except Exception as err:
        if _needs_shell(err):
            return None
        raise
    for key, value in kept.items():
        final.setdefault(key, value)
    if not final.get("PATH"):
        final["PATH"] = DEFAULT_PATH
    return final


def apply_stock_scripts(scripts: dict[str, bytes], env: dict[str, str],
                        inject: Callable[[dict[str, str]], None] | None = None) -> bool:
    """Apply *scripts*, in the shell's order, to *env*, and *inject* the forced values
    right after 99-base.sh (or at the end); False if a script is not a stock one."""
    for name in sorted(scripts):
        text = scripts[name].decode(errors="replace")
        if name == "10-docker2singularity.sh":
            if not _apply_docker_env(text, env):
                return False
        elif ENV_SCRIPTS.get(name) != text:
            return False
        elif name == "95-apps.sh" and env.get("SINGULARITY_APPNAME"):
            return False  # an app to set up: leave it to the script
        elif name == "99-base.sh":
            library_path = env.get("LD_LIBRARY_PATH")
            env["LD_LIBRARY_PATH"] = (f"{library_path}:" if library_path else "") \
                + "/.singularity.d/libs"
            env["PS1"] = env.get("PS1") or "Apptainer> "
            if inject is not None:
                inject(env)
                inject = None
        elif name == "99-runtimevars.sh":
            _runtime_vars(env)
    if inject is not None:
        inject(env)
    _runtime_vars(env)  # where the image has no 99-runtimevars.sh, or it came first
    return True


def _apply_docker_env(text: str, env: dict[str, str]) -> bool:
    """10-docker2singularity.sh as :func:`capsid.image.meta.docker_env_script` writes it."""
    lines = text.split("\n")
    if lines[0] != "#!/bin/sh" or lines[-1] != "":
        return False
    for line in lines[1:-1]:
        key, sep, rest = line.removeprefix("export ").partition("=")
        if not line.startswith("export ") or not sep or not is_name(key):
            return False
        if key == "PATH":
            quoted = rest
        else:
            head, tail = f'"${{{key}:-', '}"'
            if not (rest.startswith(head) and rest.endswith(tail)):
                return False
            quoted = rest[len(head):-len(tail)]
        value = _unquote(quoted)
        if value is None:
            return False
        if key == "PATH" or not env.get(key):
            env[key] = value
    return True


def _unquote(quoted: str) -> str | None:
    """The value of a double-quoted shell word without expansions; None if it has any."""
    if len(quoted) < 2 or quoted[0] != '"' or quoted[-1] != '"':
        return None
    out, chars = [], iter(quoted[1:-1])
    for char in chars:
        if char == "\\":
            escaped = next(chars, "")
            if escaped not in ('"', "$", "`", "\\"):
                return None
            out.append(escaped)
        elif char in '"$`':
            return None
        else:
            out.append(char)
    return "".join(out)

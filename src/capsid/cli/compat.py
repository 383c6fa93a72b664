"""Apptainer's flags that capsid accepts without acting on, or refuses, and why.

One table for every verb: the parsers read it (an accepted flag is consumed, a refused
one is one error line naming the flag and what to do instead: never "unknown flag" for a
flag Apptainer 1.4 has), and the README's "Coming from Apptainer" section shows it
(``python -m capsid.cli.compat`` prints that table; a unit test keeps them equal).
Flags capsid implements are in each verb's own parser, not here.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

#: the action verbs, which share their flags
ACTIONS = ("exec", "run", "shell", "test", "instance start", "instance run")
_CGROUPS = "capsid sets no cgroup limits: ask the batch system for them (Slurm's --mem, " \
           "--cpus-per-task) or run under systemd-run --user --scope"
_REGISTRY = ("authfile", "", "FILE", False, "refused",
             "give registry credentials with 'capsid registry login' (or Docker's and "
             "podman's credential files, which capsid reads)")
_DOCKER_LOGIN = ("docker-login", "", "", False, "refused",
                 "log in first with 'capsid registry login HOST'")
_X509 = "X.509 certificate signatures are not supported: verify with your OpenPGP " \
        "keyring, or a PEM public key (--key)"
_DOCKER_HOST = ("docker-host", "", "URL", False, "refused",
                "capsid talks to registries, not to a Docker daemon: 'docker save' the image "
                "and use docker-archive:FILE")

# (long name, short name, value name or "" for a switch, repeatable, kind, why)
Row = tuple[str, str, str, bool, str, str]

TABLE: dict[tuple[str, ...], tuple[Row, ...]] = {
    ACTIONS: (
        ("tmpdir", "", "DIR", False, "no-op",
         "capsid writes no temporary files for a container (Apptainer's hidden flag)"),
        ("containlibs", "", "LIBS", True, "refused",
         "bind the libraries in with -B and add their directory to LD_LIBRARY_PATH"),
        ("compat32", "", "", False, "refused",
         "capsid binds the 64-bit GPU libraries only"),
        ("intel-hpu", "", "", False, "refused",
         "Intel Gaudi accelerators have no support of their own: give them as CDI devices "
         "(--device)"),
        ("network-args", "", "ARGS", True, "no-op",
         "capsid's only network is --network none, which has nothing to configure"),
        ("no-init", "", "", False, "no-op",
         "with --pid, capsid's PID 1 is its own small process reaper, which shims nothing"),
        ("keep-privs", "", "", False, "no-op", "capsid never holds privileges to keep"),
        ("no-privs", "", "", False, "no-op", "capsid never grants privileges: always so"),
        ("drop-caps", "", "CAPS", False, "no-op",
         "a container has no capabilities on the host to drop"),
        ("underlay", "", "", False, "no-op",
         "deprecated in Apptainer; capsid always creates mount points in a layer of its own"),
        ("runscript-timeout", "", "DURATION", False, "no-op",
         "capsid has no action-script interpreter to time out"),
        ("disable-cache", "", "", False, "no-op",
         "images given by URI are converted once and served from capsid's cache"),
        ("ignore-userns", "", "", False, "no-op", "capsid always uses a user namespace"),
        ("add-caps", "", "CAPS", False, "refused",
         "capsid runs without privileges and cannot grant capabilities; use --fakeroot to "
         "be root inside"),
        ("allow-setuid", "", "", False, "refused",
         "images are mounted nosuid: capsid has no setuid mode"),
        ("security", "", "OPTS", True, "refused",
         "capsid loads no seccomp, AppArmor or SELinux profile of its own"),
        ("boot", "", "", False, "refused", "capsid does not boot /sbin/init in a container"),
        ("fusemount", "", "SPEC", True, "refused",
         "mount FUSE file systems on the host and bind them in with -B"),
        ("netns-path", "", "PATH", False, "refused",
         "joining a network namespace needs privileges capsid does not take; use --net"),
        ("dmtcp-launch", "", "FILE", False, "refused", "DMTCP checkpoints are not supported"),
        ("dmtcp-restart", "", "FILE", False, "refused", "DMTCP checkpoints are not supported"),
        ("apply-cgroups", "", "FILE", False, "refused", _CGROUPS),
        ("cpus", "", "N", False, "refused", _CGROUPS),
        ("cpu-shares", "", "N", False, "refused", _CGROUPS),
        ("cpuset-cpus", "", "LIST", False, "refused", _CGROUPS),
        ("cpuset-mems", "", "LIST", False, "refused", _CGROUPS),
        ("memory", "", "SIZE", False, "refused", _CGROUPS),
        ("memory-reservation", "", "SIZE", False, "refused", _CGROUPS),
        ("memory-swap", "", "SIZE", False, "refused", _CGROUPS),
        ("oom-kill-disable", "", "", False, "refused", _CGROUPS),
        ("pids-limit", "", "N", False, "refused", _CGROUPS),
        ("blkio-weight", "", "N", False, "refused", _CGROUPS),
        ("blkio-weight-device", "", "SPEC", True, "refused", _CGROUPS),
        _REGISTRY, _DOCKER_LOGIN, _DOCKER_HOST,
    ),
    ("build",): (
        ("ignore-fakeroot-command", "", "", False, "no-op",
         "a build's steps always emulate root in the kernel (a seccomp filter), with no "
         "fakeroot command"),
        ("ignore-userns", "", "", False, "no-op", "capsid always builds in a user namespace"),
        ("no-cleanup", "", "", False, "no-op",
         "a failed build's finished steps stay in the build cache anyway; nothing else is kept"),
        ("fix-perms", "", "", False, "no-op",
         "capsid's sandboxes are always readable and removable by their owner"),
        ("warn-unused-build-args", "", "", False, "no-op",
         "capsid does not check which build arguments a recipe uses"),
        ("tmpdir", "", "DIR", False, "no-op",
         "capsid builds in its build cache (CAPSID_BUILD_CACHEDIR), not in a temporary "
         "directory"),
        ("update", "u", "", False, "refused",
         "build a new image (the step cache makes it quick) rather than updating a sandbox"),
        ("json", "", "", False, "refused", "write the recipe as a definition file or Dockerfile"),
        ("encrypt", "e", "", False, "refused", "encrypted SIFs are not supported"),
        ("passphrase", "", "", False, "refused", "encrypted SIFs are not supported"),
        ("pem-path", "", "FILE", False, "refused", "encrypted SIFs are not supported"),
        ("library", "", "URL", False, "refused",
         "the Sylabs library is not supported: use docker:// or oras:// registries"),
        ("remote", "r", "", False, "refused", "remote builds are no longer supported (nor "
         "by Apptainer): build here, without root"),
        ("arch-variant", "", "VARIANT", False, "refused",
         "give the variant with --arch (arm/v7, arm64/v8)"),
        ("mksquashfs-args", "", "ARGS", False, "refused",
         "capsid writes squashfs with tar2sqfs: choose the compression with --compression"),
        ("nv", "", "", False, "no-op", "%test runs without GPUs"),
        ("nvccli", "", "", False, "no-op", "%test runs without GPUs"),
        ("compat32", "", "", False, "no-op", "%test runs without GPUs"),
        ("ignore-proot", "", "", False, "no-op",
         "capsid never uses proot: steps run as root in a user namespace"),
        ("data", "", "", False, "refused",
         "data containers are not supported: bind the data in with -B, or keep it in an "
         "overlay image (capsid overlay create)"),
        ("rocm", "", "", False, "no-op", "%test runs without GPUs"),
        ("writable-tmpfs", "", "", False, "no-op", "%test always runs with a writable tmpfs"),
        _REGISTRY, _DOCKER_LOGIN, _DOCKER_HOST,
    ),
    ("pull",): (
        ("no-cleanup", "", "", False, "no-op",
         "a failed pull leaves nothing but verified blobs in the cache"),
        ("reproducible", "", "", False, "no-op",
         "a pull is reproducible already: the same image gives the same SIF, byte for byte"),
        ("allow-unsigned", "U", "", False, "no-op",
         "capsid does not verify signatures on pull yet: run 'capsid verify' on the image"),
        ("allow-unauthenticated", "", "", False, "no-op",
         "capsid does not verify signatures on pull yet: run 'capsid verify' on the image"),
        ("library", "", "URL", False, "refused",
         "the Sylabs library is not supported: use docker:// or oras:// registries"),
        ("arch-variant", "", "VARIANT", False, "refused",
         "give the variant with --arch (arm/v7, arm64/v8)"),
        _REGISTRY, _DOCKER_LOGIN, _DOCKER_HOST,
    ),
    ("push",): (
        ("allow-unsigned", "U", "", False, "no-op",
         "capsid does not sign or check signatures on push yet"),
        ("library", "", "URL", False, "refused",
         "the Sylabs library is not supported: push to oras:// or docker://"),
        ("description", "D", "TEXT", False, "refused",
         "descriptions belong to the Sylabs library, which is not supported"),
        ("annotation", "", "KEY=VALUE", True, "refused",
         "capsid does not annotate pushed manifests: put the facts in the image's labels"),
        _REGISTRY, _DOCKER_LOGIN,
    ),
    ("verify",): (
        ("url", "u", "URL", False, "refused",
         "capsid has no keyserver: import the signer's key with 'capsid key import FILE'"),
        ("certificate", "", "FILE", False, "refused", _X509),
        ("certificate-intermediates", "", "FILE", False, "refused", _X509),
        ("certificate-roots", "", "FILE", False, "refused", _X509),
        ("ocsp-verify", "", "", False, "refused", _X509),
    ),
    ("registry",): (
        ("config", "c", "FILE", False, "refused",
         "capsid keeps registry logins in Docker's config.json format: choose that file "
         "with --authfile"),
    ),
    ("key import",): (
        ("new-password", "", "", False, "refused",
         "capsid keeps secret keys unencrypted, in a file only you can read (mode 0600)"),
    ),
    ("instance stop",): (
        ("user", "u", "USER", False, "refused",
         "only your own instances can be stopped: run it as that user"),
    ),
    ("instance list",): (
        ("user", "u", "USER", False, "refused",
         "only your own instances are listed: run it as that user"),
        ("all", "a", "", False, "no-op", "capsid lists your own instances only"),
    ),
}


def rows(verb: str) -> tuple[Row, ...]:
    """The compatibility flags of *verb*."""
    return next((found for verbs, found in TABLE.items() if verb in verbs), ())


def refuse(name: str, why: str) -> None:
    from capsid.errors import UsageError

    raise UsageError(f"--{name} is not supported by capsid", why)


def accepted(verb: str, name: str) -> Row | None:
    """*verb*'s compatibility flag *name* (long or short, without dashes) if capsid
    accepts it; refused here with one line; None if Apptainer has no such flag."""
    for row in rows(verb):
        if name in (row[0], row[1]) and name:
            if row[4] == "refused":
                refuse(row[0], row[5])
            return row
    return None


def add_to(p: argparse.ArgumentParser, verb: str, taken: frozenset[str] = frozenset()
           ) -> None:
    """Add *verb*'s compatibility flags to an argparse parser (those not in *taken*)."""
    import argparse

    class Refused(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                     values: object, option_string: str | None = None) -> None:
            accepted(verb, self.dest.replace("_", "-"))  # raises, with the reason

    group = p.add_argument_group("Apptainer's flags capsid accepts or refuses")
    for name, short, value, repeatable, kind, why in rows(verb):
        if name in taken:
            continue
        names = [n for n in (f"--{name}", *([f"-{short}"] if short else []))
                 if n not in p._option_string_actions]  # the verb's own meaning wins
        if not names:
            continue
        dest = f"compat_{name.replace('-', '_')}"
        why = why.replace("%", "%%")  # argparse formats help with %
        if kind == "refused":
            group.add_argument(*names, dest=name.replace("-", "_"), action=Refused,
                               nargs=1 if value else 0, help=f"refused: {why}")
        elif value:
            group.add_argument(*names, dest=dest, metavar=value,
                               action="append" if repeatable else "store",
                               help=f"accepted, no effect: {why}")
        else:
            group.add_argument(*names, dest=dest, action="store_true",
                               help=f"accepted, no effect: {why}")


def markdown() -> str:
    """The README's table of these flags."""
    lines = ["| command | flag | capsid | why |", "|---|---|---|---|"]
    for verbs, found in TABLE.items():
        where = "exec, run, shell, test, instance start/run" if verbs == ACTIONS \
            else verbs[0]
        for name, short, value, _, kind, why in found:
            flag = f"`--{name}`" + (f"/`-{short}`" if short else "") + \
                (f" {value}" if value else "")
            lines.append(f"| {where} | {flag} | {kind} | {why} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(markdown())

"""Building an image from a recipe, one cached step at a time, without privileges.

Each stage starts from its base image (unpacked once into the cache) and stacks one
directory per step with overlayfs: RUN and %post run there as root in a user
namespace with root emulation (:mod:`capsid.runtime.rootemu`); COPY, ADD, %files and
WORKDIR write into a step's directory from a child with the layers mounted
(:mod:`capsid.build.mounted`). A step's cache key covers the step before it, its
expanded text, its environment and the digest of what it copies, so an unchanged
rebuild reuses every step and an edit reruns from the first step it touches. The
output streams the base's layers and the step directories through the same flattener
as ``pull`` into ``tar2sqfs``: no root filesystem is copied on the way to the SIF.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from capsid import log
from capsid.build import mounted
from capsid.build.base import BaseImage, open_base
from capsid.build.context import Context
from capsid.build.copying import Destination
from capsid.build.recipe import (
    Config,
    Copy,
    Mount,
    Recipe,
    Run,
    Setup,
    Stage,
    Step,
    resolve,
)
from capsid.build.state import ImageState
from capsid.build.store import BuildStore, Layer, Pending, digest
from capsid.errors import CapsidError, UsageError
from capsid.image import output
from capsid.image.stock import DEFAULT_PATH
from capsid.oci import image as oci
from capsid.runtime import rootemu
from capsid.runtime.binds import BindSpec
from capsid.runtime.options import Layers, Options

LOG = log.get(__name__)

INSIDE = "/.capsid-build"  #: the step's own files inside: script, apt.conf, env, labels


class BuildOptions:
    """What ``capsid build`` takes beside the recipe and the output (all optional)."""

    def __init__(self, *, context: Path | None = None,
                 build_args: dict[str, str] | None = None, target: str | None = None,
                 no_cache: bool = False, notest: bool = False,
                 sections: tuple[str, ...] | None = None, binds: tuple[BindSpec, ...] = (),
                 arch: str | None = None, nohttps: bool = False, quiet: bool = False,
                 compression: str = "zstd", cache_root: Path | None = None,
                 syntax: str | None = None, sandbox: bool = False, force: bool = False,
                 ignore_subuid: bool = False, reproducible: bool = False,
                 secrets: dict[str, bytes] | None = None) -> None:
        #: where COPY and %files read (default: the recipe's directory)
        self.context, self.build_args, self.target = context, build_args or {}, target
        self.no_cache, self.notest, self.sections = no_cache, notest, sections
        self.binds, self.nohttps, self.quiet = binds, nohttps, quiet
        self.platform = oci.parse_platform(arch)
        self.compression, self.cache_root = compression, cache_root
        self.syntax = syntax  #: "dockerfile" or "def"; None: from the recipe's name or text
        self.sandbox, self.force = sandbox, force  #: a directory; replace what is there
        #: map only the user, even where /etc/subuid grants ids (every file is root's)
        self.ignore_subuid = ignore_subuid
        #: without SOURCE_DATE_EPOCH, date every file by the first base's creation
        self.reproducible = reproducible
        #: ``--secret``: name → content, for RUN --mount=type=secret (never in a layer, nor
        #: in a step's cache key)
        self.secrets = secrets or {}


class BuildError(CapsidError):
    """A step failed; the steps before it stay cached."""


class StageResult:
    """A built stage: its base, its layers (oldest first) and its final state."""

    def __init__(self, stage: Stage, base: BaseImage, layers: list[Layer],
                 state: ImageState, key: str) -> None:
        self.stage, self.base, self.layers, self.state, self.key = (stage, base, layers,
                                                                      state, key)

    def lowers(self, store: BuildStore) -> list[str]:
        """Directories for overlayfs, newest first, ending with the base's files."""
        return [*self.step_lowers(), str(self.base.rootfs(store))]

    def step_lowers(self) -> list[str]:
        """The steps' directories for overlayfs, newest first (the base not included)."""
        return [str(layer.diff) for layer in reversed(self.layers) if not layer.empty]


class Builder:
    """Runs a recipe's stages."""

    def __init__(self, recipe: Recipe, opts: BuildOptions) -> None:
        from capsid.oci.store import default_root

        self.recipe, self.opts = recipe, opts
        cache_root = opts.cache_root or default_root()
        self.store = BuildStore(cache_root).prepare()
        self.context = Context(opts.context or Path(recipe.path).parent,
                               (cache_root, self.store.root))
        self.results: list[StageResult] = []
        from capsid.runtime import userns

        #: files keep the owners steps give them: ids beside root are mapped (the
        #: user's subordinate ids, or root's own); otherwise everything is root's
        self.real_owners = os.geteuid() == 0 and userns.mapped_ids() > 1
        self.epoch = _epoch()
        self.total = sum(len(s.steps) + 1 for s in recipe.stages)
        self.count = 0
        self.rerun = 0  #: steps that ran (were not cached), for tests and the summary
        self.warned_users: set[str] = set()
        self.downloads: dict[str, Path] = {}  #: ADD's URLs, fetched once a build
        self.temporaries: list[output.Temporary] = []

    def close(self) -> None:
        """Remove what the build downloaded."""
        for temp in self.temporaries:
            temp.discard()

    # -- progress --------------------------------------------------------------------

    def _say(self, text: str, cached: bool = False) -> None:
        self.count += 1
        if self.opts.quiet:
            return
        first = text.splitlines()[0] if text else ""
        if len(first) > 100:
            first = first[:97] + "..."
        print(f"[{self.count}/{self.total}] {first}{'  CACHED' if cached else ''}",
              file=sys.stderr, flush=True)

    # -- stages ----------------------------------------------------------------------

    def run(self) -> StageResult:
        """Build every stage; the last one's result."""
        for stage in self.recipe.stages:
            self.results.append(self._stage(stage))
        return self.results[-1]

    def _stage(self, stage: Stage) -> StageResult:
        if stage.base.kind == "stage":
            index = self.recipe.stage(stage.base.ref)
            assert index is not None
            parent = self.results[index]
            base, layers = parent.base, list(parent.layers)
            state, key = parent.state.copy(), parent.key
            self._say(f"FROM {stage.base.ref} ({stage.name})", cached=True)
        else:
            platform = oci.parse_platform(stage.platform) if stage.platform \
                else self.opts.platform  # FROM --platform=...
            self._say(f"FROM {stage.base.ref or stage.base.kind}")
            try:
                base = open_base(stage.base, self.store, platform, self.opts.nohttps,
                                 self.opts.quiet)
            except CapsidError as err:
                raise BuildError(f"{stage.where}: cannot get the base image "
                                 f"{stage.base.ref or stage.base.kind}: {err.message}",
                                 err.hint) from None
            if self.opts.reproducible and self.epoch is None:
                self.epoch = _created(base, stage)
                os.environ["SOURCE_DATE_EPOCH"] = str(self.epoch)  # for the output's writer
            layers = []
            config = dict(base.config.get("config") or {})
            if self.recipe.kind == "dockerfile" and not any(
                    str(item).startswith("PATH=") for item in config.get("Env") or []):
                # as BuildKit: a base without PATH (scratch, most archives) gets the default
                config["Env"] = [*(config.get("Env") or []), f"PATH={DEFAULT_PATH}"]
            state = ImageState(config, str(base.config.get("architecture") or platform[0]))
            key = digest("base", base.key, "owners" if self.real_owners else "")
        result = StageResult(stage, base, layers, state, key)
        if self.recipe.kind == "def" and stage.base.kind != "stage":
            self._metadata_dirs(result)
        for step in stage.steps:
            if self._skipped(step):
                continue
            self._step(result, step)
        return result

    def _skipped(self, step: Step) -> bool:
        sections = self.opts.sections
        if sections is None or self.recipe.kind != "def":
            return False
        kind = ("post" if isinstance(step, Run) else "setup" if isinstance(step, Setup)
                else "files" if isinstance(step, Copy) else "")
        return bool(kind) and kind not in sections

    def _step(self, result: StageResult, step: Step) -> None:
        # variables only the base's environment knows, now that it is known
        step = resolve(step, result.state.variables())
        if isinstance(step, Config):
            result.state.apply(step)
            result.key = digest(result.key, "config", step.key, step.value)
            if step.key != "WorkingDir":
                self._say(step.text)
                return
            # Docker makes the directory: a step of its own (usually an empty one)
            key = result.key
            cached = None if self.opts.no_cache else self.store.get(key)
            self._say(step.text, cached=cached is not None)
            if cached is None:
                cached = self._execute(result, step, key)
            result.layers.append(cached)
            return
        inputs: list[object]
        if isinstance(step, Copy):
            inputs = self._copy_inputs(step)
            origin = f"--from={step.from_stage} " if step.from_stage is not None else ""
            text = (f"{'ADD' if step.extract else 'COPY'} {origin}{' '.join(step.sources)} "
                    f"{step.dest}") if step.dockerish else \
                f"%files {origin.replace('--from=', 'from ')}{step.sources[0]} {step.dest}"
        elif isinstance(step, Run):
            inputs = [self._environment(result, step), [str(m) for m in step.mounts],
                      [str(b) for b in self.opts.binds]]
            text = step.text
        else:
            inputs, text = [], f"%setup\n{step.script}"
        key = digest(result.key, type(step).__name__, text, inputs, result.state.workdir)
        cached = None if self.opts.no_cache else self.store.get(key)
        self._say(text, cached=cached is not None)
        if cached is None:
            self.rerun += 1
            cached = self._execute(result, step, key)
        result.layers.append(cached)
        result.state = cached.state.copy()
        result.key = key

    def _execute(self, result: StageResult, step: Step, key: str) -> Layer:
        started = time.monotonic()
        pending = self.store.begin()
        try:
            if isinstance(step, Run):
                self._run(result, step, pending)
            elif isinstance(step, Copy):
                self._copy(result, step, pending)
            elif isinstance(step, Setup):
                self._setup(result, step, pending)
            else:
                self._mkdir(result, pending)
            layer = pending.publish(key, result.state, replace=self.opts.no_cache)
            LOG.info("step %d took %.2f s", self.count, time.monotonic() - started)
            return layer
        except BaseException:
            pending.discard()
            raise

    # -- RUN / %post -----------------------------------------------------------------

    def _environment(self, result: StageResult, step: Run) -> dict[str, str]:
        env = result.state.variables()
        env.update(step.env)
        env.setdefault("PATH", DEFAULT_PATH)
        if not self._user(result, step):
            env.setdefault("HOME", "/root")  # else the user's, from the image's passwd
        if self.recipe.kind == "def":
            env.update(APPTAINER_ENVIRONMENT=f"{INSIDE}/environment",
                       APPTAINER_LABELS=f"{INSIDE}/labels", APPTAINER_ROOTFS="/",
                       SINGULARITY_ENVIRONMENT=f"{INSIDE}/environment",
                       SINGULARITY_ROOTFS="/")
        return env

    def _user(self, result: StageResult, step: Run) -> str | None:
        """The USER a RUN step runs as: None for root, or where only root is mapped."""
        user = result.state.user
        if user.partition(":")[0] in ("", "0", "root"):
            return None
        if not self.real_owners:
            if user not in self.warned_users:
                self.warned_users.add(user)
                LOG.warning("%s: RUN steps after USER %s run as root: only root is mapped "
                            "(subordinate ids in /etc/subuid make other users real)",
                            step.where, user)
            return None
        return user

    def _run(self, result: StageResult, step: Run, pending: Pending) -> None:
        scratch = pending.scratch
        (scratch / "apt.conf").write_text(rootemu.APT_CONFIG)
        (scratch / "environment").write_text("")
        (scratch / "labels").write_text("")
        if step.script is not None:
            (scratch / "script").write_text(step.script)
            (scratch / "script").chmod(0o755)
        env = self._environment(result, step)
        env["APT_CONFIG"] = f"{INSIDE}/apt.conf"
        binds = [BindSpec(str(scratch), INSIDE), *self.opts.binds]
        for index, mount in enumerate(step.mounts):
            if mount.kind == "secret":
                binds += self._secret(mount, step, scratch / f"mount{index}", env)
            else:
                binds.append(self._run_mount(mount, step, scratch / f"mount{index}"))
        workdir = result.state.workdir or "/"
        # A PID namespace of its own: when the build dies, every process of the step dies.
        options = Options(binds=binds, contain=True, no_home=True, cleanenv=True,
                          environment=env, pwd=workdir, root_emulation=True, pid=True,
                          user=self._user(result, step))
        layers = Layers(result.lowers(self.store), str(pending.diff), str(pending.work),
                        name=self.recipe.path)
        from capsid.runtime import api

        try:
            status = api.run(layers, step.argv, options)
        except CapsidError as err:
            raise BuildError(f"{step.where}: step {self.count}/{self.total} could not start: "
                             f"{err.message}", err.hint) from None
        if status != 0:
            raise BuildError(f"{step.where}: step {self.count}/{self.total} failed with exit "
                             f"code {status}: {step.text.splitlines()[0][:80]}",
                             "the steps before it are cached; fix it and build again")
        added = _step_output(scratch, "environment", step)
        if added.strip():
            result.state.env91 += added
        for line in _step_output(scratch, "labels", step).splitlines():
            name, _, value = line.strip().partition(" ")
            if name:
                result.state.labels[name] = value.strip()

    def _secret(self, mount: Mount, step: Run, scratch: Path, env: dict[str, str]
                ) -> list[BindSpec]:
        """A secret for this step alone: a read-only file (mode 0400) and/or a variable;
        nothing where the build was not given it, unless it is required."""
        content = self.opts.secrets.get(mount.id)
        if content is None:
            if mount.required:
                raise UsageError(f"{step.where}: the step needs the secret {mount.id!r}",
                                 f"pass --secret id={mount.id},src=FILE (or env=VARIABLE)")
            return []
        if mount.env:
            env[mount.env] = content.decode(errors="surrogateescape")
        if not mount.target:
            return []
        scratch.mkdir()
        secret = scratch / "secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with open(fd, "wb") as f:
            f.write(content)
        return [BindSpec(str(secret), mount.target, readonly=True)]

    def _run_mount(self, mount: Mount, step: Run, scratch: Path) -> BindSpec:
        if mount.kind == "cache":
            return BindSpec(str(self.store.cache_mount(mount.id)), mount.target)
        if mount.kind == "tmpfs":  # an empty directory that goes with the step
            scratch.mkdir()
            return BindSpec(str(scratch), mount.target)
        if mount.from_stage:
            raise UsageError(f"{step.where}: RUN --mount=from=... is not supported",
                             "COPY --from the stage first")
        source = self.context.sources(mount.source or ".", str(step.where))[0]
        if mount.readonly:
            return BindSpec(str(source), mount.target, readonly=True)
        # rw: the step may write, but what it writes is thrown away with the step, as
        # BuildKit does; the context itself never changes
        scratch.mkdir()
        if source.is_dir():
            (scratch / "upper").mkdir()
            (scratch / "work").mkdir()
            return BindSpec(str(source), mount.target, scratch=str(scratch))
        if not source.is_file():
            raise UsageError(f"{step.where}: RUN --mount source {mount.source} is neither a "
                             "file nor a directory", "mount a file or a directory")
        import shutil

        copy = scratch / source.name
        shutil.copy2(source, copy, follow_symlinks=True)
        return BindSpec(str(copy), mount.target)

    # -- COPY / ADD / %files -----------------------------------------------------------

    def _copy_inputs(self, step: Copy) -> list[object]:
        if step.from_stage is not None:
            index = self.recipe.stage(step.from_stage)
            if index is None or index >= len(self.results):
                raise UsageError(f"{step.where}: no earlier stage called {step.from_stage!r}",
                                 "name a stage defined above (FROM ... AS NAME)")
            return [self.results[index].key, list(step.sources), step.dest,
                    str(step.chmod), str(step.follow_links)]
        if step.inline:
            return [[list(pair) for pair in step.inline], list(step.sources), step.dest,
                    str(step.chmod)]
        urls = [src for src in step.sources if _is_url(src)]
        if urls and not step.extract:
            raise UsageError(f"{step.where}: COPY takes files from the context, not URLs",
                             "use ADD for a URL")
        paths = [p for source in step.sources if not _is_url(source)
                 for p in self._sources(step, source)]
        fetched = [self._download(url, str(step.where), step.checksum) for url in urls]
        return [self.context.digest(paths), [_file_digest(p) for p in fetched],
                list(step.sources), step.dest, str(step.chmod), str(step.extract)]

    def _sources(self, step: Copy, source: str) -> list[Path]:
        """COPY's sources come from the context; %files copies host paths, as Apptainer."""
        if step.dockerish:
            return self.context.sources(source, str(step.where))
        return self.context.host_sources(source, str(step.where))

    def _download(self, url: str, where: str, checksum: str | None = None) -> Path:
        """ADD's URL, fetched once per build into the build's scratch space (and checked
        against ``--checksum``)."""
        if url not in self.downloads:
            self.downloads[url] = self._fetch(url, where)
        if checksum is not None:
            import hashlib

            algorithm, _, wanted = checksum.partition(":")
            with open(self.downloads[url], "rb") as f:
                found = hashlib.file_digest(f, algorithm).hexdigest()
            if found != wanted:
                raise UsageError(f"{where}: ADD {url}: its {algorithm} is {found}, not the "
                                 f"{wanted} of --checksum", "check the URL, or the checksum")
        return self.downloads[url]

    def _fetch(self, url: str, where: str) -> Path:
        import httpx

        from capsid.oci.registry import ssl_context

        temp = output.Temporary(self.store.tmp / "download")
        self.temporaries.append(temp)
        try:
            with httpx.stream("GET", url, follow_redirects=True, timeout=60,
                              verify=ssl_context()) as response, open(temp.path, "wb") as f:
                if response.status_code != 200:
                    raise UsageError(f"{where}: ADD {url}: the server answered "
                                     f"{response.status_code}", "check the URL")
                for chunk in response.iter_bytes(1 << 20):
                    f.write(chunk)
        except httpx.HTTPError as err:
            raise UsageError(f"{where}: ADD {url}: {err}", "check the URL and the network"
                             ) from None
        return temp.path

    def _mounted(self, stages: list[StageResult], pending: Pending,
                 fn: Callable[[list[str]], None], serve: bool = True) -> None:
        """``fn(paths)`` with *stages* mounted (the first writable, into *pending*): what
        capsid does itself in a step. A base not unpacked yet whose squashfs is at hand
        (a pull left it) is served by FUSE rather than unpacked (with *serve*); where that
        fails, or *fn* fails on the served files (an owner the namespace does not map),
        the step starts again over the base unpacked, whose files are the user's."""
        def attempt(serve_base: bool, name: str) -> None:
            where = pending.scratch / name  # the child's mount points, fresh each time
            where.mkdir()
            mounted.call_in([self._root(stage, pending if index == 0 else None, serve_base)
                             for index, stage in enumerate(stages)], str(where), fn)

        try:
            attempt(serve, "mounts")
        except mounted.Unserved:
            LOG.debug("the served base's files are out of reach; unpacking it for this step")
            pending.reset()
            attempt(False, "mounts-again")

    def _root(self, stage: StageResult, pending: Pending | None, serve: bool) -> Layers:
        upper, work = ("", "") if pending is None else (str(pending.diff), str(pending.work))
        image = self._served_base(stage.base) if serve else None
        if image is None:
            return Layers(stage.lowers(self.store), upper, work)
        return Layers(stage.step_lowers(), upper, work, base_image=image)

    def _served_base(self, base: BaseImage) -> tuple[str, int] | None:
        """The base's squashfs (SIF, offset) to serve, if it is not unpacked yet and one
        is there already."""
        if base.unpacked(self.store) is not None or not mounted.can_serve():
            return None
        found = base.existing_squashfs(self.store, self.opts.compression, self.epoch)
        return None if found is None else (str(found[0]), found[1])

    def _copy(self, result: StageResult, step: Copy, pending: Pending) -> None:
        chown = step.chown if step.chown not in ("0", "root", "0:0", "root:root") else None
        if chown and not self.real_owners:
            LOG.warning("%s: --chown=%s: files stay owned by root (only root is mapped: "
                        "subordinate ids in /etc/subuid make owners real)", step.where, chown)
            chown = None
        source_root: StageResult | None = None
        if step.from_stage is not None:
            index = self.recipe.stage(step.from_stage)
            assert index is not None
            source_root = self.results[index]
        stages = [result] if source_root is None else [result, source_root]
        workdir = result.state.workdir or "/"
        dest = step.dest if step.dest.startswith("/") else os.path.join(workdir, step.dest)
        if step.dockerish and step.dest.endswith("/"):
            dest += "/"
        host_sources: list[tuple[str, str]] = []  # (path on the host, name in the image)
        inline = dict(step.inline)
        for source in step.sources if source_root is None else ():
            if source in inline:  # a heredoc: its body, written out for the copy
                path = pending.scratch / f"heredoc-{len(host_sources)}"
                path.write_text(inline[source])
                path.chmod(0o644)
                host_sources.append((str(path), source))
            elif _is_url(source):
                name = os.path.basename(source.split("?")[0].rstrip("/")) or "index.html"
                host_sources.append((str(self._download(source, str(step.where))), name))
            else:
                host_sources += [(str(p), p.name) for p in self._sources(step, source)]
        downloaded = set(map(str, self.downloads.values()))
        context_root = str(self.context.root)

        store_root = str(self.store.root)

        def skip(path: str) -> bool:  # .dockerignore, for what comes from the context
            return path.startswith(context_root + "/") and not path.startswith(store_root) \
                and self.context.ignored(path[len(context_root) + 1:])

        def copy(paths: list[str]) -> None:
            owner = _owner(paths[0], chown, str(step.where)) if chown else None
            target = Destination(paths[0], self.epoch, skip if source_root is None else None,
                                 owner)
            try:
                sources = host_sources if len(paths) == 1 else [
                    (_inside(paths[1], s, str(step.where)), os.path.basename(s.rstrip("/")))
                    for s in step.sources]
                into_dir = dest.endswith("/") or len(sources) > 1 or target.is_dir(dest)
                for source, name in sources:
                    if source in downloaded:  # a URL's file: mode 600 as Docker, no unpacking
                        path = os.path.join(dest, name) if into_dir else dest
                        target.copy(source, path, chmod=step.chmod or 0o600)
                    elif step.extract and os.path.isfile(source) and _is_archive(source):
                        target.extract(source, dest)
                    elif os.path.isdir(source) and step.dockerish:
                        target.copy_contents(source, dest, chmod=step.chmod)
                    elif into_dir:
                        target.copy(source, os.path.join(dest, name), chmod=step.chmod,
                                    follow_top=step.follow_links)
                    else:
                        target.copy(source, dest, chmod=step.chmod,
                                    follow_top=step.follow_links)
            finally:
                target.close()

        self._mounted(stages, pending, copy)

    def _mkdir(self, result: StageResult, pending: Pending) -> None:
        workdir = result.state.workdir or "/"

        def mkdir(paths: list[str]) -> None:
            target = Destination(paths[0], self.epoch)
            try:
                os.close(target.directory(workdir))
            finally:
                target.close()

        self._mounted([result], pending, mkdir)

    def _metadata_dirs(self, result: StageResult) -> None:
        """/.singularity.d in the root before %post runs, as Apptainer's bootstrap makes it
        (hpccm's recipes source env/10-docker*.sh there)."""
        key = digest(result.key, "singularity.d")
        layer = None if self.opts.no_cache else self.store.get(key)
        if layer is None:
            pending = self.store.begin()
            try:
                self._write_metadata(result, pending)
                layer = pending.publish(key, result.state, replace=self.opts.no_cache)
            except BaseException:
                pending.discard()
                raise
        result.layers.append(layer)
        result.key = key

    def _write_metadata(self, result: StageResult, pending: Pending) -> None:
        import io

        from capsid.image import meta

        env = result.state.env
        tree = meta.skeleton()
        tree[f"{meta.ENV}/10-docker2singularity.sh"] = (0o755,
                                                        meta.docker_env_script(env).encode())
        epoch = self.epoch

        def write(paths: list[str]) -> None:
            target = Destination(paths[0], epoch)
            try:
                for rel, (mode, content) in sorted(tree.items()):
                    parent, name = os.path.split("/" + rel)
                    if content is None:
                        os.close(target.directory("/" + rel, mode))
                        continue
                    parent_fd = target.directory(parent)
                    try:
                        if os.path.lexists(f"/proc/self/fd/{parent_fd}/{name}"):
                            continue  # the image's own wins
                        if isinstance(content, str):
                            os.symlink(content, name, dir_fd=parent_fd)
                        else:
                            target.write(io.BytesIO(content), parent_fd, name, mode)
                    finally:
                        os.close(parent_fd)
            finally:
                target.close()

        self._mounted([result], pending, write)

    # -- %setup ------------------------------------------------------------------------

    def _setup(self, result: StageResult, step: Setup, pending: Pending) -> None:
        script = pending.scratch / "setup.sh"
        script.write_text(step.script)
        where = str(step.where)

        def setup(paths: list[str]) -> None:
            import subprocess

            env = dict(os.environ, APPTAINER_ROOTFS=paths[0], SINGULARITY_ROOTFS=paths[0])
            status = subprocess.run(["/bin/sh", "-ex", str(script)], env=env,
                                    check=False).returncode
            if status != 0:
                raise BuildError(f"{where}: %setup failed with exit code {status}",
                                 "fix the script and build again")

        # not served: a script's failure on the base's files could not be told apart
        self._mounted([result], pending, setup, serve=False)


def _step_output(scratch: Path, name: str, step: Run) -> str:
    """What a step wrote to ``$APPTAINER_ENVIRONMENT`` or ``$APPTAINER_LABELS``.

    The step could write its scratch directory, so the file is read as untrusted: inside
    that directory only (a link to a host file leads nowhere), a regular file only (a
    FIFO cannot hang the build), at most 1 MiB.
    """
    from capsid import hostfs

    try:
        data = hostfs.read_in(str(scratch), name, what=f"${{APPTAINER_{name.upper()}}}")
    except hostfs.Refused as err:
        raise BuildError(f"{step.where}: the step left {err.message}",
                         f"write plain text to {INSIDE}/{name}") from None
    return (data or b"").decode(errors="replace")


def _inside(root: str, path: str, where: str) -> str:
    """Host path of *path* inside the mounted stage *root*, its links resolved in there."""
    from capsid import inroot

    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        with inroot.walk(fd, path) as found:
            if found.missing:
                raise UsageError(f"{where}: {path} does not exist in that stage",
                                 "check the path")
            return root + found.inside
    finally:
        os.close(fd)


def _owner(root: str, spec: str, where: str) -> tuple[int, int]:
    """COPY --chown's USER[:GROUP] as ids, names looked up in the stage's own files.

    A user without a group gets the group of the same number, as Docker does.
    """
    user, _, group = spec.partition(":")

    def lookup(name: str, table: str) -> int:
        from capsid import hostfs

        if name.isdigit():
            return int(name)
        try:
            data = hostfs.read_in(root, table, 16 << 20) or b""
        except (hostfs.Refused, OSError):
            data = b""
        for line in data.decode(errors="replace").splitlines():
            fields = line.split(":")
            if len(fields) > 2 and fields[0] == name and fields[2].isdigit():
                return int(fields[2])
        raise UsageError(f"{where}: --chown={spec}: no {name!r} in the image's {table}",
                         "use numeric ids or create the user in an earlier step")

    uid = lookup(user, "/etc/passwd")
    return uid, lookup(group, "/etc/group") if group else uid


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _is_archive(path: str) -> bool:
    import tarfile

    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _created(base: BaseImage, stage: Stage) -> int:
    """``--reproducible``: when *base* was made, in Unix seconds (its config's ``created``)."""
    import datetime
    import re

    text = str(base.config.get("created") or "")
    try:  # RFC 3339, maybe with nanoseconds, which fromisoformat does not take
        when = datetime.datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", text))
    except ValueError:
        raise BuildError(f"{stage.where}: --reproducible dates the image by its base's "
                         f"creation, and {stage.base.ref or stage.base.kind} records none",
                         "set SOURCE_DATE_EPOCH instead (e.g. to the time of your last "
                         "commit: git log -1 --format=%ct)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0, int(when.timestamp()))


def _epoch() -> int | None:
    from capsid.image.write import source_date_epoch

    return source_date_epoch()


def run_stages(recipe: Recipe, opts: BuildOptions) -> tuple[StageResult, Builder]:
    """Run *recipe*'s steps; the final stage's result (for :mod:`capsid.build.assemble`).
    Callers build with :func:`capsid.build.build`, which sets the namespace up first."""
    start = time.monotonic()
    builder = Builder(recipe, opts)
    try:
        result = builder.run()
    finally:
        builder.close()
    if not opts.quiet:
        print(f"built: {len(recipe.stages)} stages, {builder.count} steps, {builder.rerun} "
              f"run, {builder.count - builder.rerun} cached or without files, in "
              f"{time.monotonic() - start:.1f} s", file=sys.stderr)
    return result, builder



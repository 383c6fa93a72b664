"""Recipe → runnable single file, side by side: capsid build against buildah and ch-image.

The base image (~200 MB Debian bookworm + python3, scripts/oci-images.sh) is served by
a local docker-registry with TLS and htpasswd; every builder pulls it once before the
timed runs, so "base image in the cache" holds for all of them.

  A  FROM + COPY fib.py               (the Dartmouth seed's recipe)
  B  RUN apt-get install cowsay, ENV, ENTRYPOINT
  C  two stages: gcc builds a program, COPY --from puts it in a clean image
  R  one RUN creating 10,000 small files (the cost of a step's process and file system)

  capsid        capsid build OUT.sif Dockerfile                 (the SIF is the single file)
  buildah       buildah bud (as root, overlay storage): the build alone, no single file
  ch-image      ch-image build --force, then ch-convert -o squash

Prints each median, the peak RSS and the ratios; then capsid's unchanged rebuild, and for
A the first build after ``capsid pull`` of the base and the rebuild after an edit.
Run as root: .venv/bin/python bench/build.py [--runs N] [--recipes ABCR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.registry import PASSWORD, USER, Registry, make_pki  # noqa: E402

from bench.oci_pull import IMAGES, measure, pipeline, require, timed  # noqa: E402

CAPSID = Path(sys.executable).parent / "capsid"
BASE = "bench/debian-python3:12"

RECIPES = {
    "A": """
        FROM {base}
        COPY fib.py src/
        """,
    "B": """
        FROM {base}
        RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \\
            --no-install-recommends cowsay >/dev/null && rm -rf /var/lib/apt/lists/*
        ENV PATH=/usr/games:$PATH
        ENTRYPOINT ["cowsay"]
        """,
    "C": """
        FROM {base} AS build
        RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \\
            --no-install-recommends gcc libc6-dev >/dev/null
        COPY hello.c /src/
        RUN gcc -O2 -o /src/hello /src/hello.c
        FROM {base}
        COPY --from=build /src/hello /usr/local/bin/hello
        CMD ["hello"]
        """,
    "R": """
        FROM {base}
        RUN python3 -c "import os; os.mkdir('/f'); \
            [open(f'/f/{{i}}', 'w').write('x') for i in range(10000)]"
        """,
}


class Bench:
    def __init__(self, registry: Registry, work: Path) -> None:
        self.registry, self.work = registry, work
        self.base = f"{registry.host}/{BASE}"
        ca = str(registry.pki / "ca.crt")
        self.env = {**os.environ, "SSL_CERT_FILE": ca, "REQUESTS_CA_BUNDLE": ca,
                    "CAPSID_DOCKER_USERNAME": USER, "CAPSID_DOCKER_PASSWORD": PASSWORD,
                    "CH_IMAGE_USERNAME": USER, "CH_IMAGE_PASSWORD": PASSWORD,
                    "CAPSID_CACHEDIR": str(work / "capsid-cache"),
                    "CH_IMAGE_STORAGE": str(work / "ch-storage"), "TMPDIR": str(work),
                    "USER": os.environ.get("USER", "root"),
                    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
                    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost",
                    "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}

    def context(self, name: str) -> Path:
        d = self.work / f"ctx-{name}"
        if not d.is_dir():
            d.mkdir()
            (d / "Dockerfile").write_text(
                textwrap.dedent(RECIPES[name]).lstrip().format(base=self.base))
            (d / "fib.py").write_text("import sys\nf = lambda n: n if n < 2 else "
                                      "f(n - 1) + f(n - 2)\nprint(f(int(sys.argv[1])))\n")
            (d / "hello.c").write_text('#include <stdio.h>\nint main(void) '
                                       '{ puts("hello"); return 0; }\n')
        return d

    def capsid(self, name: str, fresh: bool = True) -> tuple[float, int]:
        d = self.context(name)
        extra = ["--no-cache"] if fresh else []
        return timed([str(CAPSID), "-q", "build", "--force", *extra, str(d / "out.sif"),
                      str(d / "Dockerfile")], self.env)

    def after_pull(self, run: int) -> tuple[float, int]:
        """Recipe A with a new cache that holds only what ``capsid pull`` of the base
        left: the first build after a pull."""
        d = self.context("A")
        env = {**self.env, "CAPSID_CACHEDIR": str(self.work / f"pulled-{run}")}
        timed([str(CAPSID), "-q", "pull", str(self.work / f"pulled-{run}.sif"),
               f"docker://{self.base}"], env)
        return timed([str(CAPSID), "-q", "build", "--force", str(d / "out.sif"),
                      str(d / "Dockerfile")], env)

    def after_edit(self, run: int) -> tuple[float, int]:
        """Recipe A again after an edit of the file it copies (the steps before it, the
        base and its squashfs cached): the edit-and-rebuild loop."""
        d = self.context("A")
        with open(d / "fib.py", "a") as f:
            f.write(f"# edit {run}\n")
        return self.capsid("A", fresh=False)

    def buildah(self, name: str) -> tuple[float, int]:
        d = self.context(name)
        return timed(["buildah", "bud", "--quiet", "--layers=false", "--no-cache",
                      "--cert-dir", str(self.registry.cert_dir()), "--creds",
                      f"{USER}:{PASSWORD}", "-t", f"bench-{name.lower()}", str(d)], self.env)

    def charliecloud(self, name: str) -> tuple[float, int]:
        d = self.context(name)
        tag = f"bench-{name.lower()}"
        return pipeline([["ch-image", "--auth", "build", "--force", "--no-cache", "-t", tag,
                          str(d)],
                         ["ch-convert", "-i", "ch-image", "-o", "squash", tag,
                          str(d / "out.sqfs")]], self.env)

    def warm(self) -> None:
        """Every builder pulls the base once, before anything is timed."""
        for name in RECIPES:
            self.context(name)
        self.capsid("A")
        timed(["buildah", "pull", "--quiet", "--cert-dir", str(self.registry.cert_dir()),
               "--creds", f"{USER}:{PASSWORD}", self.base], self.env)
        timed(["ch-image", "--auth", "pull", self.base], self.env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each capsid build")
    parser.add_argument("--peer-runs", type=int, default=1, help="runs of each peer's")
    parser.add_argument("--recipes", default="ABCR")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (buildah's storage); capsid itself needs no root")
    require("buildah", "ch-image", "ch-convert", "docker-registry", "skopeo")
    with tempfile.TemporaryDirectory(prefix="capsid-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        make_pki(work / "pki")
        registry = Registry(work / "registry", work / "pki")
        rows = []
        try:
            registry.skopeo_copy(f"oci-archive:{IMAGES}/debian-python3.oci.tar", BASE)
            bench = Bench(registry, work)
            bench.warm()
            for name in args.recipes:
                print(f"recipe {name} ({os.cpu_count()} cores):", flush=True)
                ours, rss = measure("capsid → SIF", lambda n=name: bench.capsid(n), args.runs)
                cached, _ = measure("capsid cached", lambda n=name: bench.capsid(n, False),
                                    args.runs)
                bah, _ = measure("buildah build", lambda n=name: bench.buildah(n),
                                       args.peer_runs)
                ch, _ = measure("ch-image → sqfs", lambda n=name: bench.charliecloud(n),
                                     args.peer_runs)
                rows.append((name, ours, cached, rss, bah, ch))
            if "A" in args.recipes:
                runs = iter(range(1000))
                pulled, _ = measure("A after a pull", lambda: bench.after_pull(next(runs)),
                                    args.runs)
                edited, _ = measure("A after an edit", lambda: bench.after_edit(next(runs)),
                                    args.runs)
        finally:
            registry.stop()
    print("\nrecipe  capsid→SIF  cached  peak MiB  buildah build  ch-image→sqfs  "
          "capsid-buildah  ch-image/capsid")
    for name, ours, cached, rss, bah, ch in rows:
        print(f"  {name}     {ours:7.2f} s {cached:6.2f} s  {rss / 1024:7.0f}   {bah:9.2f} s"
              f"   {ch:9.2f} s   {ours - bah:+10.2f} s   {ch / ours:9.1f}x")
    if "A" in args.recipes:
        print(f"\nA, the seed's recipe: first build after 'capsid pull' of its base "
              f"{pulled:.2f} s (target 1.5 s); rebuild after editing fib.py {edited:.2f} s "
              "(target 1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

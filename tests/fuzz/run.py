"""Run one fuzz target under atheris (coverage-guided, libFuzzer) for a while.

    python -m tests.fuzz.run TARGET SECONDS WORKDIR

Starts from the regression corpus, writes any crashing input to WORKDIR; libFuzzer's
final statistics say how many inputs it ran. scripts/fuzz.sh runs every target this way.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    import atheris

    name, seconds, work = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    with atheris.instrument_imports(include=["capsid"]):
        import importlib
        import pkgutil

        import capsid

        for module in pkgutil.walk_packages(capsid.__path__, "capsid."):
            if not module.name.endswith("__main__"):  # the targets import lazily: instrument now
                importlib.import_module(module.name)
    from tests.fuzz import targets
    corpus = work / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(targets.starting_points(name)):
        (corpus / f"seed-{index}").write_bytes(seed)

    def one_input(data: bytes) -> None:
        targets.check(name, data)

    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", "-rss_limit_mb=1024",
                   "-timeout=20", f"-artifact_prefix={work}/{name}-", "-print_final_stats=1",
                   str(corpus)], one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())

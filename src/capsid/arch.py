"""Machine names: what ``uname -m`` says, in the OCI and Go names that images use."""

from __future__ import annotations

import os

#: uname machine → (OCI/Go architecture, its default variant)
MACHINES = {"x86_64": ("amd64", ""), "aarch64": ("arm64", "v8"), "armv7l": ("arm", "v7"),
            "armv6l": ("arm", "v6"), "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""),
            "riscv64": ("riscv64", ""), "i686": ("386", ""), "i386": ("386", ""),
            "loongarch64": ("loong64", "")}


def host() -> tuple[str, str] | None:
    """(architecture, variant) of this machine, or None if it is not one images know."""
    return MACHINES.get(os.uname().machine)

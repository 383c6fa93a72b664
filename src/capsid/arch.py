"""Machine facts, in one table keyed by what ``uname -m`` says.

Each machine's OCI/Go architecture and default variant (what images and SIF headers
name), its ELF ``e_machine``, its Debian multiarch triplet (where its C library lies),
its SIF architecture code and its ``pivot_root`` syscall number.
"""

from __future__ import annotations

import os


class Machine:
    """What capsid needs to know of one machine kind."""

    __slots__ = ("elf", "oci", "pivot_root", "sif_code", "triplet", "uname", "variant")

    def __init__(self, uname: str, oci: str, variant: str, elf: int, triplet: str,
                 sif_code: str, pivot_root: int) -> None:
        self.uname, self.oci, self.variant, self.elf = uname, oci, variant, elf
        self.triplet, self.sif_code, self.pivot_root = triplet, sif_code, pivot_root


#: uname machine → its facts (ELF machines 40, 21 and 8 stand for several names: the
#: first row of each is the one an ELF machine number gives)
TABLE = {m.uname: m for m in (
    Machine("x86_64", "amd64", "", 62, "x86_64-linux-gnu", "02", 155),
    Machine("aarch64", "arm64", "v8", 183, "aarch64-linux-gnu", "04", 41),
    Machine("armv7l", "arm", "v7", 40, "arm-linux-gnueabihf", "03", 218),
    Machine("armv6l", "arm", "v6", 40, "arm-linux-gnueabi", "03", 218),
    Machine("ppc64le", "ppc64le", "", 21, "powerpc64le-linux-gnu", "06", 203),
    Machine("ppc64", "ppc64", "", 21, "powerpc64-linux-gnu", "05", 203),
    Machine("s390x", "s390x", "", 22, "s390x-linux-gnu", "11", 217),
    Machine("riscv64", "riscv64", "", 243, "riscv64-linux-gnu", "12", 41),
    Machine("i686", "386", "", 3, "i386-linux-gnu", "01", 217),
    Machine("i386", "386", "", 3, "i386-linux-gnu", "01", 217),
    Machine("loongarch64", "loong64", "", 258, "loongarch64-linux-gnu", "13", 41),
    Machine("mips", "mips", "", 8, "mips-linux-gnu", "07", 4216),
    Machine("mips64", "mips64", "", 8, "mips64el-linux-gnuabi64", "09", 5151),
)}
#: Go architecture → its first machine
BY_OCI: dict[str, Machine] = {}
#: ELF e_machine → its first machine
BY_ELF: dict[int, Machine] = {}
for _m in TABLE.values():
    BY_OCI.setdefault(_m.oci, _m)
    BY_ELF.setdefault(_m.elf, _m)
#: SIF architecture codes of the SIF format ↔ Go architecture names
SIF_CODES = {"00": "unknown", **{m.sif_code: m.oci for m in TABLE.values()},
             "08": "mipsle", "10": "mips64le"}


def this() -> Machine | None:
    """This machine's facts, or None if it is not one images know."""
    return TABLE.get(os.uname().machine)


def host() -> tuple[str, str] | None:
    """(architecture, variant) of this machine, or None if it is not one images know."""
    found = this()
    return (found.oci, found.variant) if found else None


def triplet(elf_machine: int) -> str:
    """The Debian multiarch triplet of ELF machine *elf_machine* ("" if unknown)."""
    found = BY_ELF.get(elf_machine)
    return found.triplet if found else ""

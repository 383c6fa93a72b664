"""The pieces of GPU support that need no container: ELF reading, CDI names and specs,
nvidia-container-cli's flags, the CUDA driver table, ld.so cache listings."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from capsid import config, elf, glibc, ldcache
from capsid.errors import CapsidError, UsageError
from capsid.gpu import cdi, compat, nvccli


def test_elf_reads_the_c_library_and_a_program() -> None:
    libc = next(Path(p) for p in glibc.libc_candidates(elf.this_machine()[1])
                if Path(p).is_file())
    info = elf.read(str(libc))
    assert info.soname == "libc.so.6"
    version = glibc.glibc_of(info)
    said = subprocess.run(["ldd", "--version"], capture_output=True, text=True).stdout
    assert version is not None and f" {elf.dotted(version)}\n" in said.splitlines()[0] + "\n"
    ls = elf.read("/bin/ls")
    assert "libc.so.6" in ls.needed
    newest = ls.newest_glibc()
    assert newest is not None and newest <= version
    assert (ls.elf_class, ls.machine) == elf.this_machine()


def test_elf_refuses_what_is_not_elf(tmp_path: Path) -> None:
    for content in (b"", b"#!/bin/sh\n", b"\x7fELF\x02\x01" + b"\xff" * 10):
        path = tmp_path / "f"
        path.write_bytes(content)
        with pytest.raises(elf.NotELF):
            elf.read(str(path))
    assert elf.header(str(tmp_path / "missing")) is None
    assert elf.glibc_version("GLIBC_2.34") == (2, 34)
    assert elf.glibc_version("GLIBC_PRIVATE") is None


@pytest.mark.parametrize(("text", "expected"), [
    ("nvidia.com/gpu=0", ("nvidia.com/gpu", "0")),
    ("nvidia.com/gpu=all", ("nvidia.com/gpu", "all")),
    ("vendor.example/class_x=GPU-1:mig-2", ("vendor.example/class_x", "GPU-1:mig-2")),
])
def test_cdi_names(text: str, expected: tuple[str, str]) -> None:
    assert cdi.parse_name(text) == expected


@pytest.mark.parametrize("text", ["nvidia.com/gpu", "gpu=0", "Nvidia.com/gpu=0",
                                  "nvidia.com/gpu=", "nvidia.com/gpu=a b"])
def test_cdi_bad_names(text: str) -> None:
    with pytest.raises(UsageError):
        cdi.parse_name(text)


def test_cdi_later_directories_win_and_other_vendors_errors_are_ignored(tmp_path: Path) -> None:
    first, second = tmp_path / "etc", tmp_path / "run"
    for directory, value in ((first, "etc"), (second, "run")):
        directory.mkdir()
        (directory / "v.json").write_text(json.dumps({
            "cdiVersion": "0.5.0", "kind": "capsid.test/dev",
            "devices": [{"name": "a", "containerEdits": {"env": [f"FROM={value}"]}}]}))
    (first / "broken.yaml").write_text("kind: other.vendor/x\ndevices: [\n")
    assert cdi.edits(["capsid.test/dev=a"], [str(first), str(second)]).env == {"FROM": "run"}
    (first / "mine.yaml").write_text("kind: capsid.test/dev\ndevices: [\n")
    with pytest.raises(CapsidError, match=r"mine\.yaml is not valid YAML"):
        cdi.edits(["capsid.test/dev=a"], [str(first), str(second)])


def test_nvccli_flags() -> None:
    assert nvccli.flags({}, "/sbin/ldconfig") == [
        "--no-cgroups", "--compute", "--utility", "--ldconfig=@/sbin/ldconfig"]
    flags = nvccli.flags({"NVIDIA_VISIBLE_DEVICES": "0,1", "NVIDIA_DRIVER_CAPABILITIES": "all",
                          "NVIDIA_REQUIRE_CUDA": "cuda>=12", "NVIDIA_REQUIRE_ARCH": "arch=90",
                          "NVIDIA_MIG_MONITOR_DEVICES": "all"}, "/x")
    assert flags[:3] == ["--no-cgroups", "--device=0,1", "--mig-monitor=all"]
    assert [f for f in flags if f.startswith("--require")] == ["--require=arch=90",
                                                                "--require=cuda>=12"]
    assert {"--compute", "--graphics", "--display", "--compat32"} <= set(flags)
    assert "--require=cuda>=12" not in nvccli.flags(
        {"NVIDIA_REQUIRE_CUDA": "cuda>=12", "NVIDIA_DISABLE_REQUIRE": "1"}, "/x")
    with pytest.raises(CapsidError, match="'warp'"):
        nvccli.flags({"NVIDIA_DRIVER_CAPABILITIES": "compute,warp"}, "/x")


@pytest.mark.parametrize(("cuda", "driver", "verdict"), [
    ((12, 2), (535, 104, 5), "full"),
    ((12, 4), (535, 104, 5), "minor"),  # CUDA 12's minor version compatibility
    ((12, 0), (470, 82), "none"),
    ((11, 8), (470, 82), "minor"),
    ((11, 0, 3), (450, 36, 6), "full"),
    ((99, 0), (999, 0), "unknown"),
])
def test_cuda_driver_support(cuda: tuple[int, ...], driver: tuple[int, ...],
                             verdict: str) -> None:
    assert compat.cuda_support(cuda, driver)[0] == verdict


def test_ldcache_listing_is_filtered_by_machine(tmp_path: Path) -> None:
    lib32 = tmp_path / "libfake.so.1"
    lib32.write_bytes(b"\x7fELF\x01\x01\x01" + b"\0" * 11 + b"\x03\x00")
    listing = (f"2 libs found in cache `/etc/ld.so.cache'\n"
               f"\tlibfake.so.1 (libc6) => {lib32}\n"
               f"\tlibc.so.6 (libc6,x86-64, OS ABI: Linux 3.2.0) => /bin/ls\n"
               f"\tlibc.so.6 (libc6,x86-64) => /lib/elsewhere/libc.so.6\n")
    (tmp_path / "listing").write_text(listing)
    fake = tmp_path / "ldconfig"
    fake.write_text(f"#!/bin/sh\ncat {tmp_path / 'listing'}\n")
    fake.chmod(0o755)
    site = config.SiteConfig(values={"ldconfig path": str(fake)})
    assert ldcache.entries(site)[1] == ("libc.so.6", "/bin/ls")
    # the first of a name wins; a library of another machine is left out
    assert ldcache.find_libraries(["libfake.so", "libc.so"], site) == {"libc.so.6": "/bin/ls"}
    broken = config.SiteConfig(values={"ldconfig path": "/bin/false"})
    with pytest.raises(CapsidError, match="ldconfig path"):
        ldcache.entries(broken)


@pytest.mark.parametrize(("name", "pattern", "matched"), [
    ("x86_64-linux-gnu.conf", "*.conf", True), ("libc.conf", "lib*.conf", True),
    ("a.conf.bak", "*.conf", False), ("conf", "*.conf", False), ("fakeroot.conf", "*", True),
    ("a.conf", "a.conf", True), ("b.conf", "a.conf", False), ("abc.conf", "a*c*.conf", True),
])
def test_ld_so_conf_include_patterns(name: str, pattern: str, matched: bool) -> None:
    assert glibc._matches(name, pattern) is matched

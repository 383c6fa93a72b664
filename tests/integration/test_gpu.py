"""--nv, --rocm, --nvccli and CDI --device, on the fake driver of scripts/fake-gpu.sh.

The fake driver's libraries are real shared libraries named like NVIDIA's; a program
in the Debian image loads ``libcuda.so.1`` with ctypes and calls it. One library
needs GLIBC_2.99, newer than the image's 2.36: the glibc trap, reported before it
bites. The device nodes are real character devices with no driver behind them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_capsid

pytestmark = pytest.mark.unprivileged

CACHE = Path(os.environ.get("CAPSID_TEST_CACHE", "/var/cache/capsid-test"))
FAKE = CACHE / "fakegpu"
CUDA_PROBE = """
import ctypes
lib = ctypes.CDLL("libcuda.so.1")
assert lib.cuInit(0) == 0
count, device = ctypes.c_int(), ctypes.c_int()
assert lib.cuDeviceGetCount(ctypes.byref(count)) == 0
assert lib.cuDeviceGet(ctypes.byref(device), 0) == 0
name = ctypes.create_string_buffer(256)
assert lib.cuDeviceGetName(name, 256, device) == 0
print(f"{count.value} device(s): {name.value.decode()}")
"""


@pytest.fixture(scope="module")
def fake() -> Path:
    if not (FAKE / "capsid.conf").is_file():
        pytest.skip(f"{FAKE} is absent: run scripts/fake-gpu.sh {FAKE} as root (test.sh does)")
    return FAKE


@pytest.fixture
def gpu_env(fake: Path) -> dict[str, str]:
    """The fake driver's ld.so cache (through capsid.conf) and its programs on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CUDA_", "NVIDIA_", "ROCR_", "APPTAINER_", "CAPSID_"))}
    env.update(CAPSID_CONFIG=str(fake / "capsid.conf"),
               PATH=f"{fake / 'bin'}:/usr/local/bin:/usr/bin:/bin")
    return env


def _devices_made() -> None:
    if not Path("/dev/nvidia0").exists():
        pytest.skip("/dev/nvidia0 is absent: scripts/fake-gpu.sh makes it as root")


def test_nv_binds_the_driver_where_apptainer_does(debian_sif: Path, gpu_env: dict[str, str],
                                                  tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(CUDA_PROBE)
    script = ("ls /.singularity.d/libs; echo LD=$LD_LIBRARY_PATH; "
              "echo SELECTED=$CUDA_VISIBLE_DEVICES; command -v nvidia-smi; nvidia-smi -L; "
              f"python3 {probe}; "
              "python3 -c 'import ctypes; ctypes.CDLL(\"libGLdispatch.so.0\")' 2>&1 | tail -1; "
              "head -c 5 /.singularity.d/libs/libcuda.so.1 | od -An -tx1")
    result = run_capsid("exec", "--nv", "--cleanenv", debian_sif, "sh", "-c", script,
                        env={**gpu_env, "CUDA_VISIBLE_DEVICES": "0"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[:4] == ["libGLdispatch.so.0", "libcuda.so", "libcuda.so.1", "libnvidia-ml.so.1"]
    library_path = next(line for line in out if line.startswith("LD="))[3:].split(":")
    # the image's own directories first, the driver's last (Apptainer 1.5's order)
    assert library_path[-1] == "/.singularity.d/libs"
    assert "/usr/lib/x86_64-linux-gnu" in library_path[:-1]
    assert "SELECTED=0" in out  # GPU selection passes in, even with --cleanenv
    assert "/usr/bin/nvidia-smi" in out
    assert "GPU 0: Capsid Fake GPU (UUID: GPU-00000000-0000-0000-0000-000000000000)" in out
    assert "1 device(s): Capsid Fake GPU" in out
    # the 64-bit library, not the 32-bit one of the same name listed after it
    assert out[-1].split() == ["7f", "45", "4c", "46", "02"]
    # The trap: the warning named the library that cannot load, and it indeed does not.
    assert "version `GLIBC_2.99' not found" in out[-2]
    warnings = [line for line in result.stderr.splitlines() if "glibc" in line]
    assert len(warnings) == 1, result.stderr
    assert "libGLdispatch.so.0 (needs GLIBC_2.99)" in warnings[0]
    assert "image's 2.36" in warnings[0] and "the other 3 are bound" in warnings[0]


def test_nv_devices_with_contain(debian_sif: Path, gpu_env: dict[str, str]) -> None:
    _devices_made()
    script = ("for d in /dev/nvidia0 /dev/nvidiactl; do "
              "[ -c $d ] && echo char $d $(stat -c %t:%T $d); done; ls /dev | wc -l")
    result = run_capsid("exec", "--nv", "--contain", debian_sif, "sh", "-c", script,
                        env=gpu_env)
    assert result.returncode == 0, result.stderr
    assert "char /dev/nvidia0 c3:0" in result.stdout  # major 195, minor 0
    assert "char /dev/nvidiactl c3:ff" in result.stdout
    without = run_capsid("exec", "--contain", debian_sif, "ls", "/dev", env=gpu_env)
    assert "nvidia0" not in without.stdout.split()


def test_nv_from_variable_and_site_default(debian_sif: Path, gpu_env: dict[str, str],
                                           fake: Path, tmp_path: Path) -> None:
    listing = ["exec", debian_sif, "ls", "/.singularity.d/libs"]
    plain = run_capsid(*listing, env=gpu_env)
    assert "libcuda.so.1" not in plain.stdout
    for name in ("APPTAINER_NV", "CAPSID_NV", "SINGULARITY_NV"):
        assert "libcuda.so.1" in run_capsid(*listing, env={**gpu_env, name: "1"}).stdout
    site = tmp_path / "capsid.conf"
    site.write_text(f"ldconfig path = {fake / 'bin' / 'ldconfig'}\nalways use nv = yes\n")
    result = run_capsid(*listing, env={**gpu_env, "CAPSID_CONFIG": str(site)})
    assert "libcuda.so.1" in result.stdout, result.stderr
    # the site's own list replaces capsid's: here only NVML
    (tmp_path / "nvliblist.conf").write_text("# site list\nlibnvidia-ml.so\nnvidia-smi\n")
    result = run_capsid(*listing, env={**gpu_env, "CAPSID_CONFIG": str(site)})
    assert result.stdout.split() == ["libnvidia-ml.so.1"], result.stderr


def test_nv_without_a_driver_warns_once_and_runs(debian_sif: Path, gpu_env: dict[str, str],
                                                 tmp_path: Path) -> None:
    ldconfig = tmp_path / "ldconfig"
    ldconfig.write_text("#!/bin/sh\necho '0 libs found in cache'\n")
    ldconfig.chmod(0o755)
    site = tmp_path / "capsid.conf"
    site.write_text(f"ldconfig path = {ldconfig}\n")
    result = run_capsid("exec", "--nv", debian_sif, "echo", "ran",
                        env={**gpu_env, "CAPSID_CONFIG": str(site)})
    assert result.returncode == 0 and result.stdout == "ran\n"
    assert len(result.stderr.splitlines()) == 1
    assert "no NVIDIA driver on this host" in result.stderr


def test_nv_on_an_image_without_glibc(busybox_sif: Path, gpu_env: dict[str, str]) -> None:
    result = run_capsid("exec", "--nv", busybox_sif, "ls", "/.singularity.d/libs", env=gpu_env)
    assert result.returncode == 0, result.stderr
    assert "libcuda.so.1" in result.stdout.split()
    assert "the image has no glibc" in result.stderr


def test_rocm(debian_sif: Path, gpu_env: dict[str, str]) -> None:
    if not Path("/dev/kfd").exists():
        pytest.skip("/dev/kfd is absent: scripts/fake-gpu.sh makes it as root")
    script = "ls /dev/kfd /dev/dri /.singularity.d/libs; rocm-smi -L; echo R=$ROCR_VISIBLE_DEVICES"
    result = run_capsid("exec", "--rocm", "--contain", debian_sif, "sh", "-c", script,
                        env={**gpu_env, "ROCR_VISIBLE_DEVICES": "1"})
    assert result.returncode == 0, result.stderr
    out = result.stdout.split()
    for expected in ("/dev/kfd", "renderD128", "libdrm_amdgpu.so.1", "R=1"):
        assert expected in out
    assert "libcuda.so.1" not in out


def _spec(fake: Path, version: str = "0.6.0") -> dict[str, object]:
    return {
        "cdiVersion": version, "kind": "capsid.test/gpu",
        "containerEdits": {
            "env": ["FAKE_DRIVER=535.104.05"],
            "mounts": [{"hostPath": str(fake / "lib" / "libcuda.so.535.104.05"),
                        "containerPath": "/opt/fakedriver/libcuda.so.1",
                        "options": ["ro", "nosuid", "nodev", "bind"]}],
            "hooks": [
                {"hookName": "createContainer", "path": "/usr/bin/nvidia-ctk",
                 "args": ["nvidia-ctk", "hook", "update-ldcache", "--folder",
                          "/opt/fakedriver"]},
                {"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook",
                 "args": ["nvidia-cdi-hook", "create-symlinks", "--link",
                          "libcuda.so.1::/usr/lib/x86_64-linux-gnu/libcuda.so"]},
                {"hookName": "createContainer", "path": "/usr/bin/vendor-hook",
                 "args": ["vendor-hook", "--frobnicate"]},
            ]},
        "devices": [
            {"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0"}],
                                             "env": ["GPU_ID=0"]}},
            {"name": "1", "containerEdits": {"deviceNodes": [{"path": "/dev/fakegpu1",
                                                              "hostPath": "/dev/nvidiactl"}],
                                             "env": ["GPU_ID=1"]}},
        ],
    }


def _yaml(doc: object) -> str:
    import yaml

    return str(yaml.safe_dump(doc))


@pytest.mark.parametrize("form", ["yaml", "json"])
def test_cdi_devices(debian_sif: Path, gpu_env: dict[str, str], fake: Path, tmp_path: Path,
                     form: str) -> None:
    _devices_made()
    specs = tmp_path / "cdi"
    specs.mkdir()
    doc = _spec(fake, "0.6.0" if form == "yaml" else "0.8.0")
    (specs / f"fake.{form}").write_text(_yaml(doc) if form == "yaml" else json.dumps(doc))
    (specs / "other-vendor.yaml").write_text("kind: other.vendor/thing\ndevices: [oops\n")
    probe = tmp_path / "probe.py"
    probe.write_text(CUDA_PROBE)
    script = ("for d in /dev/nvidia0 /dev/fakegpu1; do [ -c $d ] && echo has $d || echo no $d; "
              "done; echo GPU_ID=$GPU_ID FAKE=$FAKE_DRIVER; "
              "readlink /usr/lib/x86_64-linux-gnu/libcuda.so; echo LD=$LD_LIBRARY_PATH; "
              f"python3 {probe}")
    one = run_capsid("exec", "--contain", "-B", f"{probe}", "--cdi-dirs", specs, "--device",
                     "capsid.test/gpu=0", debian_sif, "sh", "-c", script, env=gpu_env)
    assert one.returncode == 0, one.stderr
    out = one.stdout.splitlines()
    assert out[:2] == ["has /dev/nvidia0", "no /dev/fakegpu1"]  # only the device asked for
    assert out[2] == "GPU_ID=0 FAKE=535.104.05"
    assert out[3] == "libcuda.so.1"
    assert out[4].startswith("LD=") and out[4].endswith(":/opt/fakedriver:/.singularity.d/libs")
    assert out[5] == "1 device(s): Capsid Fake GPU"  # found through update-ldcache's folder
    skipped = [line for line in one.stderr.splitlines() if "skipping the hook" in line]
    assert len(skipped) == 1 and "vendor-hook" in skipped[0]
    every = run_capsid("exec", "--contain", "--cdi-dirs", specs, "--device",
                       "capsid.test/gpu=all", debian_sif, "ls", "/dev/nvidia0", "/dev/fakegpu1",
                       env={**gpu_env, "APPTAINER_CDI_DIRS": "/nonexistent"})
    assert every.returncode == 0, every.stderr
    assert every.stdout.split() == ["/dev/fakegpu1", "/dev/nvidia0"]
    # --env still wins over the spec's variables
    pinned = run_capsid("exec", "--cdi-dirs", specs, "--device", "capsid.test/gpu=1", "--env",
                        "GPU_ID=mine", debian_sif, "sh", "-c", "echo $GPU_ID", env=gpu_env)
    assert pinned.stdout == "mine\n", pinned.stderr


@pytest.mark.parametrize(("text", "problem"), [
    ("cdiVersion: '0.6.0'\nkind: capsid.test/gpu\ndevices:\n- name: '0'\n"
     "  containerEdits:\n    deviceNodes:\n    - hostPath: /dev/null\n",
     "devices[0].containerEdits.deviceNodes[0].path: is missing"),
    ("cdiVersion: '9.9.9'\nkind: capsid.test/gpu\ndevices: []\n", "cdiVersion: '9.9.9'"),
    ("cdiVersion: '0.5.0'\nkind: capsid.test/gpu\ndevices: [{name: '0'\n", "not valid YAML"),
    ("cdiVersion: '0.5.0'\nkind: capsid.test/gpu\ndevices:\n- name: '0'\n"
     "  containerEdits:\n    deviceNodes:\n    - path: /dev/capsid-no-such-gpu\n",
     "the device node /dev/capsid-no-such-gpu does not exist"),
    ("cdiVersion: '0.5.0'\nkind: capsid.test/gpu\ndevices:\n- name: '0'\n"
     "  containerEdits:\n    hooks:\n    - {hookName: atStartup, path: /bin/true}\n",
     "devices[0].containerEdits.hooks[0].hookName: 'atStartup' is not one of"),
])
def test_cdi_bad_specs(debian_sif: Path, gpu_env: dict[str, str], tmp_path: Path, text: str,
                       problem: str) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    result = run_capsid("exec", "--cdi-dirs", tmp_path, "--device", "capsid.test/gpu=0",
                        debian_sif, "true", env=gpu_env)
    assert result.returncode == 255
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(tmp_path / "bad.yaml") in lines[0] and problem in lines[0]


def test_cdi_unknown_devices(debian_sif: Path, gpu_env: dict[str, str], fake: Path,
                             tmp_path: Path) -> None:
    (tmp_path / "fake.json").write_text(json.dumps(_spec(fake)))
    for name, said in (("capsid.test/gpu=7", "capsid.test/gpu=0, capsid.test/gpu=1"),
                       ("nvidia.com/gpu", "is not a CDI device name")):
        result = run_capsid("exec", "--cdi-dirs", tmp_path, "--device", name, debian_sif,
                            "true", env=gpu_env)
        assert result.returncode == 255 and len(result.stderr.splitlines()) == 1
        assert said in result.stderr


def test_nvccli(debian_sif: Path, gpu_env: dict[str, str]) -> None:
    env = {**gpu_env, "NVIDIA_DRIVER_CAPABILITIES": "compute,utility,video",
           "NVIDIA_REQUIRE_CUDA": "cuda>=12.0", "NVIDIA_MIG_CONFIG_DEVICES": "all"}
    script = "cat /nvccli-call; nvidia-smi -L; echo NVD=$NVIDIA_VISIBLE_DEVICES"
    result = run_capsid("exec", "--nvccli", "--fakeroot", debian_sif, "sh", "-c", script,
                        env=env)
    assert result.returncode == 0, result.stderr
    call, listing, visible = result.stdout.splitlines()
    assert call.split()[:8] == ["--user", "configure", "--no-cgroups", "--device=all",
                                "--mig-config=all", "--compute", "--utility", "--video"]
    assert "--require=cuda>=12.0" in call.split()
    assert call.split()[-1].endswith("/final")  # the container's root, as it is assembled
    assert listing.startswith("GPU 0: Capsid Fake GPU")
    assert visible == "NVD=all"
    if os.getuid() != 0:  # without root in the namespace it cannot write the root
        refused = run_capsid("exec", "--nvccli", debian_sif, "true", env=env)
        assert refused.returncode == 255
        assert "nvidia-container-cli failed" in refused.stderr
        assert "--fakeroot" in refused.stderr
    missing = run_capsid("exec", "--nvccli", debian_sif, "true",
                         env={**env, "PATH": "/usr/bin:/bin"})
    assert missing.returncode == 255
    assert missing.stderr.splitlines() == [
        "capsid: error: --nvccli needs nvidia-container-cli, which is not installed here; "
        "install libnvidia-container-tools, or use --nv"]
    bad = run_capsid("exec", "--nvccli", "--fakeroot", debian_sif, "true",
                     env={**env, "NVIDIA_DRIVER_CAPABILITIES": "compute,teleport"})
    assert bad.returncode == 255 and "'teleport'" in bad.stderr


@pytest.mark.parametrize(("cuda", "status", "said"), [
    ("12.2.140", "OK", ""),
    ("12.4.127", "WARN", "wants driver 550.54.14 or newer; this one runs it through CUDA's "
                         "minor version compatibility"),
    ("13.0.48", "FAIL", "needs driver 580.65.06 or newer"),
])
def test_doctor_reports_the_driver_and_the_image_cuda(gpu_env: dict[str, str], tmp_path: Path,
                                                      cuda: str, status: str, said: str) -> None:
    root = tmp_path / "cuda-image"
    (root / "usr/local/cuda/lib64").mkdir(parents=True)
    (root / f"usr/local/cuda/lib64/libcudart.so.{cuda}").write_bytes(b"\x7fELF")
    result = run_capsid("doctor", "--json", root, env=gpu_env)
    assert result.returncode == (1 if status == "FAIL" else 0), result.stderr
    report = json.loads(result.stdout)
    jsonschema = pytest.importorskip("jsonschema")
    from tests.integration.test_doctor import SCHEMA

    jsonschema.validate(report, json.loads(SCHEMA.read_text()))
    assert report["image_side"]["cuda"] == cuda
    assert report["host_side"]["cuda"] == "535.104.05"  # from the fake nvidia-smi
    check = next(c for c in report["checks"] if c["check"] == "NVIDIA GPUs")
    assert check["status"] == status and said in check["fix"]


def test_doctor_reports_the_glibc_trap(debian_sif: Path, gpu_env: dict[str, str]) -> None:
    # without nvidia-smi on PATH the driver's version comes from libcuda's file name
    env = {**gpu_env, "PATH": "/usr/local/bin:/usr/bin:/bin"}
    result = run_capsid("doctor", debian_sif, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    nvidia = next(line for line in lines if "NVIDIA GPUs" in line)
    assert nvidia.split()[0] == "OK" and "no CUDA / driver 535.104.05" in nvidia
    index = next(i for i, line in enumerate(lines) if "GPU libraries (--nv)" in line)
    assert lines[index].split()[0] == "WARN"
    assert "1 will not load in this image: libGLdispatch.so.0 (GLIBC_2.99)" in lines[index + 1]

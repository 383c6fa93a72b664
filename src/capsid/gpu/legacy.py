"""``--nv`` and ``--rocm`` the way Apptainer has always done them: bind the host's driver.

Libraries are found through the host's ld.so cache and bound one by one into
``/.singularity.d/libs`` (which the image's ``99-base.sh`` puts on the library path,
after the image's own directories); programs go to ``/usr/bin``; the vendor's files
stay at their paths; the device nodes come along when the container has a /dev of its
own (``--contain``). GPU selection is the host's ``CUDA_VISIBLE_DEVICES`` and friends,
passed in even with ``--cleanenv``.
"""

from __future__ import annotations

import glob
import os

from capsid import config, ldcache, log
from capsid.gpu import liblists
from capsid.gpu.edits import Edits, Mount

LOG = log.get(__name__)

#: variables that choose the GPUs a job may use
SELECTION = {
    "nv": ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER",
           "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"),
    "rocm": ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
             "CUDA_VISIBLE_DEVICES"),
}
_PERSISTENCED = "/var/run/nvidia-persistenced/socket"


def devices(kind: str) -> list[str]:
    """The host's device nodes for *kind*."""
    if kind == "nv":
        return sorted(glob.glob("/dev/nvidia*"))
    found = sorted(glob.glob("/dev/dri/card*") + glob.glob("/dev/dri/render*"))
    return [*found, "/dev/kfd"] if os.path.exists("/dev/kfd") else found


def edits(kind: str, site: config.SiteConfig) -> Edits:
    """What ``--nv`` (*kind* "nv") or ``--rocm`` ("rocm") binds from this host."""
    entries = liblists.load(kind)
    result = Edits()
    prefixes = [e for e in entries if ".so" in e and not e.startswith("/")]
    if prefixes:
        result.libraries.update(ldcache.find_libraries(prefixes, site))
    for entry in entries:
        if entry.startswith("/"):
            if not os.path.exists(entry):
                continue
            if ".so" in entry:
                result.libraries.setdefault(os.path.basename(entry), entry)
            else:
                result.mounts.append(Mount(entry, entry))
        elif ".so" not in entry:
            program = ldcache.find_program(entry, site)
            if program is not None:
                result.mounts.append(Mount(os.path.realpath(program), f"/usr/bin/{entry}"))
    if kind == "nv" and os.path.exists(_PERSISTENCED):
        result.mounts.append(Mount(_PERSISTENCED, _PERSISTENCED, readonly=False))
    result.devices = [Mount(path, path, readonly=False, device=True) for path in devices(kind)]
    for name in SELECTION[kind]:
        if name in os.environ:
            result.passthrough[name] = os.environ[name]
    driver = "libcuda.so" if kind == "nv" else "libdrm_amdgpu.so"
    if not any(name.startswith(driver) for name in result.libraries):
        vendor = "NVIDIA" if kind == "nv" else "AMD ROCm"
        LOG.warning("--%s: no %s driver on this host (no %s in the ld.so cache); the "
                    "container runs without it", kind, vendor, driver)
    return result

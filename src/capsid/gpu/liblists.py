"""The lists of what ``--nv`` and ``--rocm`` bring in from the host.

A site replaces a built-in list with a file next to capsid.conf (``nvliblist.conf``,
``rocmliblist.conf``; Apptainer's format): one entry per line, ``#`` comments. An
entry containing ``.so`` is a library name prefix, looked up in the ld.so cache (or,
when absolute, that very file); another absolute path is a file bound at the same
place (a vendor's JSON for EGL or Vulkan); anything else is a program found on PATH
and bound into /usr/bin.
"""

from __future__ import annotations

import os

from capsid import config
from capsid.errors import CapsidError

NVIDIA = (
    # programs
    "nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
    # libraries (prefixes of the names in the ld.so cache)
    "libcuda.so", "libcudadebugger.so", "libEGL_installertest.so", "libEGL_nvidia.so",
    "libEGL.so", "libGLdispatch.so", "libGLESv1_CM_nvidia.so", "libGLESv1_CM.so",
    "libGLESv2_nvidia.so", "libGLESv2.so", "libGL.so", "libGLX_installertest.so",
    "libGLX_nvidia.so", "libglx.so", "libGLX.so", "libnvcuvid.so", "libnvidia-cbl.so",
    "libnvidia-cfg.so", "libnvidia-compiler.so", "libnvidia-eglcore.so",
    "libnvidia-egl-wayland.so", "libnvidia-encode.so", "libnvidia-fatbinaryloader.so",
    "libnvidia-fbc.so", "libnvidia-glcore.so", "libnvidia-glsi.so", "libnvidia-glvkspirv.so",
    "libnvidia-gpucomp.so", "libnvidia-gtk2.so", "libnvidia-gtk3.so", "libnvidia-ifr.so",
    "libnvidia-ml.so", "libnvidia-nvvm.so", "libnvidia-opencl.so",
    "libnvidia-opticalflow.so", "libnvidia-ptxjitcompiler.so", "libnvidia-rtcore.so",
    "libnvidia-tls.so", "libnvidia-wfb.so", "libnvoptix.so.1", "libOpenCL.so",
    "libOpenGL.so", "libvdpau_nvidia.so", "nvidia_drv.so", "tls_test_.so",
    # files the libraries read
    "/usr/share/glvnd/egl_vendor.d/10_nvidia.json", "/usr/share/vulkan/icd.d/nvidia_icd.json",
    "/usr/share/vulkan/implicit_layer.d/nvidia_layers.json",
    "/usr/share/egl/egl_external_platform.d/15_nvidia_gbm.json",
    "/usr/share/egl/egl_external_platform.d/10_nvidia_wayland.json",
    "/usr/share/nvidia/nvoptix.bin",
)

#: Since Apptainer 1.4 the ROCm compute libraries belong in the image; these are the
#: driver's own and the tools that talk to it.
ROCM = (
    "rocm-smi", "rocminfo",
    "libdrm.so", "libdrm_amdgpu.so",
)


def load(kind: str) -> tuple[str, ...]:
    """The list for *kind* ("nv" or "rocm"): the site's file if it has one."""
    name = {"nv": "nvliblist.conf", "rocm": "rocmliblist.conf"}[kind]
    path = os.path.join(os.path.dirname(config.env("CONFIG") or config.DEFAULT_PATH), name)
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return NVIDIA if kind == "nv" else ROCM
    except OSError as err:
        raise CapsidError(f"cannot read {path}: {err.strerror}",
                          "make it readable, or remove it to use capsid's own list") from None
    entries = []
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if line:
            entries.append(line)
    return tuple(entries)

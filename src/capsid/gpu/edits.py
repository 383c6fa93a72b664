"""What device support adds to a container: a typed record, applied by the runtime."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mount:
    """A host path bound into the container."""

    source: str  #: on the host
    destination: str  #: in the container
    readonly: bool = True
    device: bool = False  #: a device node (or a directory of them): keeps device access


@dataclass
class Edits:
    """Everything ``--nv``, ``--rocm``, ``--device`` and ``--nvccli`` change in a container."""

    #: driver libraries: name under /.singularity.d/libs → host path
    libraries: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)  #: binaries, files, sockets, CDI mounts
    devices: list[Mount] = field(default_factory=list)  #: device nodes
    env: dict[str, str] = field(default_factory=dict)  #: set in the container (CDI)
    #: host variables passed in even with --cleanenv (GPU selection)
    passthrough: dict[str, str] = field(default_factory=dict)
    library_dirs: list[str] = field(default_factory=list)  #: container dirs to search too
    symlinks: list[tuple[str, str]] = field(default_factory=list)  #: (target, link path)
    #: ``nvidia-container-cli`` and its ``configure`` flags, when it does the NVIDIA part
    nvccli: list[str] | None = None
    #: the newest glibc each library needs (for the libraries that say)
    library_glibc: dict[str, tuple[int, ...]] = field(default_factory=dict)
    option: str = "--nv"  #: the flag that asked for these edits, for messages

    def merge(self, other: Edits) -> None:
        self.libraries.update({k: v for k, v in other.libraries.items()
                               if k not in self.libraries})
        self.mounts += [m for m in other.mounts if m not in self.mounts]
        self.devices += [d for d in other.devices if d not in self.devices]
        self.env.update(other.env)
        self.passthrough.update(other.passthrough)
        self.library_dirs += [d for d in other.library_dirs if d not in self.library_dirs]
        self.symlinks += [s for s in other.symlinks if s not in self.symlinks]
        if other.nvccli is not None:
            self.nvccli = other.nvccli
        self.library_glibc.update(other.library_glibc)

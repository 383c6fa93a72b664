"""Which device support a container gets, from its options and the site's settings."""

from __future__ import annotations

import os

from capsid import config
from capsid.gpu.edits import Edits, Mount

TYPE_CHECKING = False
if TYPE_CHECKING:
    from capsid.runtime.options import Options


def edits_for(opts: Options, site: config.SiteConfig, *, nv: bool, rocm: bool) -> Edits:
    """The edits for the NVIDIA driver (*nv*), AMD's (*rocm*), ``--nvccli`` and
    ``--device``; whether a GPU is wanted at all is decided by the caller
    (:mod:`capsid.runtime.plan`)."""
    nvccli = opts.nvccli or (nv and site.yes("use nvidia-container-cli"))
    from capsid.gpu import compat, legacy

    result = Edits()
    options = []
    if nvccli:
        from capsid import ldcache
        from capsid.gpu import nvccli as cli

        environ = dict(os.environ)
        if not opts.contain:
            environ.setdefault("NVIDIA_VISIBLE_DEVICES", "all")
        result.nvccli = [cli.program(site), *cli.flags(environ, ldcache.ldconfig(site))]
        result.passthrough["NVIDIA_VISIBLE_DEVICES"] = environ.get("NVIDIA_VISIBLE_DEVICES",
                                                                   "")
        options.append("--nvccli")
    elif nv:
        result.merge(legacy.edits("nv", site))
        options.append("--nv")
    if rocm:
        result.merge(legacy.edits("rocm", site))
        options.append("--rocm")
    if opts.devices:
        from capsid.gpu import cdi

        dirs = list(opts.cdi_dirs) if opts.cdi_dirs else list(cdi.DEFAULT_DIRS)
        result.merge(cdi.edits(list(opts.devices), dirs))
        options.append("--device")
    # Bind the files themselves: a symlink's target may not resolve once the host's root
    # has moved.
    result.libraries = {n: os.path.realpath(p) for n, p in result.libraries.items()}
    result.mounts = [Mount(os.path.realpath(m.source), m.destination, m.readonly, m.device)
                     for m in result.mounts]
    result.library_glibc = compat.library_needs(result.libraries)
    result.option = "/".join(options)
    return result

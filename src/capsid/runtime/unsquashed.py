"""``--unsquash`` in a job: the image unpacked once per node and job, shared by its ranks.

Without FUSE (or with a single-threaded squashfuse and many ranks) a job can run its
image unpacked. Unpacking costs about a second and the image's size each time; in a job
the tree is made once per node, under a lock, in the site's ``unsquash dir`` (node-local
storage, or ``/dev/shm`` for memory), else ``$TMPDIR`` or ``/tmp``, and every later
container of the job on that node (the other ranks, the next ``srun``) bind-mounts it
read-only. Trees of the user's jobs that have not been used for a day are removed. Where
Slurm gives each job its own ``/tmp`` (``job_container/tmpfs``), the trees go with the job.

A site makes it the default for jobs with ``unsquash ranks = N``: N or more ranks on a
node run unpacked unless ``--unsquash`` is chosen already.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time

from capsid import log, tools
from capsid.config import SiteConfig

LOG = log.get(__name__)

_STALE_SECONDS = 86400


def job() -> str | None:
    """The batch job this process runs in, as a name safe in a path; None outside one."""
    for var in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "FLUX_JOB_ID", "JOB_ID",
                "PMIX_NAMESPACE"):
        value = os.environ.get(var, "")
        if value:
            return re.sub(r"[^A-Za-z0-9_.-]", "_", value)[:64]
    return None


def local_ranks() -> int | None:
    """How many ranks of this launch run on this node, where the launcher says."""
    env = os.environ
    for var in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PALS_LOCAL_SIZE"):
        if env.get(var, "").isdigit():
            return int(env[var])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node = env.get("SLURM_NODEID", "")
    if not spec or not node.isdigit():
        return None
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return None
        counts += [int(m[1])] * int(m[2] or 1)
    index = int(node)
    return counts[index] if index < len(counts) else None


def by_default(site: SiteConfig) -> bool:
    """Whether the site's ``unsquash ranks`` makes this rank run unpacked."""
    threshold = site.values.get("unsquash ranks", "").strip()
    if not threshold.isdigit() or int(threshold) < 1:
        return False
    ranks = local_ranks()
    return ranks is not None and ranks >= int(threshold)


def shared_tree(image_fd: int, offset: int, site: SiteConfig) -> str | None:
    """The directory of the image (open as *image_fd*, its squashfs at *offset*) unpacked
    for this job on this node, made now if no rank made it yet; None outside a job or
    where no private directory can be had (then each container unpacks its own)."""
    name = job()
    if name is None:
        return None
    from capsid import hostfs

    parent = site.values.get("unsquash dir") or os.environ.get("TMPDIR") or "/tmp"
    try:
        base = hostfs.private_dir(f"{parent}/capsid-{os.getuid()}", "unsquash directory")
        top = hostfs.private_dir(f"{base}/unsquash", "unsquash directory", parents=False)
    except (OSError, hostfs.Refused) as err:
        LOG.debug("unpacking privately: %s", getattr(err, "message", None) or err)
        return None
    info = os.fstat(image_fd)
    key = tools.sha256_hex(f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}:"
                           f"{offset}".encode())[:24]
    final = f"{top}/{name}-{key}"
    if not os.path.isdir(final):
        lock = os.open(f"{final}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.isdir(final):
                _unpack(image_fd, offset, final)
                _remove_stale(top, final)
        finally:
            os.close(lock)
    with contextlib.suppress(OSError):
        os.utime(final)  # in use: not stale
    return final


def _unpack(image_fd: int, offset: int, final: str) -> None:
    temp = f"{final}.partial"
    shutil.rmtree(temp, ignore_errors=True)  # a killed unpack's
    LOG.info("unpacking the image once for this job into %s", final)
    try:
        from capsid.runtime import mounts

        mounts.unsquash(image_fd, offset, temp)
        os.rename(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _remove_stale(top: str, keep: str) -> None:
    """Remove trees not used for a day (jobs that ended)."""
    cutoff = time.time() - _STALE_SECONDS
    for entry in os.scandir(top):
        path = entry.path
        if path.startswith(keep) or not entry.is_dir(follow_symlinks=False):
            continue
        with contextlib.suppress(OSError):
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                _make_removable(path)
                shutil.rmtree(path, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path + ".lock")


def _make_removable(top: str) -> None:
    """An image's read-only directories would stop rmtree: make them writable."""
    for parent, dirs, _files in os.walk(top):
        for name in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(parent, name), 0o700)
    os.chmod(top, 0o700)

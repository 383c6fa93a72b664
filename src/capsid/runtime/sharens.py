"""The ranks of an MPI job on one node share one container.

Each container has a user namespace of its own. Separate user namespaces cost MPI its
single-copy shared memory (CMA: ``process_vm_readv`` across them is refused). Each
container also mounts the image again, and N ranks then read the same blocks through
N cold FUSE mounts. So the ranks of one job step on one node that run the same image
with the same options share it all: the first rank forks a *keeper*, which sets the
container up once (user and mount namespaces, one squashfuse, every bind) and then
waits. Every rank, the first included, joins it with ``setns`` and runs its own command
there, as its own process, with its own exit status.

No daemon and no shared file system are needed: a rank finds the keeper through a
Unix socket in a per-user directory on its node, under a lock, named by a hash of the
node, the job step (from the launcher's variables), the image and the options. Each
rank keeps its connection open in its command (an inherited socket): the kernel closes
it when the rank ends, however it ends (``kill -9`` too). When no connection is left
the keeper removes its socket under the lock and exits; the namespaces, the mounts
and the image server go with the last process in them.
"""

from __future__ import annotations

import _socket as socket  # the C module: ``socket`` costs 5 ms to import, on every rank
import fcntl
import os
import sys

from capsid import log
from capsid.errors import CapsidError, RuntimeSetupError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

    from capsid.runtime.options import Options

LOG = log.get(__name__)

_FIRST_RANK_PATIENCE = 120.0  #: seconds a keeper waits for its first rank to join


def job_step() -> str:
    """The launch this rank belongs to: the PMIx namespace, Slurm's job step, or else
    the parent process (the launcher's daemon on this node) and its start time."""
    env = os.environ
    if env.get("PMIX_NAMESPACE"):
        return "pmix:" + env["PMIX_NAMESPACE"]
    if env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}"
    from capsid.runtime import linux

    parent = os.getppid()
    started = linux.start_time(parent)
    return f"parent:{parent}:{started}"


def key(image: str, opts: Options) -> str:
    """What a shared container is known by: node, user, job step, image, options, cwd."""
    info = os.stat(image)
    parts = (os.uname().nodename, str(os.getuid()), job_step(), os.path.realpath(image),
             f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}", repr(opts),
             os.getcwd(), os.environ.get("HOME", ""))
    from capsid.tools import sha256_hex

    return sha256_hex("\0".join(parts).encode(errors="surrogateescape"))[:32]


def directory() -> str | None:
    """This user's directory for keepers' sockets on this node, made private; None if no
    safe one can be had."""
    from capsid import hostfs

    try:
        return hostfs.runtime_dir("sharens", f"/tmp/capsid-{os.getuid()}")
    except (OSError, hostfs.Refused) as err:
        LOG.debug("not sharing: %s", getattr(err, "message", None) or err)
        return None


def _locked(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    return sock


def run(image: str, opts: Options, action: str, argv: list[str]) -> None:
    """Run *action* in this job's shared container on this node, starting it if this is
    the first rank. Does not return, unless sharing is impossible here (then the caller
    starts a container of its own)."""
    folder = directory()
    if folder is None:
        return
    try:
        name = key(image, opts)
    except OSError:
        return  # no such image: the container of its own says so
    socket_path = os.path.join(folder, f"{name}.sock")
    if len(socket_path.encode()) > 107:  # sun_path's limit: a long XDG_RUNTIME_DIR
        LOG.debug("not sharing: %s is too long a name for a socket", socket_path)
        return
    lock = _locked(folder)
    try:
        conn = _connect(socket_path)
        if conn is None:
            try:  # noqa: SIM105
                os.unlink(socket_path)  # a keeper that is gone
            except FileNotFoundError:
                pass
            _start_keeper(image, opts, folder, name)
            conn = _connect(socket_path)
            if conn is None:
                raise RuntimeSetupError("the shared container of this job ended as it started",
                                        "run again with --no-sharens and report it")
    finally:
        os.close(lock)
    pid = int.from_bytes(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)[:4],
                         sys.byteorder)
    _join_and_exec(image, opts, action, argv, pid, conn)


def _start_keeper(image: str, opts: Options, folder: str, name: str) -> None:
    """Fork the keeper (detached: it outlives this rank) and wait until it serves."""
    from capsid.runtime import api, child, container  # noqa: F401 - once, for both processes

    def work(report: int) -> None:  # pragma: no cover - runs in the children
        if os.fork():
            return  # the keeper is orphaned: no rank has it as a child
        _keeper(image, opts, folder, name, report)

    try:
        child.start(work, tied=False, detach=True).wait()
    except CapsidError as err:
        raise RuntimeSetupError(err.message or "the shared container of this job could not "
                                "be set up", err.hint or "run with --no-sharens, and report "
                                "it") from None


def _keeper(image: str, opts: Options, folder: str, name: str,
            report: int) -> NoReturn:  # pragma: no cover - runs in the keeper
    """Set the container up, say so on *report*, then wait for the ranks to be done."""
    import select

    from capsid.runtime import api, child, container

    null = os.open(os.devnull, os.O_RDWR)
    log_path = os.path.join(folder, f"{name}.log")
    messages = os.open(log_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                       | os.O_CLOEXEC, 0o600)
    os.unlink(log_path)  # read back through the fd
    for fd, target in ((null, 0), (null, 1), (messages, 2)):
        os.dup2(fd, target)
    keep = {report, messages}
    for fd in range(3, 1024):
        if fd not in keep:
            try:  # noqa: SIM105
                os.close(fd)
            except OSError:
                pass
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(folder, f"{name}.sock"))
    listener.listen(256)
    try:
        started = api.start(image, opts, "exec", ())
        container.assemble_for_sharing(image, opts, started)
    except BaseException as err:  # the rank must hear of it, whatever it is
        os.write(report, _drain(messages).replace("\1", "").encode(errors="replace"))
        child.failed(report, err, "--no-sharens runs each rank alone")
        os.unlink(f"{name}.sock", dir_fd=folder_fd)
        os._exit(255)
    child.ready(report, _drain(messages))
    os.dup2(null, 2)
    os.close(messages)
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    ranks: dict[int, int] = {}  # fd → fd: the ranks' connections

    def accept() -> bool:
        try:
            fd, _ = listener._accept()  # type: ignore[attr-defined]
        except BlockingIOError:
            return False
        ranks[fd] = fd
        poller.register(fd, select.POLLIN)
        return True

    patience = int(_FIRST_RANK_PATIENCE * 1000)
    while True:
        events = poller.poll(None if ranks else patience)
        if not events:
            break  # the first rank never came
        for fd, _ in events:
            if fd == listener.fileno():
                accept()
            elif not os.read(fd, 64):  # closed: the rank (and what it started) ended
                poller.unregister(fd)
                os.close(fd)
                del ranks[fd]
        if not ranks:
            fcntl.flock(folder_fd, fcntl.LOCK_EX)
            listener.setblocking(False)
            if not accept():  # none came meanwhile: this is the end
                break
            listener.setblocking(True)
            fcntl.flock(folder_fd, fcntl.LOCK_UN)
    try:  # noqa: SIM105
        os.unlink(f"{name}.sock", dir_fd=folder_fd)
    except FileNotFoundError:
        pass
    os._exit(0)


def _drain(fd: int) -> str:  # pragma: no cover - runs in the keeper
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    return data.decode(errors="replace").replace("\0", "")


def _join_and_exec(image: str, opts: Options, action: str, argv: list[str], pid: int,
                   conn: socket.socket) -> NoReturn:
    """Enter the keeper's namespaces and root, and run this rank's command there."""
    from capsid.runtime import container, linux

    def enter() -> None:
        try:
            linux.open_namespaces(pid).enter()
        except OSError as err:
            raise RuntimeSetupError(f"cannot join this job's shared container: "
                                    f"{err.strerror}", "run with --no-sharens") from None
        os.set_inheritable(conn.fileno(), True)  # held by the command: the keeper counts it

    container.join(image, action, tuple(argv), opts, enter)

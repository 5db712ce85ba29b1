"""Which process writes a folder, and jobs that end with the process that started them.

FolderLock: a run folder (image, video or atlas) is written by one process at a time. The
writer holds `<folder>/.writing.lock`, a file naming its pid (and the host and start time of
that process); another trainer refuses the folder with one line naming that process. A lock
whose process is gone (killed, crashed) is stale and is taken over.

die_with_parent: a job that batch.py starts ends when batch.py ends, even by kill -9 (Linux:
a parent-death signal, SIGINT, so the job writes its checkpoint and stops).
"""

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from util.errors import FolderInUseError
from util.files import save_failed

LOCK_NAME = ".writing.lock"
PARENT_ENV = "TEXT2LIVE_PARENT_PID"  # set by a job runner: the job dies with this process

_held = {}  # resolved folder -> [thread id, depth]: the locks this process holds
_held_guard = threading.Lock()


def _proc_stat(pid: int) -> list | None:
    """The fields of /proc/<pid>/stat after the command name (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """When a process started (Linux: clock ticks since boot), or None where unknown; with the
    pid it tells a live writer from a new process that got a dead writer's pid."""
    stat = _proc_stat(pid)
    return stat[19] if stat else None  # field 22 of proc(5)


def pid_alive(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` lives (and, when `started` is known, is the same process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    stat = _proc_stat(pid)
    if stat is not None and stat[0] in ("Z", "X"):
        return False  # ended, not yet reaped
    if started is not None and stat is not None and stat[19] != started:
        return False  # the pid was reused
    return True


def _read_lock(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None
    except (OSError, ValueError):
        return None


class FolderLock:
    """`with FolderLock(folder, what):` holds `folder` for this process (creating the folder if
    needed); raises FolderInUseError (one line naming the other process) when a live process
    holds it. Re-entrant in the thread that holds it; released (and a folder it created, if
    left empty, removed) at the end of the block, also on an error or Ctrl-C."""

    def __init__(self, folder, what: str = "run folder", hint: str = ""):
        self.folder, self.what, self.hint = Path(folder), what, hint
        self.path = self.folder / LOCK_NAME
        self.created = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def acquire(self):
        key = str(self.folder.resolve())
        with _held_guard:
            held = _held.get(key)
            if held is not None:
                if held[0] != threading.get_ident():
                    raise FolderInUseError(f"{self.what} {self.folder} is being written by another job of this "
                                           f"process (pid {os.getpid()}); wait for it to end{self.hint}")
                held[1] += 1
                self.created = False
                return
            self.created = not self.folder.exists()
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # a read-only place, or a file where the folder should be
                raise save_failed(self.folder, e) from None
            self._take()
            _held[key] = [threading.get_ident(), 1]

    def _take(self):
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": process_start(os.getpid()),
              "command": " ".join(["python", *sys.argv])[:300], "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                other = _read_lock(self.path)
                if other is not None and not self._stale(other):
                    self._refuse(other)
                self.path.unlink(missing_ok=True)  # a stale lock: its process is gone
                continue
            except OSError as e:  # a folder this process cannot write: said now, before any work
                raise save_failed(self.folder, e) from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            return
        raise FolderInUseError(f"{self.what} {self.folder}: could not take its lock {self.path} (another process "
                               "keeps taking it); try again")

    def _stale(self, other: dict) -> bool:
        if other.get("host") not in (None, socket.gethostname()):
            return False  # a process on another machine (a shared folder): it cannot be checked from here
        return not pid_alive(other["pid"], other.get("started"))

    def _refuse(self, other: dict):
        pid, host = other["pid"], other.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        command = f" ({other['command']})" if other.get("command") else ""
        stop = (f"; if that process is gone, delete {self.path}" if where
                else f"; wait for it to end or stop it (kill -INT {pid})")
        raise FolderInUseError(f"{self.what} {self.folder} is being written by process {pid}{where}{command} "
                               f"since {other.get('since', '?')}{stop}{self.hint}")

    def check_free(self):
        """Raise FolderInUseError now if another live process (or another thread here) holds
        the folder; takes nothing (acquire does, later)."""
        held = _held.get(str(self.folder.resolve()))
        if held is not None and held[0] != threading.get_ident():
            raise FolderInUseError(f"{self.what} {self.folder} is being written by another job of this "
                                   f"process (pid {os.getpid()}); wait for it to end{self.hint}")
        other = _read_lock(self.path)
        if other is not None and other["pid"] != os.getpid() and not self._stale(other):
            self._refuse(other)

    def release(self):
        key = str(self.folder.resolve())
        with _held_guard:
            held = _held.get(key)
            if held is None or held[0] != threading.get_ident():
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del _held[key]
            info = _read_lock(self.path)
            if info is not None and info["pid"] == os.getpid():
                try:
                    self.path.unlink(missing_ok=True)
                except OSError:
                    pass
            if self.created:
                try:
                    self.folder.rmdir()  # nothing was written: leave nothing behind
                except OSError:
                    pass


def _interrupt_once(signum, frame):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def die_with_parent() -> None:
    """In a job started by a job runner (PARENT_ENV holds the runner's pid): ask Linux to send
    SIGINT when the runner dies (Ctrl-C for the job: it checkpoints and stops), and stop now if
    it is already gone. Elsewhere (or outside Linux) nothing happens."""
    parent = os.environ.pop(PARENT_ENV, None)
    if not parent:
        return
    # the runner stops its job with SIGINT; a runner started in the background by a shell script
    # (`python batch.py jobs.yaml &`) passes SIGINT on as ignored, so it is taken back here. Only
    # the first one counts: the parent-death signal comes again as each thread of a dying
    # multi-threaded runner goes, and a second KeyboardInterrupt would cut the checkpoint short
    signal.signal(signal.SIGINT, _interrupt_once)
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGINT, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != parent:  # the runner died before the signal was asked for
        print(f"error: the process that started this job (pid {parent}) is gone; stopping", file=sys.stderr)
        sys.exit(130)

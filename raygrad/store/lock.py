"""One writer per run directory: an advisory lock on RUN_DIR/.raygrad.lock.

A command that writes a run directory (a new run, from the moment its directory exists until it
ends or stops; `run --resume`; `repair`; `export`) holds `fcntl.flock` on this file for the whole
write, and keeps a JSON record in it: pid, host, command, since (when it took the lock) and
heartbeat (rewritten every HEARTBEAT_SECONDS). A second writer is refused with one line naming the
holder, before it opens the store. The holder removes the file as it ends (unless it was taken
over), so a command that ran leaves no trace of it. Readers (`info`, `top`, `compare`,
load_results) take no lock: they read the last committed checkpoint.

Who may take a lock file that is already there:
- Written on this host: the kernel drops a flock when its process dies (SIGKILL, a crash), so a
  file whose flock can be taken was left by a process that is gone; it is taken over (the record
  rewritten).
- Written on another host: on a shared filesystem (NFS) flock may not reach across hosts, so even
  when flock succeeds the record decides. It is honoured while its heartbeat is less than
  STALE_SECONDS (10 minutes) old; older, its holder is taken to be gone and the lock is taken over.
  The two hosts' clocks are compared, so their skew shifts that wait. Where flock does not reach
  across hosts, the check is not atomic: two drivers starting within the same moment on two hosts
  may both go on. Where flock does reach, a live holder's flock refuses anyway.

A displaced holder stops. Where flock does not reach across hosts, a holder stopped for longer than
STALE_SECONDS (SIGSTOP, a hung mount) may find its lock taken over when it wakes. Its record in the
file is then another's: the heartbeat thread notices within HEARTBEAT_SECONDS, and every durable
write in the run directory asks first (`ensure_held`, called by the store before a checkpoint or
the derived statistics, and by files.replacing / replacing_directory before writing a file there and
again before renaming it into place), reading the record afresh. A displaced holder's next write
raises RaygradError, one line naming the new holder (pid, host, command, since); what it wrote
before stays valid (each checkpoint is whole), and its lock file is left to the new holder. The
check and the write are not one atomic step: a write already past its check when the record
changes still lands, as it would have a moment earlier.

The lock file is opened with O_NOFOLLOW and must be a regular file with one link: a symlink or a
hard link planted at RUN_DIR/.raygrad.lock is refused with one line, never written through.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from .. import constants as names
from ..errors import RaygradError

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 60.0  # how often a holder rewrites the heartbeat in its record
STALE_SECONDS = 600.0  # another host's record whose heartbeat is older than this is taken over
RECORD_BYTES = 512  # the record is padded to this length: a rewrite in place leaves no old tail
READ_TRIES = 20  # a holder writes its record just after taking the flock: read again, 50 ms apart
OPEN_TRIES = 10  # a holder may remove the file just as it is opened: open the new one
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # a filesystem without flock: the record decides


class LockTaken(RaygradError):
    """This process's lock on a run directory was taken over by another: it stops before writing again."""


class RunLock:
    """A lock this process took: its record, and whether it still holds it (`check`)."""

    def __init__(self, fd: int, path: Path, record: dict, where: str):
        self.fd, self.path, self.record, self.where = fd, path, record, where
        self.run_dir = path.parent.resolve()
        self.taken_by: dict | None = None  # the record of the process that took it over
        self._guard = threading.Lock()  # the fd is read by writers' threads and closed at release
        self._closed = False

    def check(self) -> None:
        """Raise RaygradError, one line naming the new holder, once another process has taken this
        lock over; reads the record afresh (the heartbeat may not have run since)."""
        with self._guard:
            if self.taken_by is None and not self._closed:
                self._notice(_read(self.fd))
        if self.taken_by is not None:
            holder = self.taken_by
            raise LockTaken(
                f"{self.where}: its lock was taken over by pid {holder.get('pid')} on host {holder.get('host')} "
                f"since {holder.get('since')} ({holder.get('command')}), this process's heartbeat being over "
                f"{STALE_SECONDS / 60:g} minutes old (a stopped process, a hung mount); this process stops before "
                "writing again: the checkpoints it wrote stay valid, and that process goes on with the run")

    def covers(self, path: Path) -> bool:
        """Whether `path` lies in this lock's run directory."""
        return Path(path).resolve().is_relative_to(self.run_dir)

    def _notice(self, current: dict | None) -> bool:
        """Record a takeover seen in `current` (the file's record); True when there is one."""
        if current is not None and not _same_holder(current, self.record):
            self.taken_by = current
        return self.taken_by is not None

    def _close(self) -> None:
        with self._guard:
            self._closed = True
            os.close(self.fd)


_held: dict[int, RunLock] = {}  # id -> the locks this process holds now (its threads' included)


def ensure_held(path: Path) -> None:
    """Before a durable write to `path`: raise RaygradError when it lies in a run directory whose lock
    this process took and has since lost to another (the module's docstring); else nothing."""
    for held in list(_held.values()):
        if held.covers(path):
            held.check()


@contextlib.contextmanager
def run_lock(run_dir: Path, who: str, label: str = "RUN_DIR") -> Iterator[RunLock]:
    """Hold RUN_DIR's lock for the block, or raise RaygradError naming its holder. `who`: the
    command the record names ("run --resume", "repair"); `label`: the argument a refusal names
    ("--resume", "RUN_DIR"). Yields the lock (its record, and `check` before a write)."""
    path = Path(run_dir) / names.LOCK_FILE
    where = f"{label} {run_dir}"
    fd, record = _take(path, who, where)
    held = RunLock(fd, path, record, where)
    _held[id(held)] = held
    stop = threading.Event()
    heartbeat = threading.Thread(target=_beat, args=(held, stop), name="raygrad-lock-heartbeat", daemon=True)
    heartbeat.start()
    try:
        yield held
    finally:
        stop.set()
        heartbeat.join()
        del _held[id(held)]
        _release(held)


def _take(path: Path, who: str, where: str) -> tuple[int, dict]:
    for _ in range(OPEN_TRIES):
        try:
            # O_NOFOLLOW: a symlink planted at the lock's name is refused, never written through
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise RaygradError(_planted(where, path, "a symbolic link")) from None
            raise RaygradError(f"{where}: cannot create its lock file {names.LOCK_FILE} "
                               f"({err.strerror or err})") from None
        try:
            _check_plain(fd, path, where)
            record = _claim(fd, path, who, where)
        except BaseException:
            os.close(fd)
            raise
        if record is not None:
            return fd, record
        os.close(fd)  # its holder removed the file as we opened it: open the one there now
    raise RaygradError(f"{where}: its lock file {path} keeps being replaced; try again")


def _check_plain(fd: int, path: Path, where: str) -> None:
    """The open lock file is a regular file of its own: not a FIFO or device, nor a hard link to
    another file (whose contents the record would replace)."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise RaygradError(_planted(where, path, "not a regular file"))
    if info.st_nlink > 1:
        raise RaygradError(_planted(where, path, f"a hard link ({info.st_nlink} names for one file)"))


def _planted(where: str, path: Path, what: str) -> str:
    return (f"{where}: its lock file {path} is {what}; raygrad writes its lock record only into a file of its "
            "own: remove it, then run the command again")


def _claim(fd: int, path: Path, who: str, where: str) -> dict | None:
    """Lock the open file and write our record; None when the file was removed meanwhile."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        flocked = True
    except BlockingIOError:
        raise RaygradError(_in_use(where, _read(fd, wait=True), path)) from None
    except OSError as err:
        if err.errno not in NO_FLOCK:
            raise
        flocked = False
    if not _same_file(fd, path):
        return None
    holder = _read(fd)
    if holder is not None:
        if not _gone(holder, flocked):
            raise RaygradError(_in_use(where, holder, path))
        log.warning("%s: taking over the lock of pid %s on host %s (%s, since %s), which ended without "
                    "releasing it", path.parent, holder.get("pid"), holder.get("host"), holder.get("command"),
                    holder.get("since"))
    now = _now()
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": f"raygrad {who}", "since": now,
              "heartbeat": now}
    try:
        _write(fd, record)
    except OSError as err:  # a full disk: nothing of this command is written either
        raise RaygradError(f"{where}: cannot write its lock file {names.LOCK_FILE} ({err.strerror or err})") from None
    return record


def _gone(holder: dict, flocked: bool) -> bool:
    """Whether the process a record names has ended (the rule in the module's docstring)."""
    if holder.get("host") != socket.gethostname():
        return _age(holder) > STALE_SECONDS
    if flocked:
        return True  # the kernel dropped its flock
    pid = holder.get("pid")  # no flock here: ask whether that process still runs
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


def _age(holder: dict) -> float:
    """Seconds since the record's heartbeat (infinite when it has none that parses)."""
    try:
        beat = datetime.fromisoformat(holder["heartbeat"])
        return (datetime.now(timezone.utc) - beat).total_seconds()
    except (KeyError, TypeError, ValueError):
        return float("inf")


def _in_use(where: str, holder: dict | None, path: Path) -> str:
    if holder is None:
        return (f"{where}: in use by another raygrad process (its record in {path} is not written yet); "
                "wait for it to end")
    text = (f"{where}: in use by pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')} "
            f"({holder.get('command')}); wait for it to end")
    if holder.get("host") == socket.gethostname():
        return f"{text}, or stop that process"
    return (f"{text}; if it is gone, its lock is taken over {STALE_SECONDS / 60:g} minutes after its last "
            f"heartbeat ({holder.get('heartbeat')})")


def _beat(held: RunLock, stop: threading.Event) -> None:
    """Rewrite the heartbeat every HEARTBEAT_SECONDS until stopped; stop if another took the lock over
    (the next durable write in the run directory then raises: `ensure_held`)."""
    while not stop.wait(HEARTBEAT_SECONDS):
        with held._guard:
            if held._notice(_read(held.fd)):
                current = held.taken_by
                log.warning("%s: the lock was taken over by pid %s on host %s (%s, since %s) after no heartbeat "
                            "from this process for %g s; this process stops before its next write",
                            held.path.parent, current.get("pid"), current.get("host"), current.get("command"),
                            current.get("since"), STALE_SECONDS)
                return
            held.record["heartbeat"] = _now()
            try:
                _write(held.fd, held.record)
            except OSError as err:  # a full or failing disk: the run goes on, other hosts may take the lock later
                log.warning("%s: cannot refresh the lock's heartbeat (%s)", held.path, err.strerror or err)


def _release(held: RunLock) -> None:
    """Remove the file (while still holding the flock, so no opener locks a file being removed), then
    drop the flock; a lock taken over meanwhile is left to its new holder."""
    path = held.path
    try:
        if held._notice(_read(held.fd)):
            current = held.taken_by
            log.warning("%s: the lock was taken over by pid %s on host %s while this process held it",
                        path.parent, current.get("pid"), current.get("host"))
        elif _same_file(held.fd, path):
            path.unlink()
    except OSError as err:  # left behind, it is taken over by the next command (its flock is free)
        log.warning("%s: cannot remove the lock file (%s)", path, err.strerror or err)
    finally:
        held._close()


def _same_holder(a: dict, b: dict) -> bool:
    return all(a.get(key) == b.get(key) for key in ("pid", "host", "since"))


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file is still the one at `path` (its holder may have removed it)."""
    try:
        there = os.lstat(path)  # a link planted there since is not our file
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read(fd: int, wait: bool = False) -> dict | None:
    """The record in the file, or None when it holds none (empty, or not ours); `wait`: give a holder
    that has just taken the flock time to write it."""
    for attempt in range(READ_TRIES if wait else 1):
        if attempt:
            time.sleep(0.05)
        try:
            record = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
        except ValueError:
            continue
        if isinstance(record, dict):
            return record
    return None


def _write(fd: int, record: dict) -> None:
    data = json.dumps(record).encode().ljust(RECORD_BYTES) + b"\n"
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    os.fsync(fd)  # another host reads it through the file server


def _now() -> str:
    """Local time with its UTC offset, to the second: readable, and comparable across hosts."""
    return datetime.now().astimezone().isoformat(timespec="seconds")

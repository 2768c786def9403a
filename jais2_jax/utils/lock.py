"""Who owns a file or folder (host, pid namespace, pid, start), whether that owner is gone, and a
lock on a folder shared by the hosts of a pod: an atomically created lock file (O_CREAT | O_EXCL,
atomic on local disks and NFSv3+), no fcntl/flock (which such mounts do not share between hosts).
On object-store mounts (gcsfuse) exclusive creation and rename are not atomic across mounts: there
the lock is best effort."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
from typing import Iterator

LOCK_NAME = ".jais2.lock"


class FolderInUse(FileExistsError):
    """The folder is locked by another run (an OSError: the CLI prints it as one line)."""


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2:].split()[19]  # field 22, counted after "(comm)"
    except (OSError, ValueError, IndexError):
        return None


def _pid_namespace() -> str | None:
    """This process's PID namespace: containers sharing a host name (host networking) have pids
    of their own, which another container cannot check."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def owner_record() -> dict:
    """This process as an owner: host, PID namespace, pid, its start on this host (boot id and
    start ticks: a reused pid or a rebooted host is not taken for it) and the time."""
    return {"host": socket.gethostname(), "pidns": _pid_namespace(), "pid": os.getpid(),
            "boot": _boot_id(), "pid_start": _process_start(os.getpid()), "time": time.time()}


def owner_is_gone(record: dict) -> bool:
    """True if the owner `record` (owner_record) is known to be dead: it ran on this host and its
    pid is no longer alive (or is now another process, or the host rebooted since). An owner on
    another host, or in another PID namespace (container) of this host, cannot be checked:
    False."""
    if record.get("host") != socket.gethostname():
        return False
    ns = _pid_namespace()
    if not ns or record.get("pidns") != ns:
        return False  # another container on this host (or unknown): its pid cannot be checked
    boot = _boot_id()
    if record.get("boot") and boot and record["boot"] != boot:
        return True  # the host rebooted: no process of before is alive
    try:
        pid = int(record["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    start = _process_start(pid)
    return bool(record.get("pid_start") and start and record["pid_start"] != start)


def describe(record: dict) -> str:
    when = record.get("time")
    since = (time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(when))
             if isinstance(when, (int, float)) else "")
    return f"host {record.get('host')}, pid {record.get('pid')}{since}"


def _read(path: str, tries: int = 10) -> dict | None:
    """The lock file's record; None if it is gone. A file just created by O_EXCL may still be
    empty: read again for up to ~1 s before calling it unreadable (ValueError)."""
    for attempt in range(tries):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
            if isinstance(record, dict) and "token" in record:
                return record
        except json.JSONDecodeError:
            pass
        if attempt + 1 < tries:
            time.sleep(0.1)
    raise ValueError(f"the lock file {path} is unreadable (not the JSON this tool writes); if no "
                     f"run is using {os.path.dirname(path)}, remove {path} and start again")


def _write_new(path: str, record: dict) -> bool:
    """Creates `path` holding `record` if it does not exist (O_CREAT | O_EXCL: atomic, also on
    NFS); False if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise
    return True


def _take_over(path: str, stale: dict, record: dict) -> bool:
    """Replaces the stale lock `stale` at `path` by `record`. Takeovers are serialised by a guard
    folder (mkdir is atomic); under it the lock is read again and replaced only if it is still
    the stale one, by an atomic rename (the lock file never disappears meanwhile, so no O_EXCL
    creator can slip in). False if another run took it first or is taking it over now."""
    guard = path + ".takeover"
    try:
        os.mkdir(guard)
    except FileExistsError:
        return False
    try:
        current = _read(path)
        if current is None or current.get("token") != stale.get("token"):
            return False
        tmp = f"{path}.{record['token']}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        return True
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(guard)


def acquire(folder, what: str = "run") -> dict:
    """Locks `folder` (made if needed) with the lock file `folder/.jais2.lock`: JSON {host, pid,
    boot, pid_start, time, token}, created with O_CREAT | O_EXCL. Returns the record (for
    `release`).

    Held by a live process, or by one on another host (whose pid cannot be checked): FolderInUse
    naming the folder, the holder (host, pid, start) and the lock file to remove if that run is
    gone. Left by a dead process of this host (killed, host rebooted): taken over (`_take_over`).
    """
    folder = os.path.abspath(os.fspath(folder))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot write {folder}: {e.strerror or e}") from None
    path = os.path.join(folder, LOCK_NAME)
    record = {**owner_record(), "token": uuid.uuid4().hex}
    for _ in range(20):  # each pass: the lock was released or taken over meanwhile
        if _write_new(path, record):
            return record
        holder = _read(path)
        if holder is None:
            continue  # released between our create and our read: try again
        if owner_is_gone(holder):
            if _take_over(path, holder, record):
                print(f"note: took over the stale lock {path} of a {what} that is gone "
                      f"({describe(holder)})", file=sys.stderr)
                return record
            time.sleep(0.05)  # another process is taking it over: see who won
            continue
        if holder.get("host") == record["host"]:
            raise FolderInUse(f"{folder} is in use by another {what} ({describe(holder)}); wait "
                              f"for it to end, or use another folder")
        raise FolderInUse(f"{folder} is in use by another {what} ({describe(holder)}), on another "
                          f"host: its pid cannot be checked from here; if that {what} is gone, "
                          f"remove {path} and start again")
    raise FolderInUse(f"{folder}: could not take its lock {path}: a takeover of the stale lock "
                      f"seems stuck; if no other {what} is starting there, remove "
                      f"{path}.takeover and start again")


def release(folder, record: dict) -> None:
    """Removes the lock of `acquire` if it is still ours (its token)."""
    path = os.path.join(os.path.abspath(os.fspath(folder)), LOCK_NAME)
    try:
        current = _read(path, tries=1)
    except ValueError:
        return
    if current is not None and current.get("token") == record.get("token"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def locked(folder, *, enabled: bool = True, what: str = "run") -> Iterator[dict | None]:
    """`folder` locked (`acquire`) for the block, released at its end, also on an exception.
    With `enabled` False nothing is done (e.g. processes other than 0 of a multi-process run)."""
    if not enabled:
        yield None
        return
    record = acquire(folder, what)
    try:
        yield record
    finally:
        release(folder, record)

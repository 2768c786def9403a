"""Writing outputs without losing anything: build beside the target, rename when complete, never
let an output replace one of its own inputs (or the current directory, or a folder this tool did
not write), never silently replace an output that appeared meanwhile, and leave no temporary
folder behind when interrupted (SIGINT/SIGTERM, see `interrupt_on_signals`) or killed (the next
`staged_output` for the same target removes what a dead process left)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator, Sequence

from jais2_jax.utils.lock import describe, owner_is_gone, owner_record

OWNER_FILE = ".owner"  # inside a temporary folder: who made it (removed before the final rename)
STALE_SECONDS = 6 * 3600  # a temporary folder with no owner file is left alone this long

# What --force may replace: (description, predicate on the existing path), e.g.
# ("an Orbax model folder (config.json and params/)", is_orbax_model_folder).
Kind = tuple[str, Callable[[str], bool]]


def check_apart(output, inputs: Sequence, what: str = "output") -> None:
    """An error if replacing `output` would delete one of `inputs` (the same path, or an input
    inside it). An output inside an input folder is fine."""
    out = os.path.realpath(os.fspath(output))
    for source in inputs:
        src = os.path.realpath(os.fspath(source))
        if src == out or src.startswith(out.rstrip(os.sep) + os.sep):
            raise ValueError(f"{what} {output} would replace its input {source}: name another folder")


def _check_replaceable(target: str, flag: str, kind: Kind | None) -> None:
    """An error unless the existing `target` may be replaced: never the current directory or a
    folder holding it; with `kind`, only what it describes (or an empty folder)."""
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:  # the current directory was removed: nothing of it to protect
        cwd = None
    real = os.path.realpath(target)
    if cwd is not None and (cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep)):
        where = "the current directory" if cwd == real else "a folder holding the current directory"
        raise ValueError(f"{target} is {where}: {flag} never replaces it; name another output")
    if kind is None:
        return
    description, matches = kind
    empty = (os.path.isdir(target) and not os.path.islink(target) and not os.listdir(target))
    if not (empty or matches(target)):
        raise ValueError(f"{target} exists and is not {description}: {flag} replaces only that "
                         "(or an empty folder), never another folder; remove it yourself or name "
                         "another output")


def check_output(target, force: bool, inputs: Sequence = (), flag: str = "--force (force=True)",
                 what: str = "output", kind: Kind | None = None) -> str:
    """The absolute `target`, checked before any work: an existing one needs `force` (`flag`
    names it), replacing it must not delete one of `inputs` (check_apart) nor the current
    directory, and with `kind` (description, predicate) it must be what `kind` describes (what
    this tool writes), or an empty folder."""
    target = os.path.abspath(os.fspath(target))
    exists = os.path.lexists(target)
    if exists and not force:
        raise FileExistsError(f"{target} exists; pass {flag} to replace it")
    check_apart(target, inputs, what)
    if exists:
        _check_replaceable(target, flag, kind)
    return target


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# ------------------------------------------------------------------------------- interrupts
class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread by `interrupt_on_signals`."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class _Interrupts:
    signum: int | None = None  # the first signal received (stays set: writer threads stop)
    pending = False  # received inside a shielded region and not raised yet
    shielded = 0  # main-thread depth of `_shielded` regions: a signal there is only recorded


def _handle(signum, frame):
    if _Interrupts.signum is not None:
        return  # a second signal: the first is being handled (its clean-up is not cut short)
    _Interrupts.signum = signum
    if _Interrupts.shielded:
        _Interrupts.pending = True
    else:
        raise Interrupted(signum)


def _deliver_pending() -> None:
    """Raises a signal received inside a shielded region, once outside all of them."""
    if _Interrupts.pending and not _Interrupts.shielded:
        _Interrupts.pending = False
        raise Interrupted(_Interrupts.signum)


@contextlib.contextmanager
def interrupt_on_signals(signals=(signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """For a command's process: each of `signals` raises `Interrupted` (a KeyboardInterrupt) in
    the main thread, so `staged_output` removes its temporary folder, except inside
    `deferred_interrupts()` regions, where it is raised once the region ends (the writers that
    region waits for have stopped; `raise_if_interrupted` lets them stop early). A second signal
    never interrupts the clean-up of the first. A signal the process ignores (SIG_IGN, e.g.
    SIGINT of a background job) stays ignored. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handle) for s in signals
                if signal.getsignal(s) is not signal.SIG_IGN}
    _Interrupts.signum, _Interrupts.pending = None, False
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _Interrupts.signum, _Interrupts.pending = None, False


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """A signal inside is recorded, not raised (main thread only); see _deliver_pending."""
    main = threading.current_thread() is threading.main_thread()
    if main:
        _Interrupts.shielded += 1
    try:
        yield
    finally:
        if main:
            _Interrupts.shielded -= 1


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """A region that a signal (see `interrupt_on_signals`) does not cut short in the middle: used
    around writes done by other threads (Orbax, TensorStore), which an exception in the main
    thread would not stop. At its end a signal received inside raises `Interrupted` (also in
    place of the error the interrupted writers raised). A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        with _shielded():
            yield
    except KeyboardInterrupt:
        if not _Interrupts.shielded:
            _Interrupts.pending = False
        raise
    except BaseException as e:
        try:
            _deliver_pending()
        except Interrupted as interrupted:
            raise interrupted from e
        raise
    _deliver_pending()


class StopWriting(Exception):
    """Raised by `raise_if_interrupted` in a writer thread: the writing stops after a signal."""


def raise_if_interrupted() -> None:
    """For readers / writers inside `deferred_interrupts`: stop once a signal was received
    (StopWriting in another thread, which fails the writing; Interrupted in the main thread)."""
    if _Interrupts.signum is not None:
        if threading.current_thread() is threading.main_thread():
            _Interrupts.pending = False
            raise Interrupted(_Interrupts.signum)
        raise StopWriting(f"interrupted by {signal.Signals(_Interrupts.signum).name}")


# -------------------------------------------------------------------------- temporary folders
def _make_temporary(target: str, tag: str) -> str:
    """A new folder `.NAME.TAG-XXXXXXXX` beside `target` holding an owner file (host, pid, ...:
    see remove_stale_temporaries); an ordinary folder's permissions, not mkdtemp's private ones."""
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.{tag}-",
                           dir=os.path.dirname(target))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        with open(os.path.join(tmp, OWNER_FILE), "w", encoding="utf-8") as f:
            json.dump(owner_record(), f)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


@contextlib.contextmanager
def temporary_beside(target) -> Iterator[str]:
    """A temporary folder `.NAME.tmp-*` beside `target` (its parent made if needed), removed at
    the end; one left by a killed process is removed by the next `staged_output` for `target`."""
    target = os.path.abspath(os.fspath(target))
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with _shielded():  # no interrupt between making it and owning its removal
            tmp = _make_temporary(target, "tmp")
    except OSError as e:
        raise OSError(f"cannot write {target}: {e.strerror or e}") from None
    try:
        _deliver_pending()
        yield tmp
    finally:
        with _shielded():
            shutil.rmtree(tmp, ignore_errors=True)
        _deliver_pending()


def _owner(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, OWNER_FILE), encoding="utf-8") as f:
            record = json.load(f)
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def remove_stale_temporaries(target) -> None:
    """Removes the temporary folders beside `target` (`.NAME.tmp-*`, `.NAME.old-*`) that belong
    to no live process: their owner file names a process of this host that is gone (one of
    another host cannot be checked: kept), or they have no owner file and are older than
    STALE_SECONDS. A `.NAME.old-*` holds the previous output while it is being replaced: if
    `target` is missing (killed between the two renames), it is put back instead."""
    target = os.path.abspath(os.fspath(target))
    parent, name = os.path.split(target)
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in sorted(entries):
        tag = ("tmp" if entry.startswith(f".{name}.tmp-") else
               "old" if entry.startswith(f".{name}.old-") else None)
        path = os.path.join(parent, entry)
        if tag is None or os.path.islink(path) or not os.path.isdir(path):
            continue
        owner = _owner(path)
        try:
            stale = (owner_is_gone(owner) if owner is not None else
                     time.time() - os.lstat(path).st_mtime > STALE_SECONDS)
        except OSError:
            continue
        if not stale:
            continue
        who = f" ({describe(owner)})" if owner else ""
        kept = os.path.join(path, "x")
        if tag == "old" and os.path.lexists(kept) and not os.path.lexists(target):
            try:
                os.rename(kept, target)
            except OSError:
                continue  # keep it: it holds the only copy
            print(f"note: put {target} back from {path}, where a killed run{who} had moved it "
                  f"aside", file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            print(f"note: removed {path}, left by a run that is gone{who}", file=sys.stderr)


# ----------------------------------------------------------------------------- staged output
def _appeared(target: str, flag: str) -> FileExistsError:
    return FileExistsError(f"{target} appeared while this output was being written (another "
                           f"process writing the same output?); it is kept and this output is "
                           f"discarded: pass {flag} to replace it")


def _install(tmp: str, target: str, force: bool, flag: str, kind: Kind | None) -> None:
    """Renames the complete `tmp` to `target`. Without `force` never over an output that
    appeared meanwhile: `target` is claimed with mkdir (atomic; an existing one, even an empty
    folder, fails it) and the rename replaces only that empty claim. With `force` an existing
    one (checked again, see _check_replaceable) is moved aside, and removed once the new one
    is in place."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(tmp, OWNER_FILE))
    while True:
        if not os.path.lexists(target):
            try:
                os.mkdir(target)
            except FileExistsError:
                if force:
                    continue
                raise _appeared(target, flag) from None
            try:
                os.rename(tmp, target)  # replaces our own empty claim, nothing else
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # not our claim any more
                    raise _appeared(target, flag) from None
                with contextlib.suppress(OSError):
                    os.rmdir(target)
                raise
            return
        if not force:
            raise _appeared(target, flag)
        _check_replaceable(target, flag, kind)
        old = _make_temporary(target, "old")
        os.replace(target, os.path.join(old, "x"))
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(os.path.join(old, "x"), target)  # the old output back in place
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old)
        return


@contextlib.contextmanager
def staged_output(target, force: bool, flag: str = "--force (force=True)",
                  kind: Kind | None = None) -> Iterator[str]:
    """A temporary folder beside `target`, renamed to it when the block completes; removed if it
    fails or is interrupted (see interrupt_on_signals). An existing `target` is replaced only with
    `force` (and, with `kind`, only if it is what `kind` describes; never the current directory),
    and only once the new one is complete (the old one is moved aside first, then removed).
    Without `force`, an output that appeared at `target` while the block ran is kept, and the
    block's output discarded (FileExistsError). Temporary folders that killed processes left
    beside `target` are removed first (remove_stale_temporaries)."""
    target = os.path.abspath(os.fspath(target))
    remove_stale_temporaries(target)
    target = check_output(target, force, flag=flag, kind=kind)
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with _shielded():  # no interrupt between making it and owning its removal
            tmp = _make_temporary(target, "tmp")
    except OSError as e:  # read-only place, a file where a folder should be, ...
        raise OSError(f"cannot write {target}: {e.strerror or e}") from None
    try:
        _deliver_pending()
        yield tmp
        with deferred_interrupts():
            _install(tmp, target, force, flag, kind)
    except BaseException:
        with _shielded():  # a second signal does not cut the removal short
            shutil.rmtree(tmp, ignore_errors=True)
        _deliver_pending()
        raise


def write_text_atomic(path, text: str) -> None:
    """`text` into `path` through a temporary file beside it, renamed when written."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; the output is an ordinary file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

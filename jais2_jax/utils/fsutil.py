"""Writing outputs without losing anything: build beside the target, rename when complete, and
never let an output replace one of its own inputs."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator, Sequence


def check_apart(output, inputs: Sequence, what: str = "output") -> None:
    """An error if replacing `output` would delete one of `inputs` (the same path, or an input
    inside it). An output inside an input folder is fine."""
    out = os.path.realpath(os.fspath(output))
    for source in inputs:
        src = os.path.realpath(os.fspath(source))
        if src == out or src.startswith(out.rstrip(os.sep) + os.sep):
            raise ValueError(f"{what} {output} would replace its input {source}: name another folder")


def check_output(target, force: bool, inputs: Sequence = (), flag: str = "--force (force=True)",
                 what: str = "output") -> str:
    """The absolute `target`, checked before any work: an existing one needs `force` (`flag`
    names it), and replacing it must not delete one of `inputs` (check_apart)."""
    target = os.path.abspath(os.fspath(target))
    if os.path.lexists(target) and not force:
        raise FileExistsError(f"{target} exists; pass {flag} to replace it")
    check_apart(target, inputs, what)
    return target


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def staged_output(target, force: bool, flag: str = "--force (force=True)") -> Iterator[str]:
    """A temporary folder beside `target`, renamed to it when the block completes; removed if it
    fails. An existing `target` is replaced only with `force`, and only once the new one is
    complete (the old one is moved aside first, then removed)."""
    target = check_output(target, force, flag=flag)
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    except OSError as e:  # read-only place, a file where a folder should be, ...
        raise OSError(f"cannot write {target}: {e.strerror or e}") from None
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
        if os.path.lexists(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.replace(target, os.path.join(old, "x"))
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(os.path.join(old, "x"), target)  # the old output back in place
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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

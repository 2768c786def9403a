"""What every checkpoint format shares: file names, the folder check, tokenizer files, the
recorded dtype, progress bars, sizes, and the allocator setting of the convert/export commands."""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys

import numpy as np

from jais2_jax.model.config import Jais2Config

PARAMS_DIR = "params"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Copied beside the weights in both directions when present (see copy_tokenizer_files for links).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_folder(path) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder")
    if not regular_file_exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in {path}: a checkpoint folder needs one")
    return os.path.abspath(path)  # Orbax reads no metadata from a relative path


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def regular_file_exists(path) -> bool:
    """Whether `path` is there as a regular file (links followed; a dangling link is not there).
    Anything else there (a folder, a named pipe, a device) is a ValueError naming it: reading a
    named pipe waits forever for a writer, and a device may never end."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    if stat.S_ISREG(mode):
        return True
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    raise ValueError(f"{os.fspath(path)} is {kind}, not a regular file: only regular files are "
                     "read")



# ----------------------------------------------------------------------------- staged outputs
def return_freed_memory_to_os(threshold: int = 1 << 20) -> bool:
    """Serve every allocation >= `threshold` bytes from mmap, so that freeing it returns it to the OS.

    glibc keeps freed heap blocks in per-thread arenas (up to 8 per core) for reuse; streaming
    many-MB blocks through a pool of reader threads leaves that retained memory in RSS. Measured on
    2 cores (`benchmarks/bench_convert.py --layers 6 --methods ours`): peak RSS 1.97-2.24 GB
    without, 1.44-1.48 GB with, same wall time. Process-wide and permanent, so the `jais2 convert`
    and `jais2 export` commands call it; library functions do not. False where it is unavailable.
    """
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3  # glibc's M_MMAP_THRESHOLD; setting it also stops its dynamic growth
    return bool(libc.mallopt(m_mmap_threshold, threshold))


def _link_roots(folder: str) -> list[str]:
    """Where the files of `folder` (a real path) may live: inside it; and for a snapshot of the
    Hugging Face hub cache (`.../models--org--name/snapshots/<revision>/`, whose files are links
    to `../../blobs/<hash>`), also inside that repository's `blobs/` folder."""
    roots = [folder]
    snapshots = os.path.dirname(folder)
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    if os.path.basename(snapshots) == "snapshots" and os.path.isdir(blobs):
        roots.append(blobs)
    return roots


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def copy_tokenizer_files(src: str, dst: str) -> None:
    """The tokenizer files of `src` copied into `dst`, each with its permission bits.

    A file that is a symbolic link is followed only where it stays inside `src` (or, for a hub
    cache snapshot, inside the repository's blobs/): a link out of the folder (`added_tokens.json`
    -> a private file elsewhere) is refused, so a checkpoint can never copy a file it does not
    hold into an output. A link that leads nowhere is skipped with a warning."""
    folder = os.path.realpath(src)
    roots = _link_roots(folder)
    for name in sorted(os.listdir(src)):
        if name in TOKENIZER_FILES or name.endswith(".model"):
            path = os.path.join(src, name)
            real = os.path.realpath(path)
            if not any(_inside(real, root) for root in roots):
                raise ValueError(f"{path} is a symbolic link to {real}, outside {src}: refusing "
                                 "to copy it (tokenizer files are copied only from inside the "
                                 "checkpoint folder; put the file itself there if it belongs)")
            if not regular_file_exists(real):
                print(f"warning: {path} is a link to {real}, which does not exist: not copied",
                      file=sys.stderr)
                continue
            _copy_with_mode(real, os.path.join(dst, name))


def _copy_with_mode(src: str, dst: str) -> None:
    """`src`'s bytes into a new file `dst` with `src`'s permission bits (a private 0600 file stays
    private: the copy is never more open, not even while being written)."""
    mode = stat.S_IMODE(os.stat(src).st_mode)
    with open(src, "rb") as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode & 0o777)
        with os.fdopen(fd, "wb") as fout:
            os.fchmod(fd, mode)  # exactly the source's bits (creation applied the umask)
            shutil.copyfileobj(fin, fout)


def config_with_dtype(config: Jais2Config, dtype: np.dtype) -> Jais2Config:
    """`config` with its recorded weight dtype (HF's `dtype` / `torch_dtype`) set to `dtype`."""
    meta = dict(config.hf_metadata)
    keys = [k for k in ("dtype", "torch_dtype") if k in meta] or ["dtype"]
    for k in keys:
        meta[k] = np.dtype(dtype).name
    return config.replace(hf_metadata=meta)


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled)



def parse_size(size) -> int:
    """Bytes from an int or '5GB' / '500MB' / '20KB' / '1GiB' (transformers' convention)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m:
        raise ValueError(f"size {size!r}: expected e.g. 5GB, 500MB, 1GiB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


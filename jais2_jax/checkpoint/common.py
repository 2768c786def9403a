"""What every checkpoint format shares: file names, the folder check, tokenizer files, the
recorded dtype, progress bars, sizes, and the allocator setting of the convert/export commands."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np

from jais2_jax.model.config import Jais2Config

PARAMS_DIR = "params"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Copied beside the weights in both directions when present (HF cache symlinks are followed).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_folder(path) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in {path}: a checkpoint folder needs one")
    return os.path.abspath(path)  # Orbax reads no metadata from a relative path



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


def copy_tokenizer_files(src: str, dst: str) -> None:
    for name in sorted(os.listdir(src)):
        if name in TOKENIZER_FILES or name.endswith(".model"):
            path = os.path.join(src, name)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(dst, name))


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


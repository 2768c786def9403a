"""A training run's checkpoint exported as an HF folder (through a temporary Orbax model folder)."""

from __future__ import annotations

import os
import sys

import jax

from jais2_jax.checkpoint import export_orbax_to_hf, save_model
from jais2_jax.checkpoint.convert import HF_FOLDER
from jais2_jax.training.trainer import load_trained, run_tokenizer_dir
from jais2_jax.utils.fsutil import check_output, deferred_interrupts, temporary_beside


def export_run_to_hf(run_dir, hf_dir, *, step=None, max_shard_size="5GB", dtype=None,
                     force: bool = False, progress: bool = True) -> int:
    """A training run's checkpoint (default: the latest step) -> HF folder, through a temporary
    Orbax model folder (`.NAME.tmp-*` beside the output, removed at the end). `force` replaces
    only an HF checkpoint folder (or an empty folder). Returns the exported step."""
    target = check_output(hf_dir, force, [run_dir], kind=HF_FOLDER)  # before the load
    config, params, step = load_trained(os.fspath(run_dir), step)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tokenizer_dir, places = run_tokenizer_dir(os.fspath(run_dir))
    if tokenizer_dir is None:
        print(f"note: no tokenizer/ folder in the run's token store (looked in "
              f"{' and '.join(places)}); {target} gets no tokenizer files", file=sys.stderr)
    with temporary_beside(target) as t:
        model_dir = os.path.join(t, "model")
        with deferred_interrupts():  # Orbax's writer threads do not stop on a main-thread error
            save_model(model_dir, config, jax.device_get(params), tokenizer_dir=tokenizer_dir)
        export_orbax_to_hf(model_dir, hf_dir, max_shard_size=max_shard_size, dtype=dtype,
                           force=force, progress=progress)
    return step

def is_training_run(path) -> bool:
    return os.path.isdir(os.path.join(os.fspath(path), "checkpoints"))


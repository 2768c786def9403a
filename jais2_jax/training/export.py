"""A training run's checkpoint exported as an HF folder (through a temporary Orbax model folder);
a LoRA run's as a PEFT adapter folder, or merged into its base as an HF folder."""

from __future__ import annotations

import os
import sys

import jax

from jais2_jax.checkpoint import export_orbax_to_hf, load_checkpoint, save_model
from jais2_jax.checkpoint.common import TOKENIZER_FILES
from jais2_jax.checkpoint.convert import HF_FOLDER
from jais2_jax.checkpoint.hub import resolve_checkpoint
from jais2_jax.checkpoint.peft import ADAPTER_FOLDER, AdapterConfig, save_adapter
from jais2_jax.training.lora import is_lora_run, read_run_adapter
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



def _adapter_config(ra) -> AdapterConfig:
    return AdapterConfig(rank=ra.spec.rank, alpha=ra.spec.alpha, dropout=ra.spec.dropout,
                         target_modules=tuple(ra.target_modules), base_model_name_or_path=ra.base)


def export_run_adapter(run_dir, out_dir, *, step=None, force: bool = False) -> int:
    """A LoRA run's adapter (default: the latest step) -> a PEFT adapter folder
    (`peft.PeftModel.from_pretrained(base_model, out_dir)` loads it); base_model_name_or_path is
    the run's init_from. A run that is not a LoRA run is refused by name. Returns the step."""
    check_output(out_dir, force, [run_dir], kind=ADAPTER_FOLDER)  # before the read
    if not is_lora_run(run_dir):
        raise ValueError(f"{run_dir} is not a LoRA run (its run config has no lora block): it "
                         "holds full weights, not an adapter; export it without --adapter-only "
                         "for an HF folder")
    ra = read_run_adapter(run_dir, step)
    save_adapter(out_dir, _adapter_config(ra), ra.adapters, ra.model_config, force=force)
    return ra.step


def export_run_merged(run_dir, hf_dir, *, step=None, max_shard_size="5GB", dtype=None,
                      force: bool = False, progress: bool = True) -> int:
    """A LoRA run's adapter merged into its base (the run's init_from, read as stored; W + scale
    * A . B in float32, cast back) -> an HF folder, through a temporary PEFT folder and a
    temporary Orbax model folder. The model must fit this host. A QLoRA run's adapter was trained
    on the int8 base: it is merged into the base's stored weights, as PEFT merges. Returns the
    exported step."""
    target = check_output(hf_dir, force, [run_dir], kind=HF_FOLDER)  # before the load
    if not is_lora_run(run_dir):
        raise ValueError(f"{run_dir} is not a LoRA run (its run config has no lora block): "
                         "--merge is for a LoRA run; export it without --merge")
    ra = read_run_adapter(run_dir, step)
    if ra.base is None or not os.path.isdir(ra.base):
        raise FileNotFoundError(f"the run's base (init_from) {ra.base} is not a folder here: "
                                "the adapter is merged into it")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tokenizer_dir, _ = run_tokenizer_dir(os.fspath(run_dir))
    if tokenizer_dir is None and any(os.path.isfile(os.path.join(ra.base, f))
                                     for f in TOKENIZER_FILES):
        tokenizer_dir = ra.base
    with temporary_beside(target) as t:
        adapter_dir = os.path.join(t, "adapter")
        save_adapter(adapter_dir, _adapter_config(ra), ra.adapters, ra.model_config)
        config, params = load_checkpoint(resolve_checkpoint(ra.base), adapter=adapter_dir)
        if config != ra.model_config:
            raise ValueError(f"the run's base {ra.base} has another model config than the run")
        model_dir = os.path.join(t, "model")
        with deferred_interrupts():
            save_model(model_dir, config, jax.device_get(params), tokenizer_dir=tokenizer_dir)
        del params
        export_orbax_to_hf(model_dir, hf_dir, max_shard_size=max_shard_size, dtype=dtype,
                           force=force, progress=progress)
    return ra.step

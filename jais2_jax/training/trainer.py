"""A training run: checks, mesh, data, state (fresh, continued or resumed), the step loop, Orbax
checkpoints, metrics (console + tqdm, `metrics.jsonl`, TensorBoard) and SIGTERM.

Output directory:
    checkpoints/<step>/{state,data,meta}   Orbax: TrainState, data-iterator position, configs
    metrics.jsonl                          one JSON object per log / eval step
    tensorboard/                           event files (tensorboardX)

One run at a time: a run holds the lock file `.jais2.lock` in its output directory from its
first write to its end (`jais2_jax.utils.lock`); a second run on the same directory is refused.

Resuming: when `checkpoints/` holds a step, the run restores params, optimizer state, step, RNG
and the data position from the latest one and continues; the model config must be the one it was
made with. Every bad input is reported before the first step runs.

LoRA runs (`run.lora`): the base is loaded from `init_from` at every start (fresh or resumed) and
stays frozen; the state and its checkpoints hold the adapters, their optimizer state, step and
RNG only (`training/lora.py`). Resuming with a changed `lora:` block is refused.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation
from tqdm import tqdm

from jais2_jax.checkpoint import load_checkpoint
from jais2_jax.checkpoint.hub import resolve_checkpoint
from jais2_jax.evaluation import harness
from jais2_jax.model.config import Jais2Config, load_model_config
from jais2_jax.model.options import as_dtype
from jais2_jax.parallel import distributed, sharding
from jais2_jax.parallel.distributed import global_batch
from jais2_jax.training import data
from jais2_jax.training import lora as lora_lib
from jais2_jax.training.program import build_train_program
from jais2_jax.training.run_config import LoraConfig, RunConfig
from jais2_jax.training.step import (
    flops_per_token,
    init_state,
    make_optimizer,
    merge_params,
    peak_tflops,
)
from jais2_jax.utils import lock
from jais2_jax.utils.fsutil import write_text_atomic

# `meta` entries that fix the order of the data: a resumed run must keep them.
DATA_ORDER_KEYS = ("seq_len", "batch_size", "seed")


class _StopFlag:
    """Set by SIGTERM (preemption); the loop checkpoints and returns after the current step."""

    def __init__(self):
        self.set = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _Metrics:
    """metrics.jsonl and TensorBoard, written by process 0 only."""

    def __init__(self, output_dir: str, start_step: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter
        path = os.path.join(output_dir, "metrics.jsonl")
        if os.path.exists(path):
            # A resumed run repeats the steps after its checkpoint: drop their earlier records.
            kept = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short when the run was killed
                        print(f"{path}:{n}: dropping an unreadable line (cut short?)")
                        continue
                    if record.get("step", 0) <= start_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        self.file = open(path, "a", encoding="utf-8")
        # Hide TensorBoard's events after the checkpoint (purge_step; also from step 1 on when a
        # run killed before its first checkpoint starts again), which this run writes again, in a
        # file of its own (the default name has the second and the host only: a resume within
        # the same second overwrote the previous file; a random suffix, not the pid, as one
        # process may run twice).
        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"),
                                    purge_step=start_step + 1,
                                    filename_suffix=f".from-step-{start_step}."
                                                    f"{uuid.uuid4().hex[:8]}")

    def write(self, step: int, values: dict[str, float]):
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # as the jsonl: a killed run keeps every step it logged

    def close(self):
        if self.enabled:
            self.file.close()
            self.writer.close()


def train(run: RunConfig, *, until_step: int | None = None, show_progress: bool = True) -> dict:
    """Runs (or resumes) `run` until `total_steps` (or `until_step`, checkpointing there).

    Returns {"status": "done" | "stopped" | "preempted" | "nonfinite", "step", "loss",
    "eval_loss", "output_dir"}.

    Phases: checks (every bad input before any work), data, the output directory's lock,
    program (`build_train_program`), state (resume, continue from `init_from`, or new), the step
    loop.

    The lock (`lock.locked`: the file `output_dir/.jais2.lock`, created atomically with
    O_CREAT | O_EXCL, atomic on NFS shared by the hosts of a pod; best effort on gcsfuse) is held from before the first write to output_dir until the run returns or raises. A
    second run on the same output_dir is refused (FolderInUse, an OSError) naming the folder and
    the holder (host, pid). A lock left by a killed run on this host (its pid is gone) is taken
    over; one of another host cannot be checked and is refused with the file to remove. In a
    multi-process run (jax.process_count() > 1) only process 0 takes the lock; the others never
    touch it (so they cannot fail on it), and if process 0 is refused, its error stops the job as
    any failed process does.
    """
    if until_step is not None and until_step < 1:
        raise ValueError(f"until_step must be at least 1, got {until_step}")
    config, store, mesh = _check_run(run)
    train_iter, eval_data = _open_data(run, store)
    build_train_program(config, run, mesh)  # its sharding checks before output_dir is made (cached)
    with lock.locked(run.output_dir, enabled=jax.process_index() == 0):
        return _train_locked(run, until_step, show_progress, config, mesh, train_iter, eval_data)


def _train_locked(run, until_step, show_progress, config, mesh, train_iter, eval_data) -> dict:
    """`train` once the checks passed and the output directory is locked."""
    program = build_train_program(config, run, mesh)
    base = None
    if program.lora:  # before any write: a missing or mismatched base loses nothing
        base = lora_lib.load_base(run, config, mesh, program.base_shardings)
    os.makedirs(run.output_dir, exist_ok=True)
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(run.output_dir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(**_keep_options(run),
                                             enable_async_checkpointing=run.async_checkpointing),
        item_names=("state", "data", "meta"))
    meta = {"model_config": config.to_dict(), "run": run.to_dict(),
            "processes": jax.process_count(),
            "data_dir": os.path.abspath(run.data)}  # `data` as seen from where the run started
    with sharding.use_mesh(mesh):
        latest = manager.latest_step()
        if latest is not None:
            state = _restore(manager, latest, config, run, meta, program, train_iter)
        elif program.lora:
            state = program.init_state(jax.random.PRNGKey(run.seed))
        else:
            state = _new_state(run, config, program)
    loop = _Loop(run, program, manager, meta, train_iter, eval_data, show_progress, base)
    return loop.run_until(state, until_step)


def _check_run(run: RunConfig):
    """The model config, token store and mesh of `run`, each checked against the others."""
    config = load_model_config(run.model)
    if run.lora is not None:
        if run.init_from is None:
            raise ValueError("a lora run trains adapters on a frozen base: set init_from to the "
                             "base checkpoint (an HF or Orbax folder)")
        lora_lib.check_lora(config, run.lora)
    if config.attention_dropout:
        raise ValueError(f"attention_dropout {config.attention_dropout} is not implemented; training "
                         "would silently run without it (set it to 0.0, as the released configs do)")
    if run.seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len {run.seq_len} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    store = data.TokenStore(run.data)
    if store.vocab_size > config.vocab_size:
        raise ValueError(f"the token store's tokenizer has {store.vocab_size} tokens, more than "
                         f"the model's vocab_size {config.vocab_size}")
    if store.max_token_id >= config.vocab_size:
        raise ValueError(f"token store {run.data} holds token id {store.max_token_id}, but the "
                         f"model's vocab_size is {config.vocab_size}: ids must be below it")
    mesh = sharding.make_mesh(run.mesh, dcn_shape=run.dcn_mesh)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = run.batch_size // run.grad_accum_steps
    if micro % dp:
        raise ValueError(f"batch_size {run.batch_size} / grad_accum_steps {run.grad_accum_steps} = "
                         f"{micro} sequences per micro-batch is not divisible by the {dp} "
                         f"data-parallel devices (mesh data x fsdp = {mesh.shape['data']} x "
                         f"{mesh.shape['fsdp']})")
    distributed.check_batch_split(sharding.batch_sharding(mesh, (run.batch_size, run.seq_len)),
                                  (run.batch_size, run.seq_len))
    if run.task_names:
        if _tokenizer_of(run) is None:
            raise ValueError(f"eval_tasks needs a tokenizer: the token store {run.data} has no "
                             "tokenizer/ folder")
        harness.task_manager(run.eval_tasks_include_path).load(list(run.task_names))
    return config, store, mesh


def _tokenizer_of(run: RunConfig) -> str | None:
    folder = os.path.join(run.data, "tokenizer")
    return folder if os.path.isdir(folder) else None


def _open_data(run: RunConfig, store: data.TokenStore):
    """This process's training iterator and its eval batches (empty without an eval split)."""
    process, processes = jax.process_index(), jax.process_count()
    train_iter = data.train_iterator(store, seq_len=run.seq_len, batch_size=run.batch_size,
                                     seed=run.seed, process_index=process,
                                     process_count=processes, threads=run.data_threads)
    eval_data = (data.eval_batches(store, seq_len=run.seq_len, batch_size=run.batch_size,
                                   num_batches=run.eval_batches, process_index=process,
                                   process_count=processes) if run.eval_every else [])
    if run.eval_every and not eval_data:
        eval_tokens = store.num_tokens("eval")
        if eval_tokens:  # an eval split was prepared but cannot make one row
            raise ValueError(f"the eval split of {store.path} has {eval_tokens} tokens; one row of "
                             f"seq_len {run.seq_len} needs {run.seq_len + 1} (prepare more eval "
                             "text, or set eval_every: 0)")
        print(f"no eval: {store.path} has no eval split (prepare-data --eval-fraction); "
              f"eval_every {run.eval_every} is ignored")
    return train_iter, eval_data


def _keep_options(run: RunConfig) -> dict:
    """The latest `keep_checkpoints`, and with `keep_best` the best one too (Orbax's
    preservation policies: a checkpoint saved with metrics is ranked by `keep_best`)."""
    if run.keep_best is None:
        return {"max_to_keep": run.keep_checkpoints}
    key = run.keep_best
    best = preservation.BestN(get_metric_fn=lambda metrics: metrics[key],
                              reverse=run.best_lower_is_better, n=1,
                              keep_checkpoints_without_metrics=False)
    return {"preservation_policy": preservation.AnyPreservationPolicy(
        [preservation.LatestN(n=run.keep_checkpoints), best])}


def _best_value(run: RunConfig) -> float | None:
    path = os.path.join(run.output_dir, "best.json")
    if run.keep_best is None or not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    return float(record["value"]) if record.get("metric") == run.keep_best else None


def best_step(output_dir: str) -> int | None:
    """The step of the run's best checkpoint by its `keep_best` (None: not set or not measured)."""
    path = os.path.join(output_dir, "best.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return int(json.load(f)["step"])


class _Loop:
    """The step loop: steps, logging, evaluation, checkpoints, SIGTERM and non-finite stops."""

    def __init__(self, run, program, manager, meta, train_iter, eval_data, show_progress,
                 base=None):
        self.run, self.program, self.manager, self.meta = run, program, manager, meta
        self.train_iter, self.eval_data, self.show_progress = train_iter, eval_data, show_progress
        self.state = None
        self.best = _best_value(run)
        self.frozen = () if base is None else (base,)  # LoRA: the base, a last step argument

    def save(self, step: int, metrics: dict | None = None):
        if step in self.manager.all_steps():  # e.g. SIGTERM right after a periodic save
            return
        self.manager.save(step, force=True, metrics=metrics, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state),
            data=ocp.args.JsonSave(self.train_iter.get_state()),
            meta=ocp.args.JsonSave(self.meta)))

    def evaluate_tasks(self) -> dict[str, float]:
        run, p = self.run, self.program
        params, adapters = self.state.params, {}
        if self.frozen:  # LoRA: the live adapters beside the frozen base, applied apart
            params = merge_params(self.frozen[0], params)
            adapters = dict(lora=lora_lib.lora_spec(run.lora),
                            lora_targets=run.lora.target_modules,
                            quantize=run.lora.base_quantization)  # QLoRA: as the base is held
        scores = harness.evaluate_tasks(
            p.config, params, _tokenizer_of(run), run.task_names,
            limit=run.eval_tasks_limit, mesh=p.mesh, include_path=run.eval_tasks_include_path,
            dtype=run.dtype, **adapters)
        return {f"eval/{k}": v for k, v in scores.items()}

    def note_best(self, step: int, measured: dict) -> None:
        """Saves the step's checkpoint with its `keep_best` metric, and best.json if it is the
        best so far (process 0)."""
        run = self.run
        key = run.keep_best if run.keep_best == "eval_loss" else f"eval/{run.keep_best}"
        if key not in measured:
            if run.keep_best != "eval_loss":
                raise ValueError(f"keep_best {run.keep_best!r}: the tasks measured no such "
                                 f"metric (they gave {sorted(measured)})")
            return
        value = float(measured[key])
        self.save(step, {run.keep_best: value})
        better = (self.best is None or (value < self.best if run.best_lower_is_better
                                        else value > self.best))
        if better:
            self.best = value
            if jax.process_index() == 0:
                write_text_atomic(os.path.join(run.output_dir, "best.json"), json.dumps(
                    {"step": step, "metric": run.keep_best, "value": value}))

    def evaluate(self) -> float | None:
        if not self.eval_data:
            return None
        run, p = self.run, self.program
        sums = [p.eval_step(self.state.params, global_batch(b, p.batch_sharding, run.batch_size),
                            *self.frozen)
                for b in self.eval_data]
        sums = jax.device_get(sums)
        return float(sum(s["ce_sum"] for s in sums) / max(sum(s["targets"] for s in sums), 1.0))

    def _log(self, step, metrics, timer, metrics_log, bar):
        """One logged step: metrics with throughput since the last log (`timer`: (time, step))."""
        run = self.run
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed, steps = time.perf_counter() - timer[0], step - timer[1]
        timer = (time.perf_counter(), step)
        if steps > 0:
            values["tokens_per_s"] = run.batch_size * run.seq_len * steps / elapsed
            flops = (lora_lib.lora_flops_per_token(self.program.config, run.seq_len, run.lora)
                     if run.lora is not None else flops_per_token(self.program.config, run.seq_len))
            values["tflops_per_device"] = (flops * values["tokens_per_s"] / jax.device_count()
                                           / 1e12)
            peak = run.peak_tflops_per_device or peak_tflops(jax.devices()[0])
            if peak:
                values["mfu"] = values["tflops_per_device"] / peak
        metrics_log.write(step, values)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                        tok_s=f"{values.get('tokens_per_s', 0):.0f}")
        bar.write(_log_line(step, values))
        return values, timer

    def run_until(self, state, until_step: int | None) -> dict:
        """Steps from the state's step to `until_step` (or total_steps); the run's result."""
        run, program, processes = self.run, self.program, jax.process_count()
        self.state = state
        step = int(jax.device_get(state.step))
        end = min(run.total_steps, until_step if until_step is not None else run.total_steps)
        metrics_log = _Metrics(run.output_dir, step)
        status, last, loss, eval_loss = "done", None, None, None
        timer = None  # (time, step) after the first step of this session: compilation excluded
        bar = tqdm(total=run.total_steps, initial=step, desc="train",
                   disable=not self.show_progress, dynamic_ncols=True)
        try:
            with _StopFlag() as stop, sharding.use_mesh(program.mesh):
                while step < end:
                    local = next(self.train_iter)
                    self.state, metrics = program.train_step(
                        self.state, global_batch(local, program.batch_sharding, run.batch_size),
                        *self.frozen)
                    step += 1
                    bar.update(1)
                    # The previous step's counter: reading it does not wait for the step just
                    # queued.
                    if last is not None and \
                            int(last["nonfinite_in_a_row"]) >= run.max_nonfinite_in_a_row:
                        status = "nonfinite"
                        break
                    last = metrics
                    if timer is None:
                        jax.block_until_ready(metrics)
                        timer = (time.perf_counter(), step)
                    if step % run.log_every == 0 or step == end:
                        values, timer = self._log(step, metrics, timer, metrics_log, bar)
                        loss = values["loss"]
                    measured = {}
                    if run.eval_every and (step % run.eval_every == 0 or step == end) and \
                            self.eval_data:
                        eval_loss = self.evaluate()
                        measured["eval_loss"] = eval_loss
                        bar.write(f"step {step}: eval_loss {eval_loss:.4f}")
                    if run.task_names and run.tasks_every and (
                            step % run.tasks_every == 0 or step == end):
                        scores = self.evaluate_tasks()
                        measured.update(scores)
                        bar.write(f"step {step}: " + ", ".join(
                            f"{k[5:]} {v:.4f}" for k, v in sorted(scores.items())))
                    if measured:
                        metrics_log.write(step, measured)
                        if run.keep_best is not None:
                            self.note_best(step, measured)
                    if step % run.checkpoint_every == 0 or step == end:
                        self.save(step)
                    preempted = stop.set if processes == 1 else \
                        self.manager.reached_preemption(step)
                    if preempted:
                        self.save(step)
                        status = "preempted"
                        bar.write(f"step {step}: SIGTERM, checkpoint saved")
                        break
                if status == "done" and last is not None and \
                        int(last["nonfinite_in_a_row"]) >= run.max_nonfinite_in_a_row:
                    status = "nonfinite"
        finally:
            self.manager.wait_until_finished()
            self.manager.close()
            metrics_log.close()
            bar.close()
        if status == "done" and step < run.total_steps:
            status = "stopped"
        if status == "nonfinite":
            print(f"stopped: {run.max_nonfinite_in_a_row} steps in a row with a non-finite loss "
                  f"or gradient (step {step})")
        return {"status": status, "step": step, "loss": loss, "eval_loss": eval_loss,
                "output_dir": run.output_dir}


def _log_line(step: int, v: dict) -> str:
    parts = [f"step {step}", f"loss {v['loss']:.4f}", f"lr {v['lr']:.3e}",
             f"grad_norm {v['grad_norm']:.3f}"]
    if "tokens_per_s" in v:
        parts.append(f"{v['tokens_per_s']:.0f} tok/s")
    if "mfu" in v:
        parts.append(f"MFU {100 * v['mfu']:.1f}%")
    if v.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    return ", ".join(parts)


def _new_state(run, config, program):
    """Random init or `init_from` (continued training), created directly in the state's shards."""
    if run.init_from is None:
        return program.init_state(jax.random.PRNGKey(run.seed))
    loaded_config, params = load_checkpoint(resolve_checkpoint(run.init_from), dtype=as_dtype(run.param_dtype),
                                            mesh=program.mesh)
    if loaded_config != config:
        raise ValueError(f"init_from {run.init_from}: its model config differs from {run.model} "
                         f"in {_config_diff(loaded_config.to_dict(), config.to_dict())}")
    # Donated: the loaded params become the state's, rather than a second copy beside it.
    return program.state_from_params(params)


def _restore(manager, step, config, run, meta, program, train_iter):
    """The state of checkpoint `step` (and the data position), checked against this run."""
    saved = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    saved_config = Jais2Config.from_dict(saved["model_config"])
    _check_same_lora(saved["run"].get("lora"), run, step)
    if saved_config != config:
        raise ValueError(f"{run.output_dir} holds a checkpoint (step {step}) of a different model: "
                         f"{_config_diff(saved_config.to_dict(), config.to_dict())}; use another "
                         f"output_dir or the model it was made with")
    changed = [k for k in DATA_ORDER_KEYS if saved["run"].get(k) != getattr(run, k)]
    if (saved["run"].get("clip_grad_norm") is None) != (run.clip_grad_norm is None):
        # the optimizer state's structure holds the clipping stage or not
        raise ValueError(f"cannot resume step {step} with clip_grad_norm {run.clip_grad_norm}: the "
                         f"checkpoint was made with clip_grad_norm "
                         f"{saved['run'].get('clip_grad_norm')} (null and a value change the "
                         "optimizer state; any two values work)")
    if changed or saved.get("processes") != meta["processes"]:
        raise ValueError(f"cannot resume the data position of step {step}: "
                         f"{changed or ['process count']} changed since the checkpoint was made")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(program.abstract_state()), data=ocp.args.JsonRestore()))
    train_iter.set_state(restored["data"])
    print(f"resumed from {run.output_dir} at step {step}")
    return restored["state"]


def _check_same_lora(saved: dict | None, run: RunConfig, step: int) -> None:
    """A resumed run keeps its lora block (the adapters' shapes, scale and base depend on it)."""
    now = None if run.lora is None else run.lora.to_dict()
    if saved is None and now is None:
        return
    if saved is None or now is None:
        kind = "a LoRA run" if saved is not None else "a full fine-tune"
        raise ValueError(f"{run.output_dir} holds a checkpoint (step {step}) of {kind}; this run "
                         f"{'has no' if now is None else 'has a'} lora block: use another "
                         "output_dir, or the run config the checkpoint was made with")
    saved = LoraConfig.from_dict(saved).to_dict()
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        detail = ", ".join(f"lora.{k}: {saved.get(k)!r} (checkpoint) vs {now.get(k)!r} (run)"
                           for k in changed)
        raise ValueError(f"cannot resume step {step} of {run.output_dir} with a changed lora "
                         f"block: {detail}; use another output_dir or the checkpoint's lora block")


def _config_diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k != "dtype")
    return ", ".join(f"{k}: {a.get(k)!r} (checkpoint) vs {b.get(k)!r} (run)" for k in keys)


def run_tokenizer_dir(output_dir: str) -> tuple[str | None, list[str]]:
    """(the tokenizer folder inside the run's token store, or None if it cannot be found; the
    places looked at). The store is looked for where it was when the run started (a relative
    `data` resolved there), then as `data` names it from the current directory."""
    directory = os.path.abspath(os.path.join(output_dir, "checkpoints"))
    with ocp.CheckpointManager(directory, item_names=("state", "data", "meta")) as manager:
        step = manager.latest_step()
        if step is None:
            return None, []
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    data = RunConfig.from_dict(meta["run"]).data
    places = [p for p in (meta.get("data_dir"), data) if p]  # data_dir: recorded since 2026-11
    for store in places:
        if os.path.isdir(os.path.join(store, "tokenizer")):
            return os.path.join(store, "tokenizer"), places
    return None, places


def load_trained(output_dir: str, step: int | None = None) -> tuple[Jais2Config, dict, int]:
    """(model config, params, step) of a run's checkpoint (default: the latest), on one device."""
    directory = os.path.abspath(os.path.join(output_dir, "checkpoints"))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {output_dir}")
    with ocp.CheckpointManager(directory, item_names=("state", "data", "meta")) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoints in {output_dir}")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        config = Jais2Config.from_dict(meta["model_config"])
        run = RunConfig.from_dict(meta["run"])
        if run.lora is not None:
            raise ValueError(f"{output_dir} is a LoRA run: its checkpoints hold adapters, not "
                             "weights (training.lora.read_run_adapter reads them; `jais2 export` "
                             "writes them as a PEFT folder or merged)")
        abstract_params = nn.meta.unbox(
            sharding.abstract_params(config, param_dtype=as_dtype(run.param_dtype)))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's
        abstract = jax.eval_shape(lambda p: init_state(p, make_optimizer(run), run.seed),
                                  abstract_params)
        target = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
    return config, state.params, step

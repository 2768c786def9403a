"""Running lm-evaluation-harness tasks on a `Jais2LM`, with our checks on the tasks asked for.

    results = run_tasks(lm, ["arabic"], limit=100)       # lm-eval's results dict
    metrics = evaluate_tasks(config, params, tokenizer, ["hellaswag"])   # {"hellaswag/acc": ...}

Task names are lm-eval's (its registry), YAML files under `include_path`, or our suites in
`configs/eval/` (`arabic`, `english`), always included when that folder exists.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from jais2_jax.evaluation.lm import DEFAULT_BATCH_SIZE, Jais2LM
from jais2_jax.inference.tokenizer import Tokenizer

# The repository's named suites (group YAMLs over lm-eval's tasks).
SUITES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "eval")


class CheckedTaskManager(TaskManager):
    """lm-eval's TaskManager whose `load` names the task that fails: an unknown name, a dataset
    that cannot be read or has no documents."""

    def load(self, tasks):
        names = [t for t in tasks if isinstance(t, str)]
        unknown = [t for t in names if t not in self.all_tasks and not
                   (t.endswith((".yaml", ".yml")) and os.path.isfile(t))]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}: not an lm-eval task, group "
                             "or tag (see `lm_eval ls tasks`), nor a YAML under --include-path")
        try:
            loaded = super().load(tasks)
        except (StopIteration, ValueError, KeyError, OSError) as e:
            for name in names:  # which one: load them one at a time
                try:
                    super().load([name])
                except StopIteration as one:  # what lm-eval raises on an empty data file
                    raise ValueError(f"task {name}: its dataset is empty (no documents)") from one
                except (ValueError, KeyError, OSError) as one:
                    raise ValueError(f"task {name}: its dataset could not be loaded "
                                     f"({type(one).__name__}: {one})") from one
            raise ValueError(f"tasks {names}: could not be loaded ({type(e).__name__}: "
                             f"{e})") from e
        empty = [name for name, task in loaded["tasks"].items() if len(task.eval_docs) == 0]
        if empty:
            raise ValueError(f"task(s) {', '.join(map(str, empty))}: the evaluation split has no "
                             "documents (empty dataset)")
        return loaded


def task_manager(include_path: str | Sequence[str] | None = None) -> TaskManager:
    """lm-eval's task index with `include_path` and our suites (one index per set of folders:
    indexing lm-eval's ~10k YAMLs takes seconds, and the trainer asks again every few steps)."""
    paths = [] if include_path is None else \
        [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    for p in paths:
        if not os.path.isdir(p):
            raise ValueError(f"--include-path {p}: not a folder")
    if os.path.isdir(SUITES_DIR) and SUITES_DIR not in paths:
        paths.append(SUITES_DIR)
    return _indexed(tuple(paths))


@functools.lru_cache(maxsize=8)
def _indexed(paths: tuple[str, ...]) -> TaskManager:
    return CheckedTaskManager(include_path=list(paths) or None)


def check_limit(limit) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) \
            or limit <= 0 or (isinstance(limit, float) and limit > 1 and not limit.is_integer()):
        raise ValueError(f"limit must be a positive number of documents per task (or a fraction "
                         f"in (0, 1]), got {limit!r}")


def run_tasks(lm, tasks: Sequence[str], *, limit=None, num_fewshot: int | None = None,
              include_path=None, apply_chat_template: bool | str = False,
              bootstrap_iters: int = 100000, log_samples: bool = False,
              random_seed: int = 0) -> dict:
    """lm-eval's `simple_evaluate` on `lm` (a Jais2LM or any lm-eval LM): its results dict."""
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise ValueError("no tasks given")
    check_limit(limit)
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    return simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                           task_manager=task_manager(include_path),
                           apply_chat_template=apply_chat_template,
                           bootstrap_iters=bootstrap_iters, log_samples=log_samples,
                           random_seed=random_seed)


def flat_metrics(results: dict) -> dict[str, float]:
    """{"task/metric": value} from lm-eval's results (groups too); a filter other than "none"
    is kept in the name ("gsm8k/exact_match/strict-match"); standard errors are left out."""
    flat = {}
    for section in ("results", "groups"):
        for task, metrics in results.get(section, {}).items():
            for key, value in metrics.items():
                name, _, flt = key.partition(",")
                if not flt or name.endswith("_stderr") or isinstance(value, bool) or \
                        not isinstance(value, (int, float)):
                    continue
                flat[f"{task}/{name}" + ("" if flt == "none" else f"/{flt}")] = float(value)
    return flat


def evaluate_tasks(model_config, params, tokenizer, tasks: Sequence[str], *, limit=None,
                   num_fewshot: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                   mesh=None, include_path=None, dtype: str | None = None,
                   quantize: str | None = None, lora=None,
                   lora_targets=None) -> dict[str, float]:
    """Tasks on parameters already in memory (the trainer's, on its mesh): {"task/metric": value}.

    `tokenizer` is a `jais2_jax.Tokenizer` (or a folder to read one from). `lora` /
    `lora_targets`: `params` hold LoRA adapters beside the kernels (`Jais2LM.from_params`)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.from_pretrained(tokenizer)
    lm = Jais2LM.from_params(model_config, params, tokenizer, mesh=mesh, dtype=dtype,
                             quantize=quantize, batch_size=batch_size, lora=lora,
                             lora_targets=lora_targets)
    results = run_tasks(lm, list(tasks), limit=limit, num_fewshot=num_fewshot,
                        include_path=include_path, bootstrap_iters=0)
    return flat_metrics(results)

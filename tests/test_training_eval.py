"""Evaluation during training (issue 20): `eval_tasks` run lm-eval tasks on the live parameters
and log them; `keep_best` keeps the best checkpoint beside the latest, and `jais2 demo` samples
from it."""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax

from jais2_jax.evaluation.harness import evaluate_tasks
from jais2_jax.training import data
from jais2_jax.training.run_config import RunConfig
from jais2_jax.training.trainer import best_step, load_trained, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the sea is blue and the desert is wide at dawn coffee in the morning with dates".split()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "store"
    data.prepare_data([os.path.join(ROOT, "data", "corpus")], os.path.join(ROOT, "data", "tokenizer"),
                      str(out), eval_fraction=0.1, show_progress=False)
    return str(out)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    rng = np.random.default_rng(0)
    rows = [{"question": " ".join(rng.choice(WORDS, 5)) + "?",
             "choices": [" " + " ".join(rng.choice(WORDS, 1 + (i + j) % 3)) for j in range(3)],
             "answer": i % 3} for i in range(12)]
    with open(folder / "mc.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (folder / "train_mc.yaml").write_text(
        f"task: train_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
        f"{folder / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return str(folder)


def _run(store, out, **kw):
    base = dict(model="jais2-tiny", data=store, output_dir=str(out), seq_len=32, batch_size=8,
                loss_chunk=16, dtype="float32", remat_policy="none", lr=3e-3, warmup_steps=2,
                total_steps=12, log_every=1, eval_every=2, eval_batches=1, checkpoint_every=100,
                keep_checkpoints=1, data_threads=1)
    base.update(kw)
    return RunConfig(**base)


def _records(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_keep_best_keeps_the_lowest_eval_loss_checkpoint_beside_the_latest(store, tmp_path):
    # lr 0.3 overshoots: the held-out loss is lowest at step 2, not at the last step (4)
    out = tmp_path / "run"
    train(_run(store, out, lr=0.3, total_steps=4, keep_best="eval_loss"), show_progress=False)
    evals = {r["step"]: r["eval_loss"] for r in _records(out) if "eval_loss" in r}
    lowest = min(evals, key=evals.get)
    assert best_step(str(out)) == lowest
    steps = sorted(int(s) for s in os.listdir(out / "checkpoints") if s.isdigit())
    assert lowest in steps and 4 in steps and len(steps) <= 2, steps
    assert lowest != 4, evals  # (lr 0.3 overshoots: checked so the next lines mean something)
    if lowest != 4:  # the kept checkpoint is that step's, not the last one's
        _, best_params, step = load_trained(str(out), lowest)
        _, last_params, _ = load_trained(str(out))
        assert step == lowest
        assert any(not np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(best_params), jax.tree.leaves(last_params)))


def test_eval_tasks_log_the_metrics_of_the_live_parameters(store, tasks, tmp_path):
    out = tmp_path / "run"
    run = _run(store, out, total_steps=4, eval_tasks="train_mc", eval_tasks_every=2,
               eval_tasks_include_path=tasks, checkpoint_every=2, keep_checkpoints=3,
               keep_best="train_mc/acc_norm")
    train(run, show_progress=False)
    logged = {r["step"]: r for r in _records(out) if "eval/train_mc/acc" in r}
    assert sorted(logged) == [2, 4]
    for step in (2, 4):  # the same numbers from the checkpoint of that step
        config, params, _ = load_trained(str(out), step)
        scores = evaluate_tasks(config, params, os.path.join(store, "tokenizer"), ["train_mc"],
                                include_path=tasks, dtype="float32")
        assert logged[step]["eval/train_mc/acc"] == pytest.approx(scores["train_mc/acc"], abs=1e-9)
        assert logged[step]["eval/train_mc/acc_norm"] == pytest.approx(
            scores["train_mc/acc_norm"], abs=1e-9)
    best = max((2, 4), key=lambda s: (logged[s]["eval/train_mc/acc_norm"], -s))
    assert best_step(str(out)) == best


@pytest.mark.parametrize("kw, message", [
    (dict(eval_tasks="no_such_task_xyz"), "no_such_task_xyz"),
    (dict(eval_tasks="train_mc", keep_best="other/acc"), "keep_best"),
    (dict(keep_best="eval_loss", eval_every=0), "eval_every"),
    (dict(eval_tasks_limit=0), "eval_tasks_limit"),
])
def test_bad_eval_settings_are_refused_before_any_write(store, tasks, tmp_path, kw, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train(_run(store, out, eval_tasks_include_path=tasks, **kw), show_progress=False)
    assert not out.exists()

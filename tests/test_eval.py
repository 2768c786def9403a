"""lm-evaluation-harness on our jit steps (jais2_jax/evaluation, `jais2 eval`).

The reference is lm-eval's own `hf` model (HFLM) on the same tiny transformers checkpoint and the
same local tasks (YAMLs over jsonl files written here; no network): equal metrics and equal
per-request results (log-likelihoods within 1e-4 in float32, identical generations).
"""

import json
import logging
import math
import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from helpers import hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data", "tokenizer")  # bundled byte-level BPE, 1024 tokens
CONTEXT = 64  # the tiny model's max_position_embeddings: small, so windows and truncation show
WORDS = ["the", "sea", "is", "blue", "and", "the", "desert", "is", "wide", "at", "dawn", ",", "coffee", "in", "the", "morning", "with", "dates", "falcons", "fly", "over", "palms", "while", "rain", "falls", "on", "the", "old", "library", "near", "the", "harbour"]


def _text(rng, n):
    return " ".join(rng.choice(WORDS, n))


def _write_tasks(folder):
    """Three local tasks (multiple choice, rolling perplexity, generate-until) and an empty one."""
    rng = np.random.default_rng(0)
    data = {
        "mc": [{"question": _text(rng, 6 + i % 5) + "?", "choices": [
            " " + _text(rng, 1 + (i + j) % 3) for j in range(4)], "answer": i % 4}
            for i in range(10)]
        # one question far longer than the context: truncated from the left, as hf does
        + [{"question": _text(rng, 120) + "?", "choices": [" blue", " red sea", " wide"],
            "answer": 1}]
        # one-token answers: the requests of a question share one input row
        + [{"question": _text(rng, 5) + "?", "choices": [" the", " sea", " is"], "answer": 2}],
        "ppl": [{"text": _text(rng, n)} for n in (5, 30, 90, 150)],
        "gen": [{"prompt": _text(rng, 4 + i), "target": _text(rng, 2)} for i in range(6)]
        + [{"prompt": _text(rng, 80), "target": "sea"}],
        "empty": [],
    }
    for name, rows in data.items():
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    common = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
              "test_split: test\n")
    (folder / "local_mc.yaml").write_text(
        "task: local_mc\n" + common.format(path=folder / "mc.jsonl") +
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "local_ppl.yaml").write_text(
        "task: local_ppl\n" + common.format(path=folder / "ppl.jsonl") +
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n")
    (folder / "local_gen.yaml").write_text(
        "task: local_gen\n" + common.format(path=folder / "gen.jsonl") +
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: [',', 'dates']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (folder / "local_empty.yaml").write_text(
        "task: local_empty\n" + common.format(path=folder / "empty.jsonl") +
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny transformers checkpoint with the bundled tokenizer, and the local tasks."""
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(TOKENIZER)
    hf = hf_model(3, vocab_size=len(tok), initializer_range=0.2, max_position_embeddings=CONTEXT,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    ckpt = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    tasks = _write_tasks(tmp_path_factory.mktemp("tasks"))
    return ckpt, tasks, hf


def _evaluate(lm, tasks, names, **kwargs):
    from jais2_jax.evaluation.harness import run_tasks
    return run_tasks(lm, names, include_path=str(tasks), bootstrap_iters=0, log_samples=True,
                     **kwargs)


@pytest.fixture(scope="module")
def both(setup):
    """lm-eval's hf model and ours on the three local tasks (float32)."""
    from lm_eval.models.huggingface import HFLM

    from jais2_jax.evaluation.lm import Jais2LM
    ckpt, tasks, _ = setup
    names = ["local_mc", "local_ppl", "local_gen"]
    ref = _evaluate(HFLM(pretrained=str(ckpt), device="cpu", dtype="float32", batch_size=4),
                    tasks, names)
    ours_lm = Jais2LM(str(ckpt), dtype="float32", batch_size=4)
    ours = _evaluate(ours_lm, tasks, names)
    return ref, ours, ours_lm


def _responses(results, task):
    return [(s["doc_id"], s["resps"]) for s in sorted(results["samples"][task],
                                                      key=lambda s: s["doc_id"])]


def test_multiple_choice_equals_lm_eval_hf(both):
    ref, ours, _ = both
    assert ours["results"]["local_mc"] == ref["results"]["local_mc"]
    n = 0
    for (i, want), (j, got) in zip(_responses(ref, "local_mc"), _responses(ours, "local_mc")):
        assert i == j
        for (w,), (g,) in zip(want, got):
            assert abs(float(w[0]) - float(g[0])) < 1e-4, (i, w, g)
            assert bool(w[1]) == bool(g[1]), (i, w, g)
            n += 1
    assert n == 10 * 4 + 3 + 3


def test_rolling_perplexity_equals_lm_eval_hf(both):
    ref, ours, _ = both
    want, got = ref["results"]["local_ppl"], ours["results"]["local_ppl"]
    assert set(want) == set(got)
    for key in want:
        if isinstance(want[key], float):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
    per_doc = [(w[0][0], g[0][0]) for (_, w), (_, g) in
               zip(_responses(ref, "local_ppl"), _responses(ours, "local_ppl"))]
    assert len(per_doc) == 4
    for w, g in per_doc:
        # hf sums each window in float32: past |ll| ~1000 one float32 step (ulp) alone exceeds
        # 1e-4, so the bound is 1e-4 or two ulps of the value, whichever is larger
        assert abs(float(w) - float(g)) <= max(1e-4, 2 * np.spacing(np.float32(abs(w))))
    # the 150-word document spans several windows of the 64-token context
    assert min(float(w) for w, _ in per_doc) < -300


def test_generate_until_equals_lm_eval_hf(both):
    ref, ours, _ = both
    assert ours["results"]["local_gen"] == ref["results"]["local_gen"]
    want, got = _responses(ref, "local_gen"), _responses(ours, "local_gen")
    assert got == want
    texts = [r[0] for _, r in got]
    assert len(texts) == 7 and sum(bool(t) for t in texts) >= 3


def _spy(monkeypatch, module, name, record):
    """Wraps module.name (for the test) so that each call first hands its arguments to record."""
    run = getattr(module, name)

    def spy(*args, **kwargs):
        record(*args, **kwargs)
        return run(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)


def test_generate_until_prefilled_in_groups_equals_lm_eval_hf(setup, both, monkeypatch):
    """Prompts prefilled a few rows at a time (each group as wide as its own longest prompt, then
    put into the batch's cache) generate what lm-eval's hf model does, row for row."""
    from jais2_jax.evaluation import scoring
    ref, _, lm = both
    _, tasks, _ = setup
    calls = []
    monkeypatch.setattr(lm, "truncated", lm.truncated)  # restored after: other tests count it
    monkeypatch.setattr(scoring, "PREFILL_ROWS", 2)
    _spy(monkeypatch, scoring, "_put_rows", lambda cache, new, slots: calls.append(new.lengths))
    ours = _evaluate(lm, tasks, ["local_gen"])
    assert _responses(ours, "local_gen") == _responses(ref, "local_gen")
    assert len(calls) >= 4 and len({int(c.max()) for c in calls}) > 1  # groups of 2, unequal


def test_generate_until_short_last_batch_runs_fewer_rows(setup, both, monkeypatch):
    """A batch size above the task's prompt count (7 prompts at batch 16) generates what lm-eval's
    hf model does, and runs 8 rows (a multiple of the prefill group of 2), not 16."""
    from jais2_jax.evaluation import lm as lm_module
    from jais2_jax.evaluation import scoring
    ref, _, lm = both
    _, tasks, _ = setup
    rows = []
    monkeypatch.setattr(lm, "truncated", lm.truncated)  # restored after: other tests count it
    monkeypatch.setattr(lm, "batch_size_per_device", 16)
    monkeypatch.setattr(scoring, "PREFILL_ROWS", 2)
    _spy(monkeypatch, lm_module, "generate_with_stops",
         lambda model, params, prompts, **kw: rows.append(len(prompts)))
    ours = _evaluate(lm, tasks, ["local_gen"])
    assert _responses(ours, "local_gen") == _responses(ref, "local_gen")
    assert rows == [8]


def test_short_loglikelihood_batches_run_fewer_rows(both, setup, monkeypatch):
    """At batch 32, the multiple-choice and rolling tasks (a few rows each) forward their rows
    rounded up to a multiple of 8, not 32, and score what lm-eval's hf model does."""
    from jais2_jax.evaluation import lm as lm_module
    ref, _, lm = both
    _, tasks, _ = setup
    rows = []
    for name in ("score", "score_packed"):
        _spy(monkeypatch, lm_module, name,
             lambda model, params, ids, *a, **kw: rows.append(ids.shape[0]))
    monkeypatch.setattr(lm, "truncated", lm.truncated)  # restored after: other tests count it
    monkeypatch.setattr(lm, "batch_size_per_device", 32)
    ours = _evaluate(lm, tasks, ["local_mc", "local_ppl"])
    for task in ("local_mc", "local_ppl"):
        want, got = _responses(ref, task), _responses(ours, task)
        assert len(got) == len(want)
        for (_, w), (_, g) in zip(want, got):
            for (wv,), (gv,) in zip(w, g):
                wv, gv = (wv, gv) if task == "local_mc" else ((wv,), (gv,))
                assert abs(float(wv[0]) - float(gv[0])) <= max(
                    1e-4, 2 * np.spacing(np.float32(abs(float(wv[0]))))), (task, wv, gv)
    assert rows and all(r % 8 == 0 and r < 32 for r in rows), rows


def test_generate_with_stops_keeps_rows_in_their_order(setup, both, monkeypatch):
    """Prompts not sorted by length, prefilled in groups of two longest first: each row's reply is
    transformers' greedy reply to that prompt alone, and a stop asked for row 1 stops row 1."""
    import torch

    from jais2_jax.evaluation import scoring
    _, _, hf = setup
    _, _, lm = both
    monkeypatch.setattr(scoring, "PREFILL_ROWS", 2)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 200, n).tolist() for n in (4, 11, 6, 15)]
    stopped = []

    def stop_when(b, tokens):
        if b == 1 and len(tokens) >= 2:
            stopped.append(b)
            return True
        return False

    got = scoring.generate_with_stops(lm.model, lm.params, prompts, max_new_tokens=6,
                                      eos_ids=(), pad_id=0, stop_when=stop_when, chunk=2)
    for b, p in enumerate(prompts):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert got[b] == (want[:2] if b == 1 else want), b
    assert stopped == [1]


def test_requests_past_the_context_are_truncated_from_the_left_with_a_warning(both, caplog):
    from lm_eval.api.instance import Instance
    _, _, lm = both
    # in the parity run: 3 answers of the long question, 1 long generate-until prompt
    assert lm.truncated == 4
    long = " ".join(WORDS * 6)
    request = Instance("loglikelihood", {}, (long, " sea"), 0)
    before = lm.truncated
    with caplog.at_level(logging.WARNING, logger="jais2_jax.evaluation"):
        (logp, _), = lm.loglikelihood([request], disable_tqdm=True)
    assert lm.truncated == before + 1
    assert "truncated from the left" in caplog.text
    # equal to scoring the last 64 tokens of context + continuation directly
    ctx, cont = lm.tok_encode(long), lm.tok_encode(long + " sea")[len(lm.tok_encode(long)):]
    (same, _), = lm._loglikelihood_tokens([(None, (ctx + cont)[-CONTEXT - 1:-len(cont)], cont)])
    assert math.isfinite(logp) and logp == pytest.approx(same, abs=1e-5)



def _loglikelihoods(results, task):
    """Every request's log-likelihood, in document order (multiple choice: (ll, greedy) pairs)."""
    out = []
    for _, resps in _responses(results, task):
        for (r,) in resps:
            out.append(tuple(r) if isinstance(r, (tuple, list)) else (r,))
    return out


def test_a_mesh_of_8_devices_equals_one_device(setup, both):
    """The same tasks with the parameters sharded over 8 (fake CPU) devices, fsdp."""
    import jax

    from jais2_jax.evaluation.lm import Jais2LM
    assert jax.device_count() == 8
    ckpt, tasks, _ = setup
    _, ours, _ = both
    lm = Jais2LM(str(ckpt), dtype="float32", batch_size=4, mesh="fsdp")
    assert lm.batch_size == 8  # rows are split over the mesh: rounded up to its 8 devices
    sharded = _evaluate(lm, tasks, ["local_mc", "local_ppl", "local_gen"])
    assert sharded["results"]["local_mc"] == ours["results"]["local_mc"]
    assert _responses(sharded, "local_gen") == _responses(ours, "local_gen")
    for task in ("local_mc", "local_ppl"):
        want, got = _loglikelihoods(ours, task), _loglikelihoods(sharded, task)
        assert len(want) == len(got) > 0
        for w, g in zip(want, got):
            assert abs(float(w[0]) - float(g[0])) <= max(1e-4, 2 * np.spacing(
                np.float32(abs(float(w[0]))))), task
            assert w[1:] == g[1:]


# -------------------------------------------------------------------------------- CLI and API
@pytest.fixture(scope="module")
def cli_run(setup, tmp_path_factory):
    from jais2_jax.cli import main
    ckpt, tasks, _ = setup
    out = tmp_path_factory.mktemp("out") / "results.json"
    return main(["eval", "--checkpoint", str(ckpt), "--tasks", "local_mc,local_gen",
                 "--include-path", str(tasks), "--output-path", str(out),
                 "--bootstrap-iters", "0", "--batch-size", "8"]), out


def test_cli_prints_the_table_and_writes_results(both, cli_run, capsys):
    ref, _, _ = both
    rc, out = cli_run
    assert rc == 0
    written = json.loads(out.read_text())
    for task in ("local_mc", "local_gen"):
        assert written["results"][task] == ref["results"][task]
    assert not [p for p in os.listdir(out.parent) if p != out.name]  # no temporaries left


def test_cli_table_on_stdout(setup, capsys, tmp_path):
    from jais2_jax.cli import main
    ckpt, tasks, _ = setup
    assert main(["eval", "--checkpoint", str(ckpt), "--tasks", "local_mc", "--include-path",
                 str(tasks), "--bootstrap-iters", "0", "--limit", "3"]) == 0
    table = capsys.readouterr().out
    assert "|local_mc|" in table.replace(" ", "") and "acc_norm" in table


def test_evaluate_tasks_on_params_in_memory_equals_the_cli(setup, cli_run):
    from jais2_jax import Tokenizer, load_checkpoint
    from jais2_jax.evaluation.harness import evaluate_tasks
    ckpt, tasks, _ = setup
    _, out = cli_run
    written = json.loads(out.read_text())["results"]
    config, params = load_checkpoint(str(ckpt), dtype="float32")
    metrics = evaluate_tasks(config, params, Tokenizer.from_pretrained(str(ckpt)),
                             ["local_mc", "local_gen"], include_path=str(tasks), batch_size=4)
    assert metrics == {"local_mc/acc": written["local_mc"]["acc,none"],
                       "local_mc/acc_norm": written["local_mc"]["acc_norm,none"],
                       "local_gen/exact_match": written["local_gen"]["exact_match,none"]}


def _hf_nll(hf, ids):
    """transformers' mean NLL of ids[1:] given the tokens before (one forward)."""
    import torch
    with torch.no_grad():
        out = hf(torch.tensor([ids]), labels=torch.tensor([ids]))
    return float(out.loss)


def test_perplexity_of_a_text_file_equals_transformers(setup, tmp_path, capsys):
    from transformers import PreTrainedTokenizerFast

    from jais2_jax.cli import main
    ckpt, _, hf = setup
    tok = PreTrainedTokenizerFast.from_pretrained(str(ckpt))
    text = "the sea is blue and the desert is wide at dawn, coffee in the morning with dates"
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    ids = [tok.bos_token_id] + tok.encode(text)  # no BOS of its own: predicted from the BOS
    assert len(ids) <= CONTEXT
    out = tmp_path / "ppl.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--perplexity", str(path),
                 "--output-path", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["tokens"] == len(ids) - 1
    assert got["perplexity"] == pytest.approx(math.exp(_hf_nll(hf, ids)), rel=1e-5)
    assert f"perplexity {got['perplexity']:.4f}" in capsys.readouterr().out


def test_perplexity_of_a_token_store_equals_transformers(setup, tmp_path):
    from jais2_jax.cli import main
    from jais2_jax.training.data import TokenStore, prepare_data
    ckpt, _, hf = setup
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(1)
    corpus.write_text("\n\n".join(_text(rng, 8 + i) for i in range(8)), encoding="utf-8")
    prepare_data([str(corpus)], str(ckpt), str(tmp_path / "store"), eval_fraction=0.5, seed=0,
                 show_progress=False)
    store = TokenStore(str(tmp_path / "store"))
    docs = [store.tokens[s][f:f + n].astype(np.int64).tolist()
            for s, f, n in store.documents("eval")]
    assert docs and all(d[0] == 1 and len(d) <= CONTEXT for d in docs)
    # documents are bos + text + eos; the bos is given, the rest predicted
    total = sum(_hf_nll(hf, d) * (len(d) - 1) for d in docs)
    tokens = sum(len(d) - 1 for d in docs)
    out = tmp_path / "ppl.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--perplexity", str(tmp_path / "store"),
                 "--output-path", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["tokens"] == tokens and got["documents"] == len(docs)
    assert got["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, message", [
    (["--tasks", "local_mc,no_such_task"], "unknown task(s) no_such_task"),
    (["--tasks", "local_empty"], "local_empty"),
    (["--tasks", "local_mc", "--limit", "0"], "--limit must be positive"),
])
def test_cli_bad_input_is_one_clear_line(setup, capsys, args, message):
    from jais2_jax.cli import main
    ckpt, tasks, _ = setup
    assert main(["eval", "--checkpoint", str(ckpt), "--include-path", str(tasks)] + args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_empty_dataset_error_names_the_task(setup):
    from jais2_jax.evaluation.harness import run_tasks
    from jais2_jax.evaluation.lm import Jais2LM
    ckpt, tasks, _ = setup
    with pytest.raises(ValueError, match="local_empty.*(no documents|empty)"):
        run_tasks(Jais2LM(str(ckpt), dtype="float32"), ["local_empty"], include_path=str(tasks))


def test_checkpoint_without_tokenizer(setup, tmp_path, capsys):
    from jais2_jax.cli import main
    ckpt, tasks, _ = setup
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ckpt / name, bare / name)
    assert main(["eval", "--checkpoint", str(bare), "--tasks", "local_mc",
                 "--include-path", str(tasks)]) == 1
    assert "has no tokenizer" in capsys.readouterr().err


# -------------------------------------------------------------------------- suites, templates
def test_suites_name_real_lm_eval_tasks():
    import lm_eval
    import yaml

    from jais2_jax.evaluation.harness import SUITES_DIR, task_manager
    index = task_manager().task_index  # lm-eval's tasks and our suites (no datasets are read)
    lm_eval_tasks = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    for suite in ("arabic", "english"):
        assert str(index[suite].yaml_path) == os.path.join(SUITES_DIR, f"{suite}.yaml")
        with open(os.path.join(SUITES_DIR, f"{suite}.yaml"), encoding="utf-8") as f:
            members = yaml.safe_load(f)["task"]
        assert len(members) == 5
        for m in members:  # each one of lm-eval's own tasks or groups
            assert str(index[m].yaml_path).startswith(lm_eval_tasks), (suite, m)


def test_chat_template_equals_transformers(setup, tmp_path):
    from test_tokenizer import CHAT_TEMPLATE
    from transformers import PreTrainedTokenizerFast

    from jais2_jax import Tokenizer, load_checkpoint
    from jais2_jax.evaluation.lm import Jais2LM
    ckpt, _, _ = setup
    tok = PreTrainedTokenizerFast.from_pretrained(str(ckpt))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tmp_path)
    config, params = load_checkpoint(str(ckpt), dtype="float32")
    lm = Jais2LM.from_params(config, params, Tokenizer.from_pretrained(tmp_path))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The sea?"}]
    assert lm.chat_template(True) == CHAT_TEMPLATE
    assert lm.apply_chat_template(chat) == tok.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    prefilled = chat + [{"role": "assistant", "content": "Blue"}]
    assert lm.apply_chat_template(prefilled, add_generation_prompt=False) == \
        tok.apply_chat_template(prefilled, tokenize=False, continue_final_message=True)


def test_lm_eval_command_line_through_python_m(setup):
    """lm-eval has no plugin hook: `python -m jais2_jax.evaluation` registers "jais2" and runs
    lm-eval's own command line."""
    import subprocess
    import sys
    ckpt, tasks, _ = setup
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "jais2_jax.evaluation", "--model", "jais2", "--model_args",
         f"checkpoint={ckpt},dtype=float32", "--tasks", "local_mc", "--include_path", str(tasks),
         "--limit", "4", "--batch_size", "4"], env=env, capture_output=True, text=True,
        cwd=ROOT, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "|local_mc|" in proc.stdout.replace(" ", "") and "acc_norm" in proc.stdout


def test_int8_checkpoint_scores_as_its_dequantized_weights(setup):
    """`quantize="int8"` reaches the model: its log-likelihoods equal those of the float model on
    the dequantized weights (q * scale), and differ from the float checkpoint's."""
    from lm_eval.api.instance import Instance

    from jais2_jax import Tokenizer, load_checkpoint
    from jais2_jax.evaluation.lm import Jais2LM
    from jais2_jax.model.quantize import dequantize
    ckpt, _, _ = setup
    config, qparams = load_checkpoint(str(ckpt), dtype="float32", quantize="int8")
    requests = [Instance("loglikelihood", {}, ("the sea is blue and", c), i)
                for i, c in enumerate([" the desert", " wide at dawn", " coffee"])]
    int8 = Jais2LM(str(ckpt), dtype="float32", quantize="int8").loglikelihood(requests)
    deq = Jais2LM.from_params(config, dequantize(qparams), Tokenizer.from_pretrained(str(ckpt)))
    plain = Jais2LM(str(ckpt), dtype="float32").loglikelihood(requests)
    for (q, _), (d, _), (p, _) in zip(int8, deq.loglikelihood(requests), plain):
        assert abs(q - d) < 1e-4 and abs(q - p) > 1e-4


def test_adapter_scores_as_the_merged_model(setup, tmp_path):
    """`adapter=` (a PEFT LoRA folder) reaches the loader: equal to peft's own merged model."""
    import torch
    from lm_eval.api.instance import Instance
    from peft import LoraConfig, get_peft_model
    from transformers import PreTrainedTokenizerFast

    from jais2_jax.evaluation.lm import Jais2LM
    ckpt, _, _ = setup
    base = hf_model(3, vocab_size=1024, initializer_range=0.2, max_position_embeddings=CONTEXT,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        peft.merge_and_unload().save_pretrained(tmp_path / "merged")
    PreTrainedTokenizerFast.from_pretrained(str(ckpt)).save_pretrained(tmp_path / "merged")
    requests = [Instance("loglikelihood", {}, ("the sea is blue and", c), i)
                for i, c in enumerate([" the desert", " wide at dawn", " coffee"])]
    adapted = Jais2LM(str(ckpt), dtype="float32", adapter=str(tmp_path / "adapter"))
    merged = Jais2LM(str(tmp_path / "merged"), dtype="float32")
    plain = Jais2LM(str(ckpt), dtype="float32")
    for (a, _), (m, _), (p, _) in zip(adapted.loglikelihood(requests),
                                      merged.loglikelihood(requests),
                                      plain.loglikelihood(requests)):
        assert abs(a - m) < 1e-4 and abs(a - p) > 1e-4


@pytest.fixture(scope="module")
def roomy(tmp_path_factory):
    """A tiny checkpoint with room for long contexts (256 positions) and a multiple-choice task
    whose questions are far longer than their answers: the shared-context path's case."""
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(TOKENIZER)
    hf = hf_model(5, vocab_size=len(tok), initializer_range=0.2, max_position_embeddings=256,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    ckpt = tmp_path_factory.mktemp("roomy")
    hf.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    folder = tmp_path_factory.mktemp("roomy_tasks")
    rng = np.random.default_rng(1)
    rows = [{"question": _text(rng, 20 + 7 * i) + "?", "choices": [
        " " + _text(rng, 1 + (i + j) % 6) for j in range(2 + i % 3)], "answer": i % 2}
        for i in range(9)]
    with open(folder / "mc_long.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (folder / "local_mc_long.yaml").write_text(
        "task: local_mc_long\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'mc_long.jsonl'}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return ckpt, folder


def test_answers_sharing_a_context_equal_lm_eval_hf_and_run_it_once(roomy):
    """The answers of a question are packed into one row after their shared context (each sees
    the context and itself only): the same log-likelihoods as lm-eval's hf model, from far fewer
    positions of forward than whole rows."""
    from lm_eval.models.huggingface import HFLM

    from jais2_jax.evaluation.lm import Jais2LM
    ckpt, tasks = roomy
    ref = _evaluate(HFLM(pretrained=str(ckpt), device="cpu", dtype="float32", batch_size=4),
                    tasks, ["local_mc_long"])
    lm = Jais2LM(str(ckpt), dtype="float32", batch_size=4)
    ours = _evaluate(lm, tasks, ["local_mc_long"])
    assert ours["results"]["local_mc_long"] == ref["results"]["local_mc_long"]
    want, got = _loglikelihoods(ref, "local_mc_long"), _loglikelihoods(ours, "local_mc_long")
    assert len(got) == sum(2 + i % 3 for i in range(9))
    for w, g in zip(want, got):
        assert abs(float(w[0]) - float(g[0])) < 1e-4 and bool(w[1]) == bool(g[1]), (w, g)
    # Whole rows would forward every request's padded input; the shared path far less.
    shared = lm.tokens_forwarded
    lm.tokens_forwarded = 0
    lm.SHARED_SUFFIX_MAX = -1  # nothing shared: every request a whole row
    try:
        alone = _evaluate(lm, tasks, ["local_mc_long"])
    finally:
        del lm.SHARED_SUFFIX_MAX
    assert shared < 0.6 * lm.tokens_forwarded, (shared, lm.tokens_forwarded)
    for a, g in zip(_loglikelihoods(alone, "local_mc_long"), got):
        # The same sums over differently laid out rows: float32 rounding only (a few ulps).
        assert abs(float(a[0]) - float(g[0])) <= 1e-6 * abs(float(a[0])), (a, g)
        assert bool(a[1]) == bool(g[1]), (a, g)


def test_questions_are_packed_several_a_row_with_little_padding():
    """The shared path's rows hold as many questions as fit: every question once, no row over
    the width, the width the narrowest that keeps the batches, and (for 500 questions of 100-330
    tokens at 64 rows a batch) under 5% of the forwarded positions padding; one question a row
    at the longest question's width would pad about 30%."""
    from jais2_jax.evaluation.lm import _best_fit, _pack_rows
    rng = np.random.default_rng(0)
    lengths = sorted(rng.integers(100, 331, 500).tolist(), reverse=True)
    width, rows = _pack_rows(lengths, 64, 2 * lengths[0])
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= width for row in rows)
    assert width % 16 == 0 and width >= lengths[0]
    room = -(-len(rows) // 64) * 64
    assert len(_best_fit(lengths, width - 16)) > room  # any narrower needs another batch
    assert sum(lengths) / (room * width) > 0.95
    assert max(len(row) for row in rows) >= 2
    single = -(-len(lengths) // 64) * 64 * (-(-lengths[0] // 16) * 16)
    assert sum(lengths) / single < 0.75

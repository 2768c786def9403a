"""The notebooks run top to bottom on tiny models and show what they claim.

Each notebook is executed with nbclient in a fresh kernel (which inherits conftest's 8 fake CPU
devices). A cell inserted after the `parameters` cell overrides parameters, and a cell appended at
the end prints the values the test checks, as JSON. The notebooks assert their own claims too
(a failing assert fails the run); here the values are checked against references computed outside
the notebook: transformers' `generate` and tokenizer, the state dict's tensor count, the training
run's own evaluation and `generate` on the run's checkpoint.
"""

from __future__ import annotations

import json
import os

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NAMES = ("inference.ipynb", "convert.ipynb", "finetune.ipynb", "lora_sft.ipynb")
MARK = "__notebook_values__"


def _read(name: str):
    return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


def run_notebook(name: str, params: dict, values: list[str]) -> dict:
    """Executes notebook `name` with `params` overridden; returns the named variables."""
    nb = _read(name)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
        "\n".join(f"{k} = {v!r}" for k, v in params.items())))
    nb.cells.append(nbformat.v4.new_code_cell(
        "import json as _json, numpy as _np\n"
        f"print({MARK!r} + _json.dumps({{k: globals()[k] for k in {values!r}}}, "
        "default=lambda o: _np.asarray(o).tolist() if hasattr(o, '__array__') else str(o)))"))
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": NOTEBOOKS}}).execute()
    out = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    return json.loads(out.split(MARK, 1)[1])


@pytest.mark.parametrize("name", NAMES)
def test_saved_without_outputs_and_with_parameters(name):
    nb = _read(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


@pytest.mark.parametrize("name", NAMES)
def test_a_used_work_dir_is_refused_up_front(name, tmp_path):
    """Every notebook writes new folders under WORK_DIR and refuses to overwrite: a folder that
    already holds something (a previous run's outputs) is named before any work is done."""
    from nbclient.exceptions import CellExecutionError
    (tmp_path / "hf").mkdir()
    with pytest.raises(CellExecutionError, match="is not empty"):
        run_notebook(name, {"WORK_DIR": str(tmp_path)}, [])
    assert os.listdir(tmp_path) == ["hf"]


def _hf_new_tokens(hf, ids, mask, n):
    """transformers' greedy continuation [batch, <= n] of left-padded prompts."""
    import torch
    ids = torch.tensor(ids)
    mask = torch.ones_like(ids) if mask is None else torch.tensor(mask)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
    return out[:, ids.shape[1]:].numpy()


def _assert_same_tokens(ours, hf, pad_id):
    """Equal where transformers generated; pad after it stopped (every row hit EOS)."""
    ours = np.asarray(ours)
    np.testing.assert_array_equal(ours[:, :hf.shape[1]], hf)
    assert (ours[:, hf.shape[1]:] == pad_id).all()


def test_inference_notebook_matches_transformers(tmp_path):
    from transformers import AutoTokenizer, Jais2ForCausalLM
    v = run_notebook("inference.ipynb", {"WORK_DIR": str(tmp_path), "MESH": (1, 4, 2)},
                     ["CHECKPOINT", "MAX_NEW_TOKENS", "prompt_ids", "new_tokens", "stream_text",
                      "cli_text", "ids", "mask", "batch_tokens", "same_as_alone", "messages",
                      "chat_ids", "chat_tokens", "calls"])
    hf = Jais2ForCausalLM.from_pretrained(v["CHECKPOINT"]).eval()
    tok = AutoTokenizer.from_pretrained(v["CHECKPOINT"])
    n, pad = v["MAX_NEW_TOKENS"], hf.config.pad_token_id

    # Streamed (on a 1x4x2 mesh), the CLI's text and transformers' generate agree.
    want = _hf_new_tokens(hf, [v["prompt_ids"]], None, n)
    _assert_same_tokens(v["new_tokens"], want, pad)
    assert v["cli_text"] == tok.decode(want[0], skip_special_tokens=True) + "\n" == \
        v["stream_text"] + "\n"

    # A left-padded batch of prompts of different lengths.
    assert len({sum(row) for row in v["mask"]}) == len(v["mask"]) > 1
    _assert_same_tokens(v["batch_tokens"], _hf_new_tokens(hf, v["ids"], v["mask"], n), pad)
    assert v["same_as_alone"] == [True] * len(v["mask"])

    # The chat turn: transformers renders the same ids and continues them the same way.
    conversation, reply = v["messages"][:-1], v["messages"][-1]
    chat_ids = tok.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)
    assert v["chat_ids"] == list(chat_ids)
    want = _hf_new_tokens(hf, [chat_ids], None, n)
    _assert_same_tokens(v["chat_tokens"], want, pad)
    assert reply == {"role": "assistant", "content": tok.decode(want[0], skip_special_tokens=True)}

    # The plot's claim: the first call of a new shape compiles, later calls reuse the program.
    assert v["calls"][0] > 3 * np.median(v["calls"][1:])


def test_convert_notebook_shows_parity_and_bitwise_export(tmp_path):
    from transformers import Jais2ForCausalLM
    v = run_notebook("convert.ipynb", {"WORK_DIR": str(tmp_path), "MESH": (1, 4, 2)},
                     ["HF_DIR", "max_abs_diff", "rel_err", "tensors_equal", "different",
                      "same_values", "mesh_rel_err"])
    assert v["rel_err"] <= 1e-5 and v["mesh_rel_err"] <= 1e-5
    assert v["max_abs_diff"] <= 1e-5  # logits of the tiny model are below 1 in magnitude
    n_tensors = len(Jais2ForCausalLM.from_pretrained(v["HF_DIR"]).state_dict())
    assert v["tensors_equal"] == n_tensors and v["different"] == []
    assert v["same_values"] is True
    assert sorted(os.listdir(tmp_path)) == ["hf", "hf-exported", "orbax"]  # no temporary folders


def test_finetune_notebook_loss_falls(tmp_path):
    import jax

    from jais2_jax import Jais2ForCausalLM, Tokenizer, generate
    from jais2_jax.training.trainer import load_trained
    corpus = os.path.join(os.path.dirname(NOTEBOOKS), "data", "corpus")
    v = run_notebook("finetune.ipynb", {"WORK_DIR": str(tmp_path), "STEPS": 40, "TEXT": [corpus]},
                     ["result", "losses", "loss_before", "loss_after", "PROMPTS", "samples_after"])
    assert v["result"]["status"] == "done" and v["result"]["step"] == 40
    # From ~ln(1024) = 6.93 nats at the random start: the curve falls and so does held-out loss.
    assert v["losses"][-1] < v["losses"][0] - 1.0
    assert v["loss_after"] < v["loss_before"] - 0.5
    # The notebook's held-out loss is the run's own evaluation at its last step.
    assert abs(v["loss_after"] - v["result"]["eval_loss"]) <= 1e-5 * v["loss_after"]

    # "After" samples come from the run's checkpoint: the same prompts and key give the same text.
    config, params, step = load_trained(str(tmp_path / "run"))
    tok = Tokenizer.from_pretrained(str(tmp_path / "start"))
    rows = [[tok.bos_token_id] + tok.encode(p, add_special_tokens=False) for p in v["PROMPTS"]]
    width = max(map(len, rows))
    ids = [[config.pad_token_id] * (width - len(r)) + r for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    new = generate(Jais2ForCausalLM(config), params, ids, attention_mask=mask, max_new_tokens=24,
                   temperature=0.7, top_k=40, rng=jax.random.key(0))
    assert step == 40
    assert v["samples_after"] == [tok.decode(r, skip_special_tokens=True) for r in np.asarray(new)]


def test_lora_sft_notebook_mask_loss_and_reply_match_transformers_peft(tmp_path):
    """The chat example's tokens and assistant mask are transformers'; the held-out loss fell and
    is the run's own evaluation; the exported adapter, loaded by PEFT here (outside the notebook),
    gives the notebook's greedy reply token for token, and the CLI prints that reply."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    v = run_notebook("lora_sft.ipynb", {"WORK_DIR": str(tmp_path)},
                     ["BASE", "ADAPTER", "STEPS", "example", "example_ids", "example_mask",
                      "loss_before", "loss_after", "QUESTION", "MAX_NEW_TOKENS", "ours",
                      "ours_base", "cli_text", "n_adapter"])
    tok = AutoTokenizer.from_pretrained(v["BASE"])

    # (1) The rendered example and its mask: what the loss counts is the assistant's replies,
    # each with the eos that ends it, and nothing else.
    want = tok.apply_chat_template(v["example"], tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True)
    assert v["example_ids"] == list(want["input_ids"])
    assert v["example_mask"] == list(want["assistant_masks"])
    trained = [i for i, m in zip(v["example_ids"], v["example_mask"]) if m]
    assert tok.decode(trained) == "".join(m["content"] + tok.eos_token for m in v["example"]
                                          if m["role"] == "assistant")

    # (2, 3) The held-out loss fell, and the notebook's "after" (the base with the exported
    # adapter merged) is the run's own evaluation at its last step (adapter kept apart).
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in metrics]
    final = [r["eval_loss"] for r in records if r.get("step") == v["STEPS"] and "eval_loss" in r]
    assert len(final) == 1 and abs(v["loss_after"] - final[0]) <= 1e-5 * final[0]
    assert v["loss_after"] < v["loss_before"] - 0.5

    # (4) The export is a PEFT folder: two files, an adapter of the notebook's size.
    assert sorted(os.listdir(v["ADAPTER"])) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(v["BASE"]),
                                           v["ADAPTER"]).eval()
    assert sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n) == \
        v["n_adapter"]

    # (5) transformers + PEFT's greedy reply is the notebook's, and differs from the base's.
    ids = tok.apply_chat_template([{"role": "user", "content": v["QUESTION"]}],
                                  add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        out = peft_model.generate(torch.tensor([ids]), max_new_tokens=v["MAX_NEW_TOKENS"],
                                  do_sample=False)
    reply = out[0, len(ids):].tolist()
    if reply[-1] == tok.eos_token_id:
        reply = reply[:-1]
    assert len(reply) > 0 and v["ours"] == reply and v["ours_base"] != reply
    assert v["cli_text"] == tok.decode(reply, skip_special_tokens=True) + "\n"
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base", "chat-data", "lora-run.yaml", "run"]

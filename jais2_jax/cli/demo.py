"""`jais2 demo`: the embedded default, end to end on a CPU in a few minutes.

1. `prepare-data` on the bundled Arabic + English corpus (data/corpus, data/tokenizer);
2. train a tiny Jais2 (configs/jais2-tiny.json) with configs/tiny-cpu.yaml;
3. sample a few lines from the run's best checkpoint (`keep_best: eval_loss`; jais2_jax.inference.generate);
4. write loss_curve.png (train and eval loss) and samples.txt under the output directory.
"""

from __future__ import annotations

import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "data", "tokenizer")
PROMPTS = ("The desert at dawn", "A good teacher", "الصحراء عند الفجر", "كان البحر دائما")


def add_arguments(parser):
    parser.add_argument("--output-dir", default=None,
                        help="where to write data, checkpoints, loss_curve.png, samples.txt "
                             "(default: runs/demo-<date-time>)")
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny-cpu.yaml"),
                        help="run config (default: configs/tiny-cpu.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run config key, e.g. --set total_steps=100")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from jais2_jax.inference.tokenizer import Tokenizer
    from jais2_jax.model.config import load_model_config
    from jais2_jax.training.data import prepare_data
    from jais2_jax.training.run_config import RunConfig
    from jais2_jax.utils.fsutil import write_text_atomic

    # Every check before minutes of data preparation and training.
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    out = args.output_dir or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    if os.path.exists(os.path.join(out, "samples.txt")):
        raise FileExistsError(f"{out} already holds a finished demo run (samples.txt); choose "
                              "another --output-dir, or delete it to run again")
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; choose another --output-dir")
    store = os.path.join(out, "data")
    run_config = RunConfig.from_yaml(args.config, [f"data={store}", f"output_dir={out}/train",
                                                   *args.set])
    # The prompts and the new tokens must fit the model's positions (the bundled tokenizer is the
    # one prepare-data copies into the store).
    context = load_model_config(run_config.model).max_position_embeddings
    longest = max(map(len, _prompt_rows(Tokenizer.from_pretrained(TOKENIZER))))
    if longest + args.max_new_tokens > context:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} does not fit {run_config.model}: "
                         f"its max_position_embeddings is {context} and the longest demo prompt "
                         f"has {longest} tokens, so at most {context - longest} new tokens")
    print(f"[1/4] prepare-data: data/corpus -> {store}")
    index = prepare_data([os.path.join(ROOT, "data", "corpus")], TOKENIZER, store,
                         eval_fraction=0.1, show_progress=not args.no_progress)

    print(f"[2/4] train: {run_config.model}, {run_config.total_steps} steps of "
          f"{run_config.batch_size} x {run_config.seq_len} tokens")
    from jais2_jax.training.trainer import train
    start = time.perf_counter()
    result = train(run_config, show_progress=not args.no_progress)
    print(f"      {result['status']} at step {result['step']} in {time.perf_counter() - start:.0f} s; "
          f"loss {result['loss']:.3f}, eval loss "
          + ("n/a" if result["eval_loss"] is None else f"{result['eval_loss']:.3f}"))
    note = eval_note(os.path.join(run_config.output_dir, "metrics.jsonl"),
                     index["splits"]["train"]["num_tokens"],
                     run_config.batch_size * run_config.seq_len)
    if note:
        print(note)

    from jais2_jax.training.trainer import best_step
    best = best_step(run_config.output_dir)
    print("[3/4] sample from " + ("the last checkpoint" if best is None else
                                 f"the best checkpoint (step {best}, lowest held-out loss)"))
    samples = _sample(run_config.output_dir, os.path.join(store, "tokenizer"), args.max_new_tokens)
    for prompt, text in samples:
        print(f"  {prompt} -> {text!r}")
    write_text_atomic(os.path.join(out, "samples.txt"),
                      "".join(f"{prompt}{text}\n\n" for prompt, text in samples))

    print("[4/4] loss curve")
    png = _plot(os.path.join(run_config.output_dir, "metrics.jsonl"), os.path.join(out, "loss_curve.png"))
    print(f"done: {png}, {os.path.join(out, 'samples.txt')}, checkpoints in {run_config.output_dir}")
    return 0


def eval_note(metrics_file: str, train_tokens: int, tokens_per_step: int) -> str | None:
    """What the held-out curve of a run says when it turned up: where the eval loss was lowest and
    how often the model had read its training tokens by the end (the bundled corpus is a few
    thousand tokens, which the tiny model memorises). None while the eval loss is still near its
    lowest (within 5%) or with fewer than two evaluations."""
    with open(metrics_file, encoding="utf-8") as f:
        held_out = [(r["step"], r["eval_loss"]) for r in map(json.loads, f) if "eval_loss" in r]
    if len(held_out) < 2:
        return None
    best_step, best = min(held_out, key=lambda r: r[1])
    last_step, last = held_out[-1]
    if last <= 1.05 * best:
        return None
    epochs = last_step * tokens_per_step / train_tokens
    return (f"      eval loss was lowest at step {best_step} ({best:.3f}) and rose to {last:.3f}: by step "
            f"{last_step} the model had read its {train_tokens:,} training tokens {epochs:.0f} times "
            "and memorised them (expect the samples to continue the training text). For a model "
            "that generalises, train on more text: `jais2 prepare-data YOUR_FILES ...`.")


def _prompt_rows(tok) -> list[list[int]]:
    """The prompts' ids. They start like the training documents: bos, then text."""
    return [[tok.bos_token_id] + tok.encode(p, add_special_tokens=False) for p in PROMPTS]


def _sample(train_dir: str, tokenizer_dir: str, max_new_tokens: int) -> list[tuple[str, str]]:
    import jax

    from jais2_jax import Jais2ForCausalLM
    from jais2_jax.inference.generate import generate
    from jais2_jax.inference.tokenizer import Tokenizer
    from jais2_jax.training.trainer import best_step, load_trained
    config, params, _ = load_trained(train_dir, best_step(train_dir))
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    model = Jais2ForCausalLM(config)
    rows = _prompt_rows(tok)
    width = max(map(len, rows))
    pad = config.pad_token_id or 0  # masked out anyway
    ids = [[pad] * (width - len(r)) + r for r in rows]  # left-padded, like HF
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    new = generate(model, params, jax.numpy.asarray(ids), attention_mask=jax.numpy.asarray(mask),
                   max_new_tokens=max_new_tokens, temperature=0.7, top_k=40,
                   rng=jax.random.key(0))
    return [(p, tok.decode(row, skip_special_tokens=True)) for p, row in zip(PROMPTS, new.tolist())]


def _plot(metrics_file: str, png: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(metrics_file, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held_out = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train loss")
    if held_out:
        ax.plot(*zip(*held_out), "o-", label="eval loss (held-out documents)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("tiny Jais2 on the bundled Arabic + English corpus")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, png)
    return png

"""Quality of the quantized weights on a model that has learned something: held-out loss and the KL
divergence of next-token distributions, float32 vs bf16 vs int8 vs fp8 vs nf4 (weights quantized with
`jais2_jax.quantize`, compute in bf16 as inference runs them).

    jais2 demo --output-dir runs/q --set total_steps=60 --no-progress   # a trained tiny model
    python benchmarks/quality_quantized.py runs/q/train                  # the table

Runs on the CPU in a minute. KL(float32 || variant) is averaged over every held-out target token.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a training run's output_dir")
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from jais2_jax import Jais2ForCausalLM, quantize
    from jais2_jax.training import data
    from jais2_jax.training.trainer import load_trained

    config, params, step = load_trained(args.run_dir)
    params = jax.device_get(params)
    store_dir = _data_dir(args.run_dir)
    store = data.TokenStore(store_dir)
    batches = data.eval_batches(store, seq_len=min(128, config.max_position_embeddings - 1),
                                batch_size=4, num_batches=args.batches, process_index=0,
                                process_count=1)
    if not batches:
        raise SystemExit(f"{store_dir} has no eval split")

    def logprobs(model, p, batch):
        logits = model.apply({"params": p}, jnp.asarray(batch["input_ids"]),
                             positions=jnp.asarray(batch["positions"]),
                             segment_ids=jnp.asarray(batch["segment_ids"]))
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    variants = {
        "float32": (Jais2ForCausalLM(config), params),
        "bf16": (Jais2ForCausalLM(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), bf16),
        "int8 (bf16 compute)": (Jais2ForCausalLM(config, dtype=jnp.bfloat16,
                                                 param_dtype=jnp.bfloat16, quantization="int8"),
                                quantize(bf16, "int8")),
        "fp8 (bf16 compute)": (Jais2ForCausalLM(config, dtype=jnp.bfloat16,
                                                param_dtype=jnp.bfloat16, quantization="fp8"),
                               quantize(bf16, "fp8")),
        "nf4 (bf16 compute)": (Jais2ForCausalLM(config, dtype=jnp.bfloat16,
                                                param_dtype=jnp.bfloat16, quantization="nf4"),
                               quantize(bf16, "nf4")),
    }
    ref = [logprobs(*variants["float32"], b) for b in batches]
    rows = []
    for name, (model, p) in variants.items():
        ce = kl = n = 0.0
        for b, lp_ref in zip(batches, ref):
            lp = logprobs(model, p, b)
            mask = jnp.asarray(b["loss_mask"], jnp.float32)
            nll = -jnp.take_along_axis(lp, jnp.asarray(b["targets"])[..., None], axis=-1)[..., 0]
            kl_tok = jnp.sum(jnp.exp(lp_ref) * (lp_ref - lp), axis=-1)
            ce += float(jnp.sum(nll * mask))
            kl += float(jnp.sum(kl_tok * mask))
            n += float(jnp.sum(mask))
        rows.append((name, ce / n, kl / n))
    print(f"run {args.run_dir}, step {step}, {int(n)} held-out tokens of {store_dir}")
    print("| weights | held-out loss | KL(float32 || weights) per token |")
    print("|---|---|---|")
    for name, loss, kl in rows:
        print(f"| {name} | {loss:.4f} | {kl:.2e} |")
    return 0


def _data_dir(run_dir: str) -> str:
    """The token store the run trained on (recorded in its checkpoints' meta)."""
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, "checkpoints")),
                               item_names=("state", "data", "meta")) as manager:
        meta = manager.restore(manager.latest_step(),
                               args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return meta["data_dir"]


if __name__ == "__main__":
    sys.exit(main())

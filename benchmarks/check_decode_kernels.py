"""GPU check of `jais2_jax.decode_kernels`: batch-1 decoding of an 8B-width model (a few layers,
random bf16 weights) with the CUDA decode kernels against the same model through XLA.

Prints the largest relative difference of the logits over the decode steps and whether the greedy
tokens agree (bf16: the two paths round in the same places, but accumulate in different orders).

  python benchmarks/check_decode_kernels.py [--layers 4 --steps 32]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_generate import SHAPE_8B, SHAPE_TINY, random_params  # noqa: E402
from jais2_jax import Jais2Config, init_cache  # noqa: E402
from jais2_jax.decode_kernels import _built, prepare_decode_params  # noqa: E402
from jais2_jax.generate import decode_step, prefill  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    a = ap.parse_args()
    shape = SHAPE_8B if jax.default_backend() == "gpu" else SHAPE_TINY
    config = Jais2Config(**dict(shape, num_hidden_layers=a.layers), bos_token_id=0,
                         eos_token_id=1, pad_token_id=0)
    model, params = random_params(config, jnp.bfloat16)
    fast = model.clone(decode_kernels=True)
    fast_params = prepare_decode_params(params, config)
    print(jax.devices()[0].device_kind, "CUDA kernels built:", _built(), flush=True)
    ids = jnp.asarray(np.random.RandomState(0).randint(2, config.vocab_size, (1, 24)), jnp.int32)
    runs = {}
    for name, m, p in (("xla", model, params), ("cuda", fast, fast_params)):
        cache = init_cache(config, 1, 128, dtype=jnp.bfloat16, per_layer=True)
        logits, cache = prefill(m, p, ids, jnp.ones_like(ids), cache)
        tokens, all_logits = [], []
        tok = jnp.argmax(logits, -1)
        for _ in range(a.steps):
            tokens.append(int(tok[0]))
            logits, cache = decode_step(m, p, tok, cache)
            all_logits.append(np.asarray(logits[0], np.float64))
            tok = jnp.argmax(logits, -1)
        runs[name] = (tokens, np.stack(all_logits))
    (t_x, l_x), (t_c, l_c) = runs["xla"], runs["cuda"]
    agree = next((i for i, (x, c) in enumerate(zip(t_x, t_c)) if x != c), len(t_x))
    first = np.abs(l_c[0] - l_x[0]).max() / np.abs(l_x[0]).max()
    print(f"first decode step: max |logit diff| / max |logit| = {first:.2e}; greedy tokens agree "
          f"for {agree} of {len(t_x)} steps")


if __name__ == "__main__":
    main()

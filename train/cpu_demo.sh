#!/usr/bin/env bash
# The CPU demo, step by step (`jais2 demo` does the same in one command, plus a loss-curve PNG):
# tokenize the bundled corpus, train a tiny Jais2 (about a minute on two idle cores), sample from the checkpoint.
#   bash train/cpu_demo.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/cpu-demo}
jais2 prepare-data data/corpus --tokenizer data/tokenizer --output "$OUT/data" --eval-fraction 0.1
python train/train.py configs/tiny-cpu.yaml --set data="$OUT/data" --set output_dir="$OUT/train"
python - "$OUT" <<'PY'
import sys
import jax.numpy as jnp
from jais2_jax import Jais2ForCausalLM, generate
from jais2_jax.inference.tokenizer import Tokenizer
from jais2_jax.training.trainer import load_trained

out = sys.argv[1]
config, params, step = load_trained(f"{out}/train")
tok = Tokenizer.from_pretrained(f"{out}/data/tokenizer")
for prompt in ("The desert at dawn", "الصحراء عند الفجر"):
    ids = jnp.asarray([[tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)])
    new = generate(Jais2ForCausalLM(config), params, ids, max_new_tokens=40)
    print(f"[step {step}] {prompt} -> {tok.decode(new[0], skip_special_tokens=True)!r}")
PY

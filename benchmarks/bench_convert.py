"""HF -> Orbax conversion: our streaming `jais2 convert` vs the naive way vs a plain copy.

Makes a random bf16 HF checkpoint of the released 8B shape (16.2 GB in 4 safetensors shards,
written directly, no torch), then measures in the same run, each in a fresh subprocess (wall time of
the work and peak RSS, VmHWM, of that child; mapped file pages count as resident):
  copy   read every shard and write the same bytes to another file (64 MB at a time)
  ours   jais2_jax.checkpoint.convert_hf_to_orbax (what `jais2 convert` runs)
  naive  every tensor loaded into one dict (safetensors.numpy.load_file), stacked into our tree,
         saved with ocp.StandardCheckpointer
Goal: ours peak RSS <= 4 GB and wall <= 1.5x copy. Files are warm in the page cache for all three
(they were just written); each output is deleted before the next runs (disk: about 2x the model).

    python benchmarks/bench_convert.py --methods copy,ours   # 8B shape, ~1 minute on a fast host
    python benchmarks/bench_convert.py            # + naive: ~52 GB of RAM, minutes
    python benchmarks/bench_convert.py --tiny     # seconds, for CPU checks
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from jais2_jax.model.config import Jais2Config
from jais2_jax.checkpoint.hf_mapping import tensor_specs

SHAPE_8B = dict(vocab_size=150272, hidden_size=3328, intermediate_size=26624, num_hidden_layers=32,
                num_attention_heads=26, num_key_value_heads=26, max_position_embeddings=8192,
                bos_token_id=0, eos_token_id=150024, pad_token_id=0)
SHAPE_TINY = dict(SHAPE_8B, vocab_size=4096, hidden_size=256, intermediate_size=2048,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  eos_token_id=2)
BF16 = np.dtype(ml_dtypes.bfloat16)


def make_hf_checkpoint(folder: str, config: Jais2Config, shards: int) -> int:
    """Random bf16 weights (values like a trained model's, so compression sees real bits)."""
    from jais2_jax.checkpoint import INDEX_FILE
    from jais2_jax.checkpoint.convert import hf_tensor_order
    from jais2_jax.checkpoint.safetensors_io import write_safetensors
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 25, np.float32) * 0.02).astype(BF16)  # 64 MB of values
    order = hf_tensor_order(config)
    entries = [(name, spec.hf_shape, BF16) for name, spec, _ in order]
    sizes = [math.prod(s) * 2 for _, s, _ in entries]
    per_shard = sum(sizes) / shards
    groups, acc = [[]], 0
    for i, size in enumerate(sizes):
        if groups[-1] and acc + size > per_shard * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(i)
        acc += size

    starts = rng.integers(0, pool.size, len(entries))

    def tensor(i):
        n = sizes[i] // 2
        reps = -(-(n + starts[i]) // pool.size)
        return np.tile(pool, reps)[starts[i]:starts[i] + n].reshape(entries[i][1])

    def write_shard(k):
        members = groups[k]
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(os.path.join(folder, name), [entries[i] for i in members],
                           (tensor(i) for i in members), lambda n: None)
        return {entries[i][0]: name for i in members}

    weight_map = {}
    with concurrent.futures.ThreadPoolExecutor(len(groups)) as executor:  # shards in parallel
        for part in executor.map(write_shard, range(len(groups))):
            weight_map.update(part)
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f)
    config.replace(hf_metadata={"dtype": "bfloat16", "architectures": ["Jais2ForCausalLM"]}).save(
        folder)
    return sum(sizes)


# ------------------------------------------------------------------ the three ways (in a child)
def run_copy(src: str, out: str) -> None:
    os.makedirs(out)
    buf = bytearray(64 << 20)
    for name in sorted(os.listdir(src)):
        with open(os.path.join(src, name), "rb", buffering=0) as fi, \
                open(os.path.join(out, name), "wb", buffering=0) as fo:
            while n := fi.readinto(buf):
                fo.write(memoryview(buf)[:n])


def run_ours(src: str, out: str) -> None:
    from jais2_jax.checkpoint import convert_hf_to_orbax, return_freed_memory_to_os
    return_freed_memory_to_os()  # as `jais2 convert` does
    convert_hf_to_orbax(src, out, progress=False)


def run_naive(src: str, out: str) -> None:
    import orbax.checkpoint as ocp
    from safetensors.numpy import load_file

    from jais2_jax.checkpoint.hf_mapping import params_from_state_dict
    state = {}
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(src, name)))
    params = params_from_state_dict(Jais2Config.from_json_file(src), state)
    del state
    with ocp.StandardCheckpointer() as ck:
        ck.save(os.path.join(os.path.abspath(out), "params"), params)


def _child(method: str, src: str, out: str) -> None:
    t0 = time.perf_counter()
    globals()[f"run_{method}"](src, out)
    wall = time.perf_counter() - t0
    # VmHWM is this process's own peak (ru_maxrss of a child starts at the parent's peak).
    with open("/proc/self/status") as f:
        hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"wall": wall, "rss_gb": hwm_kb / 2**20}))


def measure(method: str, src: str, out: str) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of `method` run in a fresh child process."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import bench_convert as b; "
            f"b._child({method!r}, {src!r}, {out!r})")
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{method} failed (exit code {done.returncode})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["wall"], result["rss_gb"]


def check_output(src: str, out: str, config: Jais2Config) -> None:
    """One layer of the largest stacked weight and the embedding match the HF tensors bitwise."""
    from jais2_jax.checkpoint import HFCheckpoint, OrbaxCheckpoint
    hf, ob = HFCheckpoint(src), OrbaxCheckpoint(out)
    specs = {s.path: s for s in tensor_specs(config)}
    up, emb = specs[("layers", "mlp", "up_proj", "kernel")], specs[("embed_tokens", "embedding")]
    layer = config.num_hidden_layers - 1
    box = (slice(layer, layer + 1),) + tuple(slice(0, n) for n in up.our_shape)
    stored = np.asarray(ob.open(up)[layer].read().result())
    assert np.array_equal(stored.view(np.uint16), hf.read(up, box)[0].view(np.uint16))
    assert np.array_equal(np.asarray(ob.open(emb).read().result()).view(np.uint16),
                          hf.read(emb).view(np.uint16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small model: seconds on a CPU")
    parser.add_argument("--workdir", default=None, help="where to write (default: a /tmp folder)")
    parser.add_argument("--methods", default="copy,ours,naive")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    args = parser.parse_args()
    config = Jais2Config(**(SHAPE_TINY if args.tiny else SHAPE_8B))
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers)
    work = tempfile.mkdtemp(prefix="bench_convert-", dir=args.workdir)
    try:
        src = os.path.join(work, "hf")
        t0 = time.perf_counter()
        total = make_hf_checkpoint(src, config, shards=4)
        print(f"random HF checkpoint: {total / 1e9:.2f} GB bf16 in 4 shards "
              f"({time.perf_counter() - t0:.0f} s to write), {os.cpu_count()} CPUs")
        rows = []
        for method in args.methods.split(","):
            out = os.path.join(work, method)
            wall, rss = measure(method, src, out)
            if method == "ours":
                check_output(src, out, config)
            rows.append((method, wall, rss))
            shutil.rmtree(out)
        copy = dict((m, w) for m, w, _ in rows).get("copy")
        print(f"\n| method | wall s | GB/s | peak RSS GB | wall / copy |\n|---|---|---|---|---|")
        for method, wall, rss in rows:
            ratio = f"{wall / copy:.2f}" if copy else "-"
            print(f"| {method} | {wall:.1f} | {total / 1e9 / wall:.2f} | {rss:.2f} | {ratio} |")
        print("\ngoal for ours: peak RSS <= 4 GB, wall <= 1.5x copy")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

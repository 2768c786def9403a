"""Memory plan: bytes per device of parameters, gradients, optimizer state, activations and KV cache.

Nothing is counted by hand. Shapes come from `jax.eval_shape` of the model's, the optimizer's and
the cache's init; per-device sizes from their NamedShardings on a device-free `AbstractMesh`
(`sharding.bytes_per_device`). Activations are the residuals that the backward pass keeps: the
outputs of `jax.vjp`'s closure (traced with `jax.make_jaxpr`, nothing runs) of the training loss
under the chosen remat policy, traced for ONE device's share (batch / (data*fsdp); heads, kv
heads, mlp and vocab / tensor), which is how the model's activation constraints shard them.

LoRA / QLoRA (`lora=` a LoraConfig): `params` is the frozen base (compute dtype; QLoRA: int8
projections, lm_head and embedding table + scales), `adapters` the trained adapters (param
dtype), gradients (on one device in the compute dtype) and optimizer state are the adapters', and
the residuals are those of the gradient with respect to the adapters only (the base is a constant
of the step: no weight gradients, and no lm_head gradient held).

Estimates, not promises: XLA's temporaries, collective buffers and fragmentation come on top.
The residual trace uses flash-style attention (splash on TPU, cuDNN on GPU: q, k, v, the output
and the softmax statistics are kept, never the [T, T] scores) unless `attention="xla"`.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from jais2_jax.model.cache import as_cache_dtype, init_cache
from jais2_jax.model.config import Jais2Config
from jais2_jax.model.modules import Jais2ForCausalLM
from jais2_jax.model.options import REMAT_POLICIES, ModelOptions, as_dtype
from jais2_jax.parallel import sharding
from jais2_jax.training import lora as lora_lib
from jais2_jax.training.run_config import LoraConfig, RunConfig
from jais2_jax.training.step import compute_copies, make_optimizer, merge_params, train_loss_sums

# name pattern -> (devices from the number in the name, bytes of HBM per device, devices per host,
# the numbers a slice or host group can have). TPU v4/v5p names count TensorCores (2 per chip), in
# whole hosts of 4 chips (v5p-8, v5p-16, ...); v5e/v6e names count chips (1x1, 2x2, 2x4, then
# multiples of 8); GPUs come in hosts of 8, or fewer on one host.
_TPU_V4_V5P = ("a multiple of 8 TensorCores", lambda n: n >= 8 and n % 8 == 0)
_TPU_V5E_V6E = ("1, 4 or a multiple of 8 chips", lambda n: n in (1, 4) or (n >= 8 and n % 8 == 0))
_GPUS = ("1 to 8 GPUs, or a multiple of 8", lambda n: 1 <= n <= 8 or (n > 8 and n % 8 == 0))
MAX_DEVICES = 1 << 17  # far above any pod or cluster: a bound on a typo's device count
_HARDWARE = (
    (r"v5p-(\d+)", lambda n: n // 2, 95e9, 4, _TPU_V4_V5P),
    (r"v4-(\d+)", lambda n: n // 2, 32e9, 4, _TPU_V4_V5P),
    (r"v5e-(\d+)|v5litepod-(\d+)", lambda n: n, 16e9, 4, _TPU_V5E_V6E),
    (r"v6e-(\d+)", lambda n: n, 32e9, 4, _TPU_V5E_V6E),
    (r"(\d+)xh100", lambda n: n, 80e9, 8, _GPUS),
    (r"(\d+)xh200", lambda n: n, 141e9, 8, _GPUS),
    (r"(\d+)xa100", lambda n: n, 80e9, 8, _GPUS),
)
KNOWN_HARDWARE = ("v4-N / v5p-N (N TensorCores, a multiple of 8: v5p-8, v5p-32, v5p-128, ...), "
                  "v5e-N / v5litepod-N / v6e-N (N chips: 1, 4 or a multiple of 8: v5e-256, ...), "
                  "NxH100 / NxH200 / NxA100 (N GPUs: 1 to 8 or a multiple of 8: 8xh100, ...)")


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    devices: int
    bytes_per_device: float
    devices_per_host: int


def hardware(name: str) -> Hardware:
    """`v5p-32` (16 chips), `v5e-256`, `8xh100`, ... -> device count, HBM per device, per host.
    A name of no known kind, or a count no such slice or host group has (`v5p-3`), is a
    ValueError that lists the known names."""
    key = name.lower()
    for pattern, devices, hbm, per_host, (sizes, valid) in _HARDWARE:
        m = re.fullmatch(pattern, key)
        if m:
            count = int(next(g for g in m.groups() if g))
            if not valid(count):
                raise ValueError(f"hardware {name!r}: {count} is not a size this hardware comes in "
                                 f"({sizes}); known: {KNOWN_HARDWARE}; or --devices N")
            n = devices(count)
            if n > MAX_DEVICES:
                raise ValueError(f"hardware {name!r}: {n} devices is beyond any cluster (at most "
                                 f"{MAX_DEVICES})")
            return Hardware(name, n, hbm, min(per_host, n))
    raise ValueError(f"unknown hardware {name!r}: known: {KNOWN_HARDWARE}; or --devices N")


@dataclasses.dataclass(frozen=True)
class Plan:
    mesh: dict
    mode: str
    batch: int
    seq: int
    prefill: int  # decode: prompt tokens per row prefilled at once (train: seq)
    remat: str
    params: int
    grads: int
    opt_state: int
    activations_saved: int  # residuals kept from forward to backward (all layers + loss)
    activations_layer: int  # what one layer holds while its backward runs (or its forward, decode)
    kv_cache: int
    adapters: int = 0  # LoRA: the trained adapters (params is then the frozen base)
    base_kind: str = ""  # LoRA: "bfloat16", "int8" or "nf4" (the frozen base's projections)

    @property
    def total(self) -> int:
        return (self.params + self.adapters + self.grads + self.opt_state
                + self.activations_saved + self.activations_layer + self.kv_cache)


def _residual_bytes(fn, *args) -> int:
    """Bytes of the residuals `jax.vjp(fn, args[0])` keeps for the backward pass (traced only)."""
    closed = jax.make_jaxpr(lambda p, *rest: jax.vjp(lambda p_: fn(p_, *rest), p)[1])(*args)
    inputs = set(closed.jaxpr.invars)
    seen, total = set(), 0
    for v in closed.jaxpr.outvars:
        if type(v).__name__ == "Literal" or v in inputs or v in seen:
            continue
        seen.add(v)
        total += v.aval.size * jnp.dtype(v.aval.dtype).itemsize
    return total


def _local_config(config: Jais2Config, tensor: int) -> Jais2Config:
    """One tensor shard's model: heads, kv heads, mlp and vocab divided (divisibility was checked
    by the parameter shardings)."""
    # Token ids play no part in the shapes; a vocabulary shard may no longer hold them.
    return config.replace(num_attention_heads=config.num_attention_heads // tensor,
                          num_key_value_heads=config.num_key_value_heads // tensor,
                          intermediate_size=config.intermediate_size // tensor,
                          vocab_size=config.vocab_size // tensor, head_dim=config.head_dim,
                          pad_token_id=None, bos_token_id=None, eos_token_id=None)


def _lora_run(lora: LoraConfig, param_dtype, dtype) -> RunConfig:
    return RunConfig(model="-", data="-", output_dir="-", lora=lora,
                     dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(param_dtype).name)


def lora_state_bytes(config: Jais2Config, mesh, lora: LoraConfig, *, param_dtype="float32",
                     dtype="bfloat16", optimizer=None) -> dict[str, int]:
    """Bytes per device of a LoRA step's state: {"base", "adapters", "grads", "opt_state"}, from
    the trees the program builds (`training.lora.abstract_base` / `abstract_adapters`) and their
    shardings; no tracing of the model."""
    run = _lora_run(lora, as_dtype(param_dtype), as_dtype(dtype))
    base, base_sh = lora_lib.abstract_base(config, run, mesh)
    adapters, adapter_sh = lora_lib.abstract_adapters(config, run, mesh)
    optimizer = optimizer or make_optimizer(run)
    opt_sh = sharding.opt_state_shardings(optimizer, adapter_sh, adapters)
    a = sharding.bytes_per_device(adapters, adapter_sh)
    grads = a
    if mesh.size == 1:  # one device: taken at the adapters' compute-dtype copies (compute_copies)
        grads = sharding.bytes_per_device(jax.eval_shape(
            lambda p: compute_copies(p, as_dtype(dtype), adapters=True), adapters), adapter_sh)
    return {"base": sharding.bytes_per_device(base, base_sh), "adapters": a, "grads": grads,
            "opt_state": sharding.bytes_per_device(jax.eval_shape(optimizer.init, adapters),
                                                   opt_sh)}


def _activation_bytes(config, *, batch, seq, remat, dtype, param_dtype, attention, mode,
                      loss_chunk, lora=None) -> tuple[int, int]:
    """(saved residuals of the whole loss, one layer's working set) for one device's share."""
    impl = "splash_interpret" if attention == "flash" and seq % 128 == 0 else "xla"

    def traced_lora(cfg, policy):
        run = _lora_run(lora, param_dtype, dtype)
        model = lora_lib.lora_model(cfg, run, ModelOptions(remat_policy=policy,
                                                           attention_impl=impl))
        base, _ = lora_lib.abstract_base(cfg, run)
        adapters, _ = lora_lib.abstract_adapters(cfg, run)
        ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        data = {"input_ids": ids, "targets": ids,
                "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.int32)}
        return _residual_bytes(
            lambda a, b, d: train_loss_sums(model, merge_params(b, a), d, chunk=loss_chunk,
                                            z_loss=0.0, head_grad=False)[0], adapters, base, data)

    def traced(cfg, policy, loss):
        if loss and lora is not None:
            return traced_lora(cfg, policy)
        model = Jais2ForCausalLM(cfg, dtype=dtype, param_dtype=param_dtype,
                                 options=ModelOptions(remat_policy=policy, attention_impl=impl))
        params = sharding.unboxed_shapes(sharding.abstract_params(cfg, param_dtype=param_dtype))
        ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        if loss:
            data = {"input_ids": ids, "targets": ids,
                    "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.int32)}
            return _residual_bytes(lambda p, b: train_loss_sums(model, p, b, chunk=loss_chunk,
                                                                   z_loss=0.0)[0],
                                   params, data)
        return _residual_bytes(lambda p, i: model.apply({"params": p}, i, method="hidden_states")[0]
                               .astype(jnp.float32).sum(), params, ids)

    # One layer without remat keeps every intermediate: what a rematerialised layer rebuilds for
    # its backward (training), or what a forward layer holds at most (decode): difference of the
    # 2- and 1-layer models.
    layer = traced(config.replace(num_hidden_layers=2), "none", False) - \
        traced(config.replace(num_hidden_layers=1), "none", False)
    if mode == "decode":
        return 0, layer
    saved = traced(config, remat, True)
    return saved, (0 if remat == "none" else layer)


def make_plan(config: Jais2Config, mesh, *, batch: int, seq: int, mode: str = "train",
              remat: str = "dots", param_dtype="float32", dtype="bfloat16",
              cache_dtype="bfloat16", attention: str = "flash", optimizer=None,
              loss_chunk: int = 512, prefill: int | None = None,
              quantize: str | None = None, lora: LoraConfig | None = None) -> Plan:
    """Bytes per device for training (`mode="train"`: params, grads, optimizer state, activations)
    or decoding (`mode="decode"`: params, KV cache of `batch` rows x `seq` slots, one layer's
    activations while prefilling `prefill` (default `seq`) prompt tokens of every row at once).
    `mesh`: a Mesh or an AbstractMesh (`sharding.abstract_mesh`). `quantize` ("int8", "fp8",
    "nf4"): decoding with weight-only quantized projections (values + scales). `lora` (train):
    a LoRA / QLoRA step (see the module doc)."""
    if mode not in ("train", "decode"):
        raise ValueError(f"mode {mode!r}: choose 'train' or 'decode'")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r}: choose one of {sorted(REMAT_POLICIES)}")
    if attention not in ("flash", "xla"):
        raise ValueError(f"attention {attention!r}: choose 'flash' or 'xla'")
    if batch <= 0 or seq <= 0:
        raise ValueError(f"batch and seq must be positive, got {batch}, {seq}")
    if seq > config.max_position_embeddings:
        raise ValueError(f"seq {seq} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    if lora is not None and mode != "train":
        raise ValueError("lora is for training (mode='train')")
    if lora is not None:
        lora_lib.check_lora(config, lora)
    if quantize is not None and mode != "decode":
        raise ValueError(f"quantize {quantize!r} is for decoding (mode='decode'); training keeps "
                         "its weights in param_dtype")
    param_dtype, dtype = as_dtype(param_dtype), as_dtype(dtype)
    cache_dtype = as_cache_dtype(cache_dtype)

    params_sh = sharding.param_shardings(config, mesh)  # raises on an indivisible rule
    abstract = sharding.unboxed_shapes(sharding.abstract_params(config, param_dtype=param_dtype))
    params = sharding.bytes_per_device(abstract, params_sh)
    if quantize is not None:
        params = quantized_param_bytes(config, mesh, param_dtype, quantize)
    sharding.batch_sharding(mesh, (batch, seq))  # the batch must split over data * fsdp
    local_batch = batch // (mesh.shape["data"] * mesh.shape["fsdp"])
    local = _local_config(config, mesh.shape["tensor"])
    if mode == "decode" and prefill is not None and not 0 < prefill <= seq:
        raise ValueError(f"prefill {prefill} must be in [1, seq={seq}]")
    act_seq = prefill if mode == "decode" and prefill else seq
    acts = dict(batch=local_batch, seq=act_seq, remat=remat, dtype=dtype, param_dtype=param_dtype,
                attention=attention, mode=mode, loss_chunk=loss_chunk if act_seq % loss_chunk == 0 else act_seq)
    grads = opt = cache = 0
    if lora is not None:
        st = lora_state_bytes(config, mesh, lora, param_dtype=param_dtype, dtype=dtype,
                              optimizer=optimizer)
        saved, layer = _activation_bytes(local, lora=lora, **acts)
        return Plan(mesh=dict(mesh.shape), mode=mode, batch=batch, seq=seq, prefill=act_seq,
                    remat=remat, params=st["base"], grads=st["grads"], opt_state=st["opt_state"],
                    activations_saved=saved, activations_layer=layer, kv_cache=0,
                    adapters=st["adapters"], base_kind=lora.base_quantization or dtype.name)
    if mode == "train":
        if optimizer is None:  # the trainer's: clipping + AdamW (two float32 moments)
            optimizer = make_optimizer(RunConfig(model="-", data="-", output_dir="-"))
        grads = params  # same tree, dtype and shardings as the parameters
        if mesh.size == 1:  # one device: the layers' kernel gradients in
            # the compute dtype (training.compute_copies)
            grads = sharding.bytes_per_device(
                jax.eval_shape(lambda p: compute_copies(p, dtype), abstract), params_sh)
        opt_sh = sharding.opt_state_shardings(optimizer, params_sh, abstract)
        opt = sharding.bytes_per_device(jax.eval_shape(optimizer.init, abstract), opt_sh)
        saved, layer = _activation_bytes(local, **acts)
        # The fused loss holds the lm_head's gradient (parameter dtype) from forward to backward.
        # The trace counts it whole per tensor shard [D, V / tensor]; it is sharded like the
        # lm_head itself (embed over fsdp too), so count that share instead.
        head = ("embed_tokens", "embedding") if config.tie_word_embeddings else ("lm_head", "kernel")
        traced_dw = config.hidden_size * local.vocab_size * param_dtype.itemsize
        saved += sharding.bytes_per_device(abstract[head[0]][head[1]],
                                           params_sh[head[0]][head[1]]) - traced_dw
    else:
        cache = cache_bytes(config, mesh, batch, seq, cache_dtype)
        saved, layer = _activation_bytes(local, **acts)
        # Prefill keeps only the last position's float32 logits: [batch, vocab / tensor].
        layer += local_batch * local.vocab_size * 4
    return Plan(mesh=dict(mesh.shape), mode=mode, batch=batch, seq=seq, prefill=act_seq, remat=remat,
                params=params, grads=grads, opt_state=opt, activations_saved=saved,
                activations_layer=layer, kv_cache=cache)


def quantized_param_bytes(config: Jais2Config, mesh, param_dtype, scheme: str) -> int:
    """Bytes per device of the parameters with int8 / fp8 / nf4 projections (embeddings, norms and
    biases in `param_dtype`), from the quantized model's own tree and shardings."""
    model = Jais2ForCausalLM(config, param_dtype=as_dtype(param_dtype), quantization=scheme)
    abstract = sharding.unboxed_shapes(sharding.model_abstract_params(model))
    return sharding.bytes_per_device(abstract, sharding.model_param_shardings(model, mesh))


def cache_bytes(config: Jais2Config, mesh, batch: int, seq: int, cache_dtype) -> int:
    """Bytes per device of the KV cache (an int8 cache with its per-head-per-token scales)."""
    cache_dtype = as_cache_dtype(cache_dtype)
    abstract = jax.eval_shape(lambda: init_cache(config, batch, seq, dtype=cache_dtype))
    return sharding.bytes_per_device(abstract, sharding.cache_shardings(
        config, mesh, batch, seq, quantized=cache_dtype == jnp.int8))


def format_plan(plan: Plan, hbm: float | None = None, title: str = "") -> str:
    gb = lambda b: f"{b / 1e9:9.2f} GB"  # noqa: E731
    mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
    rows = [("parameters", plan.params)]
    if plan.adapters:
        rows = [(f"frozen base ({plan.base_kind})", plan.params), ("LoRA adapters", plan.adapters)]
    if plan.mode == "train":
        rows += [("gradients", plan.grads), ("optimizer state", plan.opt_state),
                 (f"activations saved (remat {plan.remat})", plan.activations_saved),
                 ("activations, one layer's backward", plan.activations_layer)]
    else:
        rows += [("KV cache", plan.kv_cache),
                 (f"activations, one layer of a {plan.prefill}-token prefill", plan.activations_layer)]
    lines = [title] if title else []
    lines.append(f"mesh {mesh}; {plan.mode}, batch {plan.batch} x seq {plan.seq}; per device:")
    width = max(len(name) for name, _ in rows) + 2
    lines += [f"  {name:<{width}}{gb(b)}" for name, b in rows]
    total = f"  {'total':<{width}}{gb(plan.total)}"
    if hbm:
        verdict = "fits" if plan.total <= hbm else "does NOT fit"
        total += f"  of {hbm / 1e9:.0f} GB: {verdict} ({100 * plan.total / hbm:.0f}%)"
    lines.append(total)
    return "\n".join(lines)

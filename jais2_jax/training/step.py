"""Training: train state, optimizer, chunked loss, jitted train/eval steps, model FLOPs.

The loss never holds the full logits: `hidden_states` runs the decoder once, then a scan over
sequence chunks makes `[batch, chunk, vocab]` logits at a time (float32, or the compute dtype with
`run.logits_dot_in_fp32=False`; the cross-entropy is float32 either way). The train step's loss
(`train_loss_sums`) also makes the gradient of each chunk there, while its logits are at hand: the
logits' gradient `mask * ((1 + 2 z_loss lse) softmax - onehot)` in the compute dtype, then dh and
dW by two GEMMs; the backward pass only scales them. This drops the lm_head GEMM that a
checkpointed loss recomputes in the backward pass (~6% of the 2B step's FLOPs; 33 ms less GEMM time
a step on an H100, batch 16), at the cost of holding dW (float32, sharded like the lm_head) from the
forward pass to the backward. `loss_sums` (eval, and the tests' cross-check by autodiff) is the
same scan without the fused gradient, each chunk checkpointed.

Model FLOPs per token (`flops_per_token`, used for MFU and by the benchmark):
    6 * matmul_params + 6 * layers * seq_len * heads * head_dim
matmul_params are the q/k/v/o, up/down and lm_head kernels (the embedding table when tied); the
embedding lookup, norms and biases do no matmul work. Attention's two matmuls (QK^T, AV) cost
4 * seq * heads * head_dim per token and layer forward, halved by the causal mask, times 3 for
forward + backward.

The run loop (checkpoints, metrics, resume) is in `jais2_jax.training.trainer`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jais2_jax.kernels.logsumexp import logsumexp
from jais2_jax.model.config import Jais2Config
from jais2_jax.model.layout import unstack_layers
from jais2_jax.model.linear import dot_f32
from jais2_jax.parallel.sharding import on_one_device, opt_state_shardings
from jais2_jax.training.run_config import RunConfig

Array = jax.Array
Batch = dict[str, Array]  # input_ids, targets, loss_mask [B, T]; optional positions, segment_ids


@flax.struct.dataclass
class TrainState:
    step: Array  # int32 []: batches consumed (skipped steps included)
    params: Any
    opt_state: Any
    rng: Array  # uint32 [2]: per-step randomness is fold_in(rng, step), so resume reproduces it
    nonfinite_in_a_row: Array  # int32 []
    nonfinite_total: Array  # int32 []


# --------------------------------------------------------------------------------------- optimizer
def make_schedule(run: RunConfig) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine / linear decay to `lr * min_lr_ratio` (or constant)."""
    peak, decay_steps = run.lr, max(run.total_steps - run.warmup_steps, 1)
    if run.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=run.min_lr_ratio)
    elif run.schedule == "linear":
        decay = optax.linear_schedule(peak, peak * run.min_lr_ratio, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if run.warmup_steps == 0:
        return decay
    # Warmup starts at lr / warmup_steps, not 0: the first step is not wasted.
    warmup = optax.linear_schedule(peak / run.warmup_steps, peak, run.warmup_steps - 1)
    return optax.join_schedules([warmup, decay], [run.warmup_steps])


def decay_mask(params) -> Any:
    """True for kernels and the embedding: norms and biases are not weight-decayed."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key in ("kernel", "embedding"), params)


def make_optimizer(run: RunConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW. Gradient accumulation happens in the train step (a scan
    over micro-batches), so the optimizer sees one update per global batch. A LoRA run's optimizer
    sees only the adapters (all decayed by `lora.weight_decay`; the first moment in
    `lora.mu_dtype` if set)."""
    parts = [] if run.clip_grad_norm is None else [optax.clip_by_global_norm(run.clip_grad_norm)]
    mu_dtype = None
    if run.lora is not None:
        decay, mask = run.lora.weight_decay, None
        mu_dtype = run.lora.mu_dtype and jnp.dtype(run.lora.mu_dtype)
    else:
        decay, mask = run.weight_decay, decay_mask
    parts.append(optax.adamw(make_schedule(run), b1=run.beta1, b2=run.beta2, eps=run.eps,
                             weight_decay=decay, mask=mask, mu_dtype=mu_dtype))
    return optax.chain(*parts)


# -------------------------------------------------------------------------------------------- loss
def loss_sums(model: nn.Module, params, batch: Batch, *, chunk: int,
              logits_f32: bool = True) -> tuple[Array, Array]:
    """(sum of cross-entropy, sum of logsumexp^2) over the targets, weighted by `loss_mask`.

    Cross-entropy in float32, `chunk` positions of every row at a time (see the module doc). Each
    chunk is checkpointed: differentiated, the backward pass recomputes its logits.
    """
    h, w, scale = _hidden_and_head(model, params, batch)
    return _ce_chunks(h, w, scale, batch["targets"], batch["loss_mask"].astype(jnp.float32),
                      min(chunk, h.shape[1]), 0.0, logits_f32, with_grads=False)


def train_loss_sums(model: nn.Module, params, batch: Batch, *, chunk: int, z_loss: float,
                    logits_f32: bool = True, lse_impl: str | None = None,
                    head_grad: bool = True, rngs=None) -> tuple[Array, tuple[Array, Array]]:
    """(sum CE + z_loss * sum lse^2, (sum CE, sum lse^2)): `loss_sums` for training.

    Same values; the gradient with respect to the logits is made in the forward pass, chunk by
    chunk, while each chunk's logits are at hand (`_fused_lm_head_ce`), so the backward pass
    neither recomputes the lm_head GEMM nor re-reads the float32 logits. Only the first output
    is differentiable; the pair is for reporting (its gradient is stopped).

    `head_grad=False` (a frozen lm_head: LoRA) skips the lm_head's weight gradient (one GEMM per
    chunk). `rngs`: the model's rngs (a LoRA adapter's dropout). A quantized lm_head (QLoRA's
    base) is frozen: `head_grad` must then be False.
    """
    h, w, scale = _hidden_and_head(model, params, batch, rngs)
    if scale is not None and head_grad:
        raise ValueError("the lm_head is quantized (int8 values + scales): it can only be frozen "
                         "(head_grad=False, a LoRA run)")
    total, sums = _fused_lm_head_ce(h, w, scale, batch["targets"],
                                    batch["loss_mask"].astype(jnp.float32),
                                    min(chunk, h.shape[1]), float(z_loss), bool(logits_f32),
                                    lse_impl, bool(head_grad))
    sums = jax.lax.stop_gradient(sums)
    return total, (sums[0], sums[1])


def _hidden_and_head(model: nn.Module, params, batch: Batch, rngs=None):
    """Final-norm hidden states [B, T, D] in the compute dtype, the lm_head [D, V] as the tree
    holds it (parameter dtype, or int8 / fp8 values; the tied embedding transposed) and its
    per-vocab scale [V] (None: dense)."""
    hidden, _ = model.apply({"params": params}, batch["input_ids"],
                            positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                            method="hidden_states", rngs=rngs)
    w, scale = model.apply({"params": params}, method="output_projection")
    return hidden.astype(model.dtype), w, scale


# A quantized lm_head is converted to the compute dtype a vocabulary tile at a time, each tile
# at most this many bytes in that dtype, so that the whole head (2.2 GB in bf16 on the 70B
# shape) is never dequantized at once.
HEAD_TILE_BYTES = 256 * 2 ** 20


def head_tiles(hidden: int, vocab: int, itemsize: int) -> int:
    """How many vocabulary tiles a quantized [hidden, vocab] head is used in: the fewest that
    divide `vocab` and keep a tile within HEAD_TILE_BYTES (1 when it fits whole)."""
    for n in range(1, vocab + 1):
        if vocab % n == 0 and hidden * (vocab // n) * itemsize <= HEAD_TILE_BYTES:
            return n
    return vocab


def _tile(x, i, n, axis):
    """Tile i of n of `x` along `axis`: a contiguous slice (coalesced reads, no relayout of the
    table). QLoRA's case is one device or fsdp (the head's embed axis sharded); a vocabulary
    sharded over `tensor` gives the same values (checked on the 8-device CPU mesh) but each tile
    then lives on fewer devices."""
    size = x.shape[axis] // n
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _quantized_head_logits(h_c, q, scale, out_dtype):
    """(h_c . q) * scale, [B, c, D] x [D, V] int8 / fp8 -> [B, c, V] in `out_dtype`: the values
    convert exactly to h_c's dtype a tile at a time, the GEMM accumulates in float32 and the
    scale multiplies its float32 result (as the quantized Linear does)."""
    n = head_tiles(q.shape[0], q.shape[1], h_c.dtype.itemsize)

    def tile(i):
        y = jax.lax.dot_general(h_c, _tile(q, i, n, 1).astype(h_c.dtype), (((2,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)  # [B, c, V / n]
        return (y * _tile(scale, i, n, 0)).astype(out_dtype)

    if n == 1:
        return tile(0)
    tiles = jax.lax.map(tile, jnp.arange(n))  # [n, B, c, V / n]: vocab i * V / n + j at [i, ..., j]
    return jnp.moveaxis(tiles, 0, 2).reshape(h_c.shape[:2] + (q.shape[1],))


def _quantized_head_dh(g, q, scale):
    """g . (q * scale)^T = (g * scale) . q^T, [B, c, V] x [D, V] -> [B, c, D] in g's dtype, a
    vocabulary tile at a time (float32 sum over the tiles)."""
    n = head_tiles(q.shape[0], q.shape[1], g.dtype.itemsize)

    def body(dh, i):
        g_i = (_tile(g, i, n, 2).astype(jnp.float32) * _tile(scale, i, n, 0)).astype(g.dtype)
        return dh + jax.lax.dot_general(g_i, _tile(q, i, n, 1).astype(g.dtype),
                                        (((2,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32), None

    dh, _ = jax.lax.scan(body, jnp.zeros(g.shape[:2] + (q.shape[0],), jnp.float32), jnp.arange(n))
    return dh.astype(g.dtype)


def _ce_chunks(h, w, scale, targets, mask, chunk, z_loss, logits_f32, with_grads, lse_impl=None,
               head_grad=True):
    """Scan over sequence chunks: sums of CE and lse^2 and, `with_grads`, d(total)/dh [B, T, D]
    and d(total)/dw [D, V] (float32). Logits [B, chunk, V], one chunk alive at a time: the GEMM
    returns them in float32, or with `logits_f32=False` in h's dtype (each pass below reads half
    the bytes); the softmax and the loss are float32 either way. `lse_impl`: the logsumexp of the
    fused gradient's pass (`logsumexp.py`; None: by backend). `head_grad=False`: no dw (zero).
    `scale` [V] (not None): w holds int8 / fp8 values, used a vocabulary tile at a time."""
    B, T, D = h.shape
    n = T // chunk
    w_c = w.astype(h.dtype) if scale is None else w  # cast once, not per chunk

    def split(x):  # [B, T, ...] -> [n, B, chunk, ...]
        return x.reshape((B, n, chunk) + x.shape[2:]).swapaxes(0, 1)

    def body(carry, xs):
        ce, z, dw = carry
        h_c, t_c, m_c = xs
        # dot_f32: differentiated (loss_sums), its backward GEMMs stay in the compute dtype
        if scale is not None:
            logits = _quantized_head_logits(h_c, w_c, scale,
                                            jnp.float32 if logits_f32 else h.dtype)
        elif logits_f32:
            logits = dot_f32(h_c, w_c, ((2,), (0,)))  # [B, c, V] float32
        else:  # rounded to h's dtype by the GEMM; each pass below upcasts as it reads
            logits = jax.lax.dot_general(h_c, w_c, (((2,), (0,)), ((), ())),
                                         preferred_element_type=h.dtype)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        # the fused gradient's forward pass is not differentiated: one-pass kernel where it runs
        lse = logsumexp(logits, impl=lse_impl if with_grads else "xla")  # [B, c] float32
        target_logit = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        ce = ce + jnp.sum((lse - target_logit.astype(jnp.float32)) * m_c)
        z = z + jnp.sum(jnp.square(lse) * m_c)
        if not with_grads:
            return (ce, z, dw), None
        # d/dlogits of mask * (lse - logit[t] + z_loss * lse^2) = mask * ((1 + 2 z_loss lse) p - 1[t])
        p = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
        onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == t_c[..., None]
        g = (m_c * (1.0 + 2.0 * z_loss * lse))[..., None] * p - jnp.where(onehot, m_c[..., None], 0.0)
        g = g.astype(h.dtype)
        if scale is not None:
            dh_c = _quantized_head_dh(g, w_c, scale)  # [B, c, D]
        else:
            dh_c = jax.lax.dot_general(g, w_c, (((2,), (1,)), ((), ())),
                                       preferred_element_type=h.dtype)  # [B, c, D]
        if head_grad:
            dw = dw + jax.lax.dot_general(h_c, g, (((0, 1), (0, 1)), ((), ())),
                                          preferred_element_type=jnp.float32)  # [D, V]
            dw = nn.with_logical_constraint(dw, ("embed", "vocab"))  # sharded like the lm_head
        return (ce, z, dw), dh_c

    zero = jnp.zeros((), jnp.float32)
    dw0 = jnp.zeros(w.shape, jnp.float32) if with_grads and head_grad else zero
    # Without the fused gradient the chunk is checkpointed: differentiated by JAX (loss_sums), the
    # backward pass recomputes each chunk's logits instead of keeping them all.
    step = body if with_grads else jax.checkpoint(body)
    (ce, z, dw), dh = jax.lax.scan(step, (zero, zero, dw0), (split(h), split(targets), split(mask)))
    if not with_grads:
        return ce, z
    dh = dh.swapaxes(0, 1).reshape(B, T, D)
    return ce, z, dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _fused_lm_head_ce(h, w, scale, targets, mask, chunk, z_loss, logits_f32, lse_impl, head_grad):
    """h [B, T, D] (compute dtype), w [D, V] (any float dtype, cast once to h's; or int8 / fp8
    values with their `scale` [V], frozen) -> (sum CE + z_loss * sum lse^2, [sum CE, sum lse^2])."""
    ce, z = _ce_chunks(h, w, scale, targets, mask, chunk, z_loss, logits_f32, with_grads=False)
    return ce + z_loss * z, jnp.stack([ce, z])


def _fused_lm_head_ce_fwd(h, w, scale, targets, mask, chunk, z_loss, logits_f32, lse_impl,
                          head_grad):
    ce, z, dh, dw = _ce_chunks(h, w, scale, targets, mask, chunk, z_loss, logits_f32,
                               with_grads=True, lse_impl=lse_impl, head_grad=head_grad)
    dw = dw.astype(w.dtype) if head_grad else None
    return (ce + z_loss * z, jnp.stack([ce, z])), (dh, dw)


def _fused_lm_head_ce_bwd(chunk, z_loss, logits_f32, lse_impl, head_grad, res, cotangents):
    dh, dw = res
    g = cotangents[0]  # the second output is stop_gradient-ed by the only caller
    # Scale in float32: g is 1 / targets, which bf16 would round (a 0.4% bias on every gradient).
    dw = None if dw is None else (dw * g).astype(dw.dtype)  # None: zero (a frozen lm_head)
    # (a quantized head's values and scales are frozen: no cotangent)
    return ((dh.astype(jnp.float32) * g).astype(dh.dtype), dw, None, None, None)


_fused_lm_head_ce.defvjp(_fused_lm_head_ce_fwd, _fused_lm_head_ce_bwd)


def target_count(batch: Batch) -> Array:
    return jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)


# ---------------------------------------------------------------------------------------- the steps
def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    run: RunConfig, *, frozen: bool = False) -> Callable:
    """`train_step(state, batch) -> (state, metrics)`, not yet jitted (see `jit_train_step`).

    Loss = (sum CE + z_loss * sum lse^2) / targets in the whole batch, so accumulating over
    micro-batches gives the gradient of the full batch. A step whose loss or gradient norm is not
    finite leaves params and optimizer state unchanged and is counted.

    `frozen=True` (LoRA, `training/lora.py`): `train_step(state, batch, base)`, where
    `state.params` are the adapters only and `base` (the rest of the model's tree) is an argument
    that is not differentiated: the gradient flows to the adapters alone, and no weight gradient
    of the base (nor of the lm_head) is computed. The adapters' dropout draws from
    fold_in(fold_in(state.rng, step), micro-batch).
    """
    accum, schedule = run.grad_accum_steps, make_schedule(run)
    model, view = layer_view(model, run)
    dropout = frozen and run.lora is not None and run.lora.dropout > 0

    def loss_fn(params, batch, count, base, key):
        full = params if base is None else merge_params(base, params)
        rngs = {"dropout": key} if dropout else None
        total, (ce, z) = train_loss_sums(model, view(full), batch, chunk=run.loss_chunk,
                                         z_loss=run.z_loss, logits_f32=run.logits_dot_in_fp32,
                                         lse_impl=run.kernels, head_grad=not frozen, rngs=rngs)
        return total / count, (ce, z)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch, base=None):
        count = target_count(batch)
        key = jax.random.fold_in(state.rng, state.step)
        # On one device, differentiate with respect to the projections' (or the adapters')
        # compute-dtype copies: the same gradient (see compute_copies), half the bytes to write
        # and to read back (and to hold through the backward pass: 0.4 GB on the 70B QLoRA step).
        params = compute_copies(state.params, model.dtype, adapters=frozen)
        if accum == 1:
            (_, (ce, z)), grads = grad_fn(params, batch, count, base, jax.random.fold_in(key, 0))
        else:
            # [B, T] -> [accum, B / accum, T]: micro-batch a takes rows a, a + accum, ..., so each
            # device keeps its own rows (no resharding under a batch-sharded mesh).
            micro = jax.tree_util.tree_map(
                lambda x: x.reshape((-1, accum) + x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, xs):
                g_sum, ce_sum, z_sum = carry
                mb, a = xs
                (_, (ce, z)), g = grad_fn(params, mb, count, base, jax.random.fold_in(key, a))
                g_sum = jax.tree_util.tree_map(lambda s, g: s + g.astype(s.dtype), g_sum, g)
                return (g_sum, ce_sum + ce, z_sum + z), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            zero = jnp.zeros((), jnp.float32)
            (grads, ce, z), _ = jax.lax.scan(body, (zeros, zero, zero),
                                             (micro, jnp.arange(accum)))
        # float32 again for the norm and the optimizer (XLA converts as it reads; exact)
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, state.params)
        loss = ce / count
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(z)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        def keep(new, old):
            return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)

        applied = state.step - state.nonfinite_total  # optax's count: updates actually applied
        new_state = state.replace(
            step=state.step + 1, params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite_in_a_row=jnp.where(ok, 0, state.nonfinite_in_a_row + 1),
            nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32))
        metrics = {"loss": loss, "z_loss": z / count, "grad_norm": grad_norm,
                   "lr": schedule(applied), "targets": count, "skipped": ~ok,
                   "nonfinite_in_a_row": new_state.nonfinite_in_a_row}
        return new_state, metrics

    return train_step


def merge_params(base, adapters):
    """The model's parameter tree: `base` with the (nested) `adapters` entries added."""
    out = dict(base)
    for key, value in adapters.items():
        out[key] = merge_params(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def compute_copies(params, dtype, *, adapters: bool = False) -> Any:
    """params with the decoder layers' projection kernels (`adapters=True`: a LoRA run's
    adapters, `lora_a` / `lora_b`, which the projections also cast before their GEMMs) cast to
    the compute `dtype`.

    The model casts each kernel to the compute dtype before its GEMM, so the forward pass is the
    same, and the gradient of the float32 kernel is the compute-dtype gradient of that cast,
    upcast; differentiating with respect to the cast copy gives those same values in the compute
    dtype (upcasting them back is exact), so they are stored at half the size. Only kernels under
    `layers*` change: each is used once a layer, while the embedding and the lm_head have float32
    gradients of their own (the lookup's scatter, the fused loss's float32 dW). On a mesh of
    several devices nothing changes: the gradients' cross-device sums stay in float32."""
    dtype = jnp.dtype(dtype)
    if not on_one_device():
        return params

    leaves = ("lora_a", "lora_b") if adapters else ("kernel",)

    def cast(path, x):
        names = [getattr(k, "key", "") for k in path]
        if (names[-1] in leaves and str(names[0]).startswith("layers")
                and x.dtype == jnp.float32 and dtype.itemsize < 4):
            return x.astype(dtype)
        return x
    return jax.tree_util.tree_map_with_path(cast, params)


def layer_view(model: nn.Module, run: RunConfig):
    """(model, params -> params) the steps run: the stacked model as is, or with
    `run.scan_layers=False` its unrolled twin over per-layer slices of the stacked params (the
    state and checkpoints keep the stacked layout; the gradient flows back through the slices)."""
    if run.scan_layers or not model.scan_layers:
        return model, lambda params: params
    return model.with_options(scan_layers=False), unstack_layers


def make_eval_step(model: nn.Module, run: RunConfig) -> Callable[[Any, Batch], dict]:
    """`eval_step(params, batch)`, or `eval_step(adapters, batch, base)` (LoRA; no dropout)."""
    model, view = layer_view(model, run)

    def eval_step(params, batch, base=None):
        if base is not None:
            params = merge_params(base, params)
        ce, _ = loss_sums(model, view(params), batch, chunk=run.loss_chunk,
                          logits_f32=run.logits_dot_in_fp32)
        return {"ce_sum": ce, "targets": jnp.sum(batch["loss_mask"].astype(jnp.float32))}
    return eval_step


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    def zero():  # one buffer per field: the state is donated, and a shared buffer can't be donated twice
        return jnp.zeros((), jnp.int32)
    return TrainState(step=zero(), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.PRNGKey(seed), nonfinite_in_a_row=zero(),
                      nonfinite_total=zero())


def state_shardings(optimizer, params_shardings, abstract_params_) -> TrainState:
    """The TrainState of NamedShardings: params and their optimizer moments sharded alike
    (`sharding.opt_state_shardings`), scalars replicated."""
    from jax.sharding import NamedSharding, PartitionSpec
    mesh = jax.tree_util.tree_leaves(params_shardings)[0].mesh
    rep = NamedSharding(mesh, PartitionSpec())
    return TrainState(step=rep, params=params_shardings,
                      opt_state=opt_state_shardings(optimizer, params_shardings, abstract_params_),
                      rng=rep, nonfinite_in_a_row=rep, nonfinite_total=rep)


def jit_train_step(train_step, state_sharding: TrainState, batch_sharding, base_sharding=None):
    """jit with explicit shardings; the state is donated (updated in place). With
    `base_sharding` (LoRA), the step takes the frozen base as a third argument (not donated)."""
    from jax.sharding import NamedSharding, PartitionSpec
    rep = NamedSharding(batch_sharding.mesh, PartitionSpec())
    shardings = (state_sharding, batch_sharding)
    if base_sharding is not None:
        shardings += (base_sharding,)
    return jax.jit(train_step, in_shardings=shardings,
                   out_shardings=(state_sharding, rep), donate_argnums=0)


# ------------------------------------------------------------------------------------------- FLOPs
def matmul_params(config: Jais2Config) -> int:
    d, f, h, kv, hd = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                       config.num_key_value_heads, config.head_dim)
    per_layer = d * hd * (2 * h + 2 * kv) + 2 * d * f  # q, k, v, o; up, down
    return config.num_hidden_layers * per_layer + config.vocab_size * d  # + lm_head


def flops_per_token(config: Jais2Config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), causal attention; see the module doc."""
    attention = 6 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
    return 6.0 * matmul_params(config) + attention


# Dense bf16 peak of one device (datasheet), by a substring of `device.device_kind`.
PEAK_TFLOPS = (("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("v6", 918.0), ("v5p", 459.0),
               ("v5 lite", 197.0), ("v5e", 197.0), ("v4", 275.0))


def peak_tflops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for key, v in PEAK_TFLOPS if key.lower() in kind.lower()), None)

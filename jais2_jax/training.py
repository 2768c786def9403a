"""Training: train state, optimizer, chunked loss, jitted train/eval steps, model FLOPs.

The loss never holds the full float32 logits: `hidden_states` runs the decoder once, then a
`jax.checkpoint`ed scan over sequence chunks makes `[batch, chunk, vocab]` logits at a time, and
the backward pass recomputes each chunk's logits instead of storing them.

Model FLOPs per token (`flops_per_token`, used for MFU and by the benchmark):
    6 * matmul_params + 6 * layers * seq_len * heads * head_dim
matmul_params are the q/k/v/o, up/down and lm_head kernels (the embedding table when tied); the
embedding lookup, norms and biases do no matmul work. Attention's two matmuls (QK^T, AV) cost
4 * seq * heads * head_dim per token and layer forward, halved by the causal mask, times 3 for
forward + backward.

The run loop (checkpoints, metrics, resume) is in `jais2_jax.trainer`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jais2_jax.config import Jais2Config
from jais2_jax.run_config import RunConfig

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
    over micro-batches), so the optimizer sees one update per global batch."""
    parts = [] if run.clip_grad_norm is None else [optax.clip_by_global_norm(run.clip_grad_norm)]
    parts.append(optax.adamw(make_schedule(run), b1=run.beta1, b2=run.beta2, eps=run.eps,
                             weight_decay=run.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


# -------------------------------------------------------------------------------------------- loss
def loss_sums(model: nn.Module, params, batch: Batch, *, chunk: int) -> tuple[Array, Array]:
    """(sum of cross-entropy, sum of logsumexp^2) over the targets, weighted by `loss_mask`.

    Cross-entropy in float32, `chunk` positions of every row at a time (see the module doc).
    """
    hidden, _ = model.apply({"params": params}, batch["input_ids"],
                            positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                            method="hidden_states")  # [B, T, D]
    B, T, D = hidden.shape
    c = min(chunk, T)
    n = T // c

    def split(x):  # [B, T, ...] -> [n, B, c, ...]
        return x.reshape((B, n, c) + x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_sums(params, h, targets, mask):  # [B, c, D], [B, c], [B, c]
        logits = model.apply({"params": params}, h, method="logits")  # [B, c, V] float32
        lse = jax.nn.logsumexp(logits, axis=-1)  # [B, c]
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - target_logit) * mask), jnp.sum(jnp.square(lse) * mask)

    def body(carry, xs):
        ce, z = chunk_sums(params, *xs)
        return (carry[0] + ce, carry[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (ce, z), _ = jax.lax.scan(body, (zero, zero), (split(hidden), split(batch["targets"]),
                                                   split(batch["loss_mask"].astype(jnp.float32))))
    return ce, z


def target_count(batch: Batch) -> Array:
    return jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)


# ---------------------------------------------------------------------------------------- the steps
def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    run: RunConfig) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`train_step(state, batch) -> (state, metrics)`, not yet jitted (see `jit_train_step`).

    Loss = (sum CE + z_loss * sum lse^2) / targets in the whole batch, so accumulating over
    micro-batches gives the gradient of the full batch. A step whose loss or gradient norm is not
    finite leaves params and optimizer state unchanged and is counted.
    """
    accum, schedule = run.grad_accum_steps, make_schedule(run)

    def loss_fn(params, batch, count):
        ce, z = loss_sums(model, params, batch, chunk=run.loss_chunk)
        return (ce + run.z_loss * z) / count, (ce, z)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        count = target_count(batch)
        if accum == 1:
            (_, (ce, z)), grads = grad_fn(state.params, batch, count)
        else:
            # [B, T] -> [accum, B / accum, T]: micro-batch a takes rows a, a + accum, ..., so each
            # device keeps its own rows (no resharding under a batch-sharded mesh).
            micro = jax.tree_util.tree_map(
                lambda x: x.reshape((-1, accum) + x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, mb):
                g_sum, ce_sum, z_sum = carry
                (_, (ce, z)), g = grad_fn(state.params, mb, count)
                return (jax.tree_util.tree_map(jnp.add, g_sum, g), ce_sum + ce, z_sum + z), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            zero = jnp.zeros((), jnp.float32)
            (grads, ce, z), _ = jax.lax.scan(body, (zeros, zero, zero), micro)
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


def make_eval_step(model: nn.Module, run: RunConfig) -> Callable[[Any, Batch], dict]:
    def eval_step(params, batch):
        ce, _ = loss_sums(model, params, batch, chunk=run.loss_chunk)
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
    from jais2_jax.sharding import opt_state_shardings
    mesh = jax.tree_util.tree_leaves(params_shardings)[0].mesh
    rep = NamedSharding(mesh, PartitionSpec())
    return TrainState(step=rep, params=params_shardings,
                      opt_state=opt_state_shardings(optimizer, params_shardings, abstract_params_),
                      rng=rep, nonfinite_in_a_row=rep, nonfinite_total=rep)


def jit_train_step(train_step, state_sharding: TrainState, batch_sharding):
    """jit with explicit shardings; the state is donated (updated in place)."""
    from jax.sharding import NamedSharding, PartitionSpec
    rep = NamedSharding(batch_sharding.mesh, PartitionSpec())
    return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
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

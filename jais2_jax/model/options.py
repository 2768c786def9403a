"""How the model is computed, as opposed to what it computes: one options object.

`ModelOptions` holds the implementation knobs of `Jais2ForCausalLM` (layer layout, remat policy,
attention and kernel choice, fused q/k/v); none of them changes the function, only its cost. The
remat policies and the dtype names live here too, as the run config validates against them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

# Every projection's output is tagged with its Linear's name (q_proj ... down_proj; q and k after
# RoPE) and the attention output with "attention" (jax.ad_checkpoint.checkpoint_name); for relu^2
# the activation's output is tagged "mlp_act" instead of up_proj's (see relu2). Policies save
# tags, not primitives: the dots sit inside a custom_vjp (dot_f32) and cuDNN attention is a custom
# call, so jax's primitive-based policies (checkpoint_dots) would see nothing to save.
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "mlp_act", "down_proj")
_save = jax.checkpoint_policies.save_only_these_names


def _cudnn_attention_forward(prim, *_, **__) -> bool:
    """Saves what cuDNN's attention forward returns: the output and the softmax statistics its
    backward kernel needs. Saving the output alone (a name) would still re-run the forward kernel
    for the statistics (9 ms a step on the H100 2B bench). attention.py therefore leaves the cuDNN
    output untagged, so it is not kept twice. The primitive's name is JAX's own
    (jax._src.cudnn.fused_attention_stablehlo); were it renamed, the forward would be re-run again,
    which costs time, not correctness."""
    return prim.name.startswith("dot_product_attention_fwd")


def _save_with_attention(*names):
    """Save these names, the "attention" output, and cuDNN attention's forward outputs."""
    return jax.checkpoint_policies.save_from_both_policies(_save(*names, "attention"),
                                                           _cudnn_attention_forward)


REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
    "dots": _save_with_attention(*_PROJECTIONS),  # recompute only norms, RoPE, activation
    "dots_no_batch": _save(*_PROJECTIONS),  # as jax's: projections, not the attention
    "dots_no_mlp": _save_with_attention("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
    # as "full", but each layer's input (tagged "layer_input") goes to pinned host memory in the
    # forward pass and comes back for the backward: the scan's per-layer carries leave the card
    # (2 GB for 70B at 2048 tokens), for runs that fit only just (70B QLoRA on one H100)
    "full_offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"],
        offload_src="device", offload_dst="pinned_host"),
}


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype) -> jnp.dtype:
    """A jnp dtype from a name ("bfloat16") or a dtype."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
        return jnp.dtype(_DTYPES[dtype])
    return jnp.dtype(dtype)


ATTENTION_IMPLS = (None, "xla", "cudnn", "splash", "splash_interpret")
KERNEL_IMPLS = (None, "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Implementation choices of `Jais2ForCausalLM`; the defaults fit training and checkpoints.

    - `scan_layers`: one `nn.scan` over the stacked `layers` tree (the one on-disk layout), or
      (False) the same layer code over per-layer arrays (`unstack_layers(params)`), which GPU
      decoding wants: slicing a layer out of a stacked weight inside jit makes XLA copy it.
    - `remat_policy`: a name of `REMAT_POLICIES` (what the backward pass recomputes).
    - `attention_impl`: None picks by backend (cuDNN on GPU for bf16, XLA otherwise); "xla",
      "cudnn", "splash" (TPU) or "splash_interpret" (the TPU kernel on CPU, for tests).
    - `kernels`: LayerNorm and the MLP's bias + relu^2 backward: Pallas on GPU (None; per device on
      a mesh), "xla" or "pallas".
    - `fuse_qkv`: q/k/v as one GEMM over params from `unstack_layers(fuse_qkv=True)` (inference on
      one device; the fused heads axis is replicated, so keep it off under tensor parallelism).
    """
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str | None = None
    kernels: str | None = None
    fuse_qkv: bool = False

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r}: choose one of "
                             f"{sorted(REMAT_POLICIES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {self.attention_impl!r}: choose one of "
                             f"{ATTENTION_IMPLS}")
        if self.kernels not in KERNEL_IMPLS:
            raise ValueError(f"kernels {self.kernels!r}: choose one of {KERNEL_IMPLS}")
        if self.fuse_qkv and self.scan_layers:
            raise ValueError("fuse_qkv is an inference layout: use it with scan_layers=False and "
                             "unstack_layers(params, fuse_qkv=True)")

    def replace(self, **changes) -> "ModelOptions":
        return dataclasses.replace(self, **changes)

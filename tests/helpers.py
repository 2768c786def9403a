"""Shared test helpers: tiny random transformers Jais2 models and their params in our layout."""

from __future__ import annotations

import threading

import numpy as np

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)


def hf_config(**overrides):
    from transformers import Jais2Config as HFConfig
    kw = dict(TINY)
    kw.update(overrides)
    return HFConfig(**kw)


def hf_model(seed: int = 0, **overrides):
    """A random transformers Jais2ForCausalLM in float32 eval mode. Biases and norms are
    randomised too (HF initialises them to 0/1, which would hide mapping mistakes)."""
    import torch
    from transformers import Jais2ForCausalLM as HFModel
    torch.manual_seed(seed)
    model = HFModel(hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def our_config(hf_model_):
    from jais2_jax import Jais2Config
    return Jais2Config.from_dict(hf_model_.config.to_dict())


def our_params(hf_model_, config):
    from jais2_jax.checkpoint.hf_mapping import params_from_state_dict
    sd = {k: v.detach().cpu().numpy() for k, v in hf_model_.state_dict().items()}
    return params_from_state_dict(config, sd)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def serve(engine, requests, on_first=None):
    """Runs `engine` until every request has ended; returns each request's events."""
    from jais2_jax.serving.engine import Request
    done = threading.Semaphore(0)
    logs = []
    for kw in requests:
        events: list = []

        def emit(ev, events=events):
            events.append(ev)
            if on_first is not None and len(events) == 1:
                on_first(ev)
            if ev[0] in ("done", "error"):
                done.release()
        logs.append(events)
        engine.submit(Request(emit=emit, **kw))
    worker = threading.Thread(target=engine.run)
    worker.start()
    for _ in requests:
        assert done.acquire(timeout=120)
    engine.stop()
    worker.join(timeout=60)
    assert not worker.is_alive()
    return logs

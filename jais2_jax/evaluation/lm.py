"""`Jais2LM`: an lm-evaluation-harness model over our jitted steps, registered as "jais2".

It follows lm-eval's own `hf` model (`lm_eval.models.huggingface.HFLM`) request by request, so
that a number from it means what the same number means from `hf`:
- tokenization: `TemplateLM`'s context/continuation split; no special tokens added to a string
  that already starts with the BOS (prefix) token; an empty context is the prefix token (BOS,
  else EOS);
- `loglikelihood`: the input is `(context + continuation)[-(max_length + 1):][:-1]`, truncated
  from the left when too long (with a warning); float32 log-softmax; the greedy flag compares each
  continuation token with the argmax;
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows of the model's context, the
  prefix token before the first;
- `generate_until`: prompts truncated from the left to `max_length - max_gen_toks`, greedy
  unless the task samples, stopped at the config's (and generation_config.json's) EOS ids and cut
  at the task's stop strings.

Faster than `hf` by batching: requests are sorted by length and batched into a few padded
shapes (so a handful of programs are compiled), and the requests that share a context (the
answers of a multiple-choice question) share one row of the forward: the context once, then each
answer, which sees the context and itself only (`scoring.score_packed`).
"""

from __future__ import annotations

import bisect
import logging
import math
from typing import Any

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from jais2_jax.checkpoint.load import load_checkpoint
from jais2_jax.evaluation import scoring
from jais2_jax.evaluation.scoring import (
    bucket_length,
    generate_with_stops,
    logits_chunk,
    mesh_context,
    next_pow2,
    score,
    score_packed,
)
from jais2_jax.inference.sampling import Sampler
from jais2_jax.inference.tokenizer import Tokenizer
from jais2_jax.model.config import generation_eos_ids
from jais2_jax.model.layout import unstack_layers
from jais2_jax.model.modules import Jais2ForCausalLM
from jais2_jax.model.options import ModelOptions, as_dtype
from jais2_jax.parallel.sharding import make_mesh

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # as lm-eval's hf model


def _round16(n: int) -> int:
    return -(-int(n) // 16) * 16


def _best_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Rows of at most `width` tokens (lists of item indices), best fit over `lengths` in the
    order given (longest first: best fit decreasing)."""
    free: list[tuple[int, int]] = []  # (tokens left, row), sorted
    rows: list[list[int]] = []
    for i, n in enumerate(lengths):
        at = bisect.bisect_left(free, (n, -1))  # the fullest row that still holds it
        if at == len(free):
            rows.append([i])
            left, r = width - n, len(rows) - 1
        else:
            left, r = free.pop(at)
            rows[r].append(i)
            left -= n
        bisect.insort(free, (left, r))
    return rows


def _pack_rows(lengths: list[int], rows_per_batch: int, widest: int) -> tuple[int, list]:
    """(width, rows): items (longest first) packed into rows of one width, `rows_per_batch` rows
    a batch, every batch the same compiled program. For each candidate target (from the longest
    item up to `widest`), the batches are the fewest that rows of that many tokens could hold and
    the width the narrowest (a multiple of 16) with which best fit needs no more rows than those
    batches have; the candidate that forwards the fewest positions wins, ties to the narrower."""
    narrowest = _round16(max(lengths))
    widest = max(narrowest, _round16(widest))
    best = None
    for target in sorted({_round16(narrowest + (widest - narrowest) * k / 4) for k in range(5)}):
        batches = -(-sum(lengths) // (rows_per_batch * target))
        while len(_best_fit(lengths, target)) > batches * rows_per_batch:
            batches += 1
        room = batches * rows_per_batch
        widths = range(narrowest, target + 1, 16)  # the last fits: bisect for the first
        width = widths[bisect.bisect_left(widths, True,
                                          key=lambda w: len(_best_fit(lengths, w)) <= room)]
        if best is None or room * width < best[0] * best[1]:
            best = room, width
    return best[1], _best_fit(lengths, best[1])


def _packed_length(prefix, members) -> int:
    """Tokens of a packed row: the shared context, then every answer's suffix."""
    return len(prefix) + sum(len(m[1]) for m in members)


def _as_batch_size(value) -> int:
    """lm-eval passes batch_size as given on its command line: an int, "8" or "auto"."""
    if value is None or value == "auto" or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size <= 0:
        raise ValueError(f"batch_size must be positive, got {value!r}")
    return size


@register_model("jais2")
class Jais2LM(TemplateLM):
    """`Jais2LM(checkpoint=DIR)` (HF or Orbax folder with its tokenizer), or
    `Jais2LM.from_params(config, params, tokenizer)` for parameters already in memory.

    Options: `dtype` ("float32" / "bfloat16"; default float32 on CPU, else bfloat16), `mesh`
    (a jax Mesh), `quantize` ("int8" / "fp8"), `adapter` (a PEFT folder, merged on load),
    `batch_size`, `max_length` (default: max_position_embeddings), `max_gen_toks`,
    `add_bos_token` (as `hf`'s: None lets the tokenizer decide)."""

    def __init__(self, checkpoint: str | None = None, *, dtype: str | None = None, mesh=None,
                 quantize: str | None = None, adapter: str | None = None,
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 add_bos_token: bool | None = None, _loaded: tuple | None = None,
                 **ignored: Any):
        super().__init__()
        # lm-eval's simple_evaluate adds device / max_batch_size for every model: not ours.
        unknown = sorted(set(ignored) - {"device", "max_batch_size"})
        if unknown:
            raise ValueError(f"jais2 model: unknown model_args {unknown}")
        adapters = {}  # the model's lora / lora_targets, for adapters kept apart in params
        if _loaded is not None:
            config, params, tokenizer, eos, mesh, adapters = _loaded
        else:
            if checkpoint is None:
                raise ValueError("jais2 model: give checkpoint=DIR (an HF or Orbax folder)")
            if isinstance(mesh, str):
                mesh = make_mesh(mesh)
            # The tokenizer first: a checkpoint without one fails before the weights load.
            tokenizer = Tokenizer.from_pretrained(checkpoint)
            dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
            config, params = load_checkpoint(checkpoint, dtype=dtype, mesh=mesh,
                                             quantize=quantize, adapter=adapter)
            eos = generation_eos_ids(checkpoint)
        if dtype is None:
            leaf = params["embed_tokens"]["embedding"]
            dtype = str(leaf.dtype)
        self.config, self.tokenizer, self.mesh = config, tokenizer, mesh
        self.dtype = as_dtype(dtype)
        # Per-layer weights with q/k/v as one GEMM on one accelerator (what `jais2 generate`
        # does: slicing a stacked weight inside jit copies it); scanned layers on a mesh / CPU.
        # Parameters given per layer (`unstack_layers`) are used as they are.
        # (Adapters kept apart stay with the layers as given: q/k/v fused would need them fused.)
        stacked = "layers" in params
        unstack = stacked and jax.default_backend() != "cpu" and mesh is None and not adapters
        self.params = unstack_layers(params, fuse_qkv=True) if unstack else params
        fused = not stacked and "qkv_proj" in self.params.get("layers_0", {}).get("self_attn", {})
        self.model = Jais2ForCausalLM(
            config, dtype=self.dtype, param_dtype=self.dtype, quantization=quantize,
            **adapters,
            options=ModelOptions(scan_layers=stacked and not unstack, fuse_qkv=unstack or fused))
        self.batch_size_per_device = _as_batch_size(batch_size)
        # rows split over the mesh's data and fsdp axes: a multiple of both
        self.batch_size_per_device = -(-self.batch_size_per_device // self._split) * self._split
        self._max_length = int(max_length) if max_length else config.max_position_embeddings
        if self._max_length > config.max_position_embeddings:
            raise ValueError(f"max_length {self._max_length} exceeds the model's "
                             f"max_position_embeddings {config.max_position_embeddings}")
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.eos_ids = tuple(dict.fromkeys(list(config.eos_token_ids) + list(eos)))
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) exceeds the "
                             f"model's vocab_size ({config.vocab_size})")
        self._encoded: dict[str, list[int]] = {}  # strings encoded ahead (`loglikelihood`)
        self.truncated = 0  # requests cut from the left to fit the context, so far
        self.tokens_forwarded = 0  # padded positions the loglikelihood forwards ran, so far

    @classmethod
    def from_params(cls, config, params, tokenizer: Tokenizer, *, mesh=None,
                    dtype: str | None = None, quantize: str | None = None,
                    batch_size: int = DEFAULT_BATCH_SIZE, lora=None, lora_targets=None,
                    **kwargs) -> Jais2LM:
        """The model over parameters already in memory (the trainer's; no checkpoint).

        `lora` (a `LoraSpec`) and `lora_targets` (HF projection names): `params` hold LoRA
        adapters (`lora_a` / `lora_b`) beside the base's kernels, applied apart as in training
        (a LoRA run's live adapters over its frozen, possibly quantized, base)."""
        adapters = {} if lora is None else dict(lora=lora)
        if lora is not None and lora_targets is not None:
            adapters["lora_targets"] = tuple(lora_targets)
        return cls(dtype=dtype, quantize=quantize, batch_size=batch_size,
                   _loaded=(config, params, tokenizer, (), mesh, adapters), **kwargs)

    # ------------------------------------------------------------------ what lm-eval asks
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.config.eos_token_ids[0]

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    @property
    def tokenizer_name(self) -> str:
        return (self.tokenizer.name_or_path or "jais2").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        if isinstance(chat_template, str) and chat_template in self.tokenizer.chat_templates:
            return self.tokenizer.chat_templates[chat_template]
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{self.tokenizer.name_or_path or 'the tokenizer'} has no chat "
                             "template: drop --apply-chat-template")
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """As `hf`: the rendered conversation; without a generation prompt the last (assistant)
        message is continued, the text cut after its content (transformers'
        `continue_final_message`)."""
        text = self.tokenizer.apply_chat_template(chat_history,
                                                  add_generation_prompt=add_generation_prompt)
        if not add_generation_prompt:
            final = chat_history[-1]["content"]
            if final.strip() and final.strip() in text:
                final = final.strip() if final not in text else final
                text = text[: text.rindex(final) + len(final)]
        return text

    def _adds_special_tokens(self, string: str, add_special_tokens: bool | None) -> bool:
        add = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add_special_tokens is None and has_bos_prefix(
                string, self.tokenizer.decode([self.prefix_token_id])):
            add = False
        return True if add is None else bool(add)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None and string in self._encoded:
            ids = list(self._encoded[string])
        else:
            ids = self.tokenizer.encode(
                string, add_special_tokens=self._adds_special_tokens(string, add_special_tokens))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # lm-eval's TemplateLM encodes each request's context and context + continuation one
        # string at a time (most of a multiple-choice pass's host time): encode those strings all
        # at once first, then let it look them up. A string it asks for that is not here (lm-eval
        # changed how it splits) is simply encoded then.
        strings = set()
        for req in requests:
            context, continuation = req.args
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            if context:
                strings.update((context, context + continuation))
        self._encoded = {}
        for add in (True, False):
            batch = [t for t in strings if self._adds_special_tokens(t, None) == add]
            self._encoded.update(zip(batch, self.tokenizer.encode_batch(batch, add)))
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._encoded = {}

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------ scoring
    def _rows(self, n: int, step: int = 8) -> int:
        """Rows a batch of n rows (prompts, packed rows, inputs) runs: the batch size, or, for a
        short last batch, n rounded up to a multiple of `step` (and of the mesh's batch split). A
        few more compiled shapes than the batch size alone, but `--limit 10` at batch 64 runs 16
        rows, not 64, and a task of 1,319 prompts at batch 256 runs 1,344, not 1,536."""
        step = math.lcm(step, self._split)
        return min(self.batch_size, -(-n // step) * step)

    @property
    def _split(self) -> int:
        """How many ways the mesh splits a batch's rows (1 without a mesh)."""
        return 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The model's input for a request: the last max_length tokens before the final one."""
        whole = context + continuation
        if len(whole) > self.max_length + 1:
            self.truncated += 1
            logger.warning("a request of %d tokens (context %d + continuation %d) exceeds the "
                           "model's context of %d: truncated from the left, as lm-eval's hf "
                           "model does", len(whole), len(context), len(continuation),
                           self.max_length)
        return whole[-(self.max_length + 1):][:-1]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        if not requests:
            return []
        for _, _, continuation in requests:
            if not continuation:
                raise ValueError("a loglikelihood request has an empty continuation")
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood (jais2)")
        # Requests that share a context (the answers of a question) score it once; the rest get
        # one row of the forward per distinct input.
        shared, alone = self._split_by_context(requests)
        for width, batch in self._packed_batches(shared):
            for i, answer in self._score_packed(width, batch):
                results[i] = answer
            bar.update(sum(len(members) for row in batch for _, members in row))
        # One row per distinct input; longest first (the first batch is the largest shape).
        inputs: dict[tuple, list[int]] = {}
        for i, inp in alone:
            inputs.setdefault(inp, []).append(i)
        order = sorted(inputs, key=lambda t: (-len(t), t))
        rows_per_batch = self.batch_size
        for at in range(0, len(order), rows_per_batch):
            batch = order[at: at + rows_per_batch]
            members = [(b, i) for b, inp in enumerate(batch) for i in inputs[inp]]
            out = self._score_batch(batch, [(b, requests[i][2]) for b, i in members])
            for (_, i), answer in zip(members, out):
                results[i] = answer
            bar.update(len(members))
        bar.close()
        return results

    # The longest continuation tail (tokens after a shared context) the shared path packs: longer
    # ones (rolling windows) are cheaper as whole rows through the fused attention kernel.
    SHARED_SUFFIX_MAX = 256

    def _split_by_context(self, requests):
        """({context tokens: [(request, suffix tokens, targets)]} for contexts shared by two or
        more requests, [(request, its input tokens)] for the others)."""
        groups: dict[tuple, list] = {}
        for i, (_, context, continuation) in enumerate(requests):
            inp = self._fit(context, continuation)
            c = min(len(continuation), len(inp))  # targets inside the window
            cut = len(inp) - c + 1  # the prefix's last position predicts the first target
            groups.setdefault(tuple(inp[:cut]), []).append(
                (i, inp[cut:], list(continuation[-c:]), inp))
        shared, alone = {}, []
        for prefix, members in groups.items():
            longest = max(len(m[1]) for m in members)
            if len(members) > 1 and longest <= min(len(prefix), self.SHARED_SUFFIX_MAX) and \
                    _packed_length(prefix, members) <= self.max_length:
                shared[prefix] = members
            else:
                alone.extend((m[0], tuple(m[3])) for m in members)
        return shared, alone

    # The shared path's rows are up to this many times the longest question wide: several
    # questions a row, so that little of a batch is padding.
    PACK_WIDER = 2

    def _packed_batches(self, shared):
        """Batches of `batch_size` rows of one width, each row holding one or more questions (a
        context, then all of its answers): (width, [[(context, answers), ...] per row])."""
        if not shared:
            return
        order = sorted(shared, key=lambda p: (-_packed_length(p, shared[p]), p))
        lengths = [_packed_length(p, shared[p]) for p in order]
        width, rows = _pack_rows(lengths, self.batch_size, self.PACK_WIDER * lengths[0])
        rows = [[(order[i], shared[order[i]]) for i in row] for row in rows]
        for at in range(0, len(rows), self.batch_size):
            yield width, rows[at: at + self.batch_size]

    def _score_packed(self, width, batch):
        """A batch of rows, each of questions (context, [(request, suffix, targets)]): a question
        is its context, then every answer's suffix (the continuation but its last token), each
        answer seeing only its context and itself, its positions going on from the context's end.
        Returns [(request, (log-prob, greedy))]."""
        rows = self._rows(len(batch))
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        ids = np.full((rows, width), pad, np.int32)
        positions = np.zeros((rows, width), np.int32)  # padding: position 0, question 0
        docs = np.zeros((rows, width), np.int32)
        parts = np.zeros((rows, width), np.int32)
        members = []  # (row, request, slots predicting its targets, targets)
        for b, questions in enumerate(batch):
            at = 0
            for q, (prefix, group) in enumerate(questions, start=1):
                n, start = len(prefix), at
                ids[b, at:at + n], positions[b, at:at + n] = prefix, np.arange(n)
                docs[b, at:at + n] = q
                at += n
                for s, (i, suffix, targets, _) in enumerate(group, start=1):
                    end = at + len(suffix)
                    ids[b, at:end], docs[b, at:end], parts[b, at:end] = suffix, q, s
                    positions[b, at:end] = np.arange(n, n + len(suffix))
                    members.append((b, i, [start + n - 1] + list(range(at, end)), targets))
                    at = end
        self.tokens_forwarded += ids.size
        *table, chunk = self._target_table([(b, p, t) for b, _, p, t in members], rows)
        with mesh_context(self.mesh):
            logp, greedy = score_packed(self.model, self.params, ids, positions, docs, parts,
                                        *table, chunk=chunk)
        logp, greedy = np.asarray(logp), np.asarray(greedy)
        return [(i, (float(logp[r]), bool(greedy[r]))) for r, (_, i, _, _) in enumerate(members)]

    def _target_table(self, wanted, rows: int):
        """wanted: (row, slots predicting the targets, targets) per request -> the arrays of
        `scoring.score` (rows, picks, targets, target_mask) and its logits chunk. Requests are
        padded to a power-of-two multiple of the rows, targets to a power of two (at least 16:
        fewer compiled shapes, and a 16-wide gather costs nothing next to the forward)."""
        slots = rows * next_pow2(-(-len(wanted) // rows))
        cont = max(16, next_pow2(max(len(t) for _, _, t in wanted)))
        row_of = np.zeros(slots, np.int32)
        picks = np.zeros((slots, cont), np.int32)
        tgt = np.zeros((slots, cont), np.int32)
        tmask = np.zeros((slots, cont), np.int32)
        for r, (b, slots_r, targets) in enumerate(wanted):
            row_of[r] = b
            picks[r, :len(slots_r)] = slots_r
            tgt[r, :len(targets)], tmask[r, :len(targets)] = targets, 1
        return row_of, picks, tgt, tmask, logits_chunk(slots, cont, self.config.vocab_size)

    def _score_batch(self, inputs: list[tuple], targets: list[tuple[int, list[int]]]):
        """inputs: token tuples (one row each); targets: (row, continuation) per request."""
        rows = self._rows(len(inputs))
        longest = max(len(t) for t in inputs)
        width = min(bucket_length(longest), self.max_length)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        ids = np.full((rows, width), pad, np.int32)
        mask = np.zeros((rows, width), np.int32)
        for b, t in enumerate(inputs):
            ids[b, :len(t)], mask[b, :len(t)] = t, 1
        self.tokens_forwarded += ids.size
        wanted = []
        for b, c in targets:
            c = c[-len(inputs[b]):]  # a continuation longer than the context window: its tail
            start = len(inputs[b]) - len(c)  # the slot whose logits predict its first target
            wanted.append((b, range(start, start + len(c)), c))
        *table, chunk = self._target_table(wanted, rows)
        with mesh_context(self.mesh):
            logp, greedy = score(self.model, self.params, ids, mask, *table, chunk=chunk)
        logp, greedy = np.asarray(logp), np.asarray(greedy)
        return [(float(logp[r]), bool(greedy[r])) for r in range(len(targets))]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.rolling_logprobs([self.tok_encode(req.args[0]) for req in requests],
                                     disable_tqdm=disable_tqdm)

    def rolling_logprobs(self, documents: list[list[int]], *, prefix: int | None = None,
                         disable_tqdm: bool = False) -> list[float]:
        """The summed log-probability of every token of each document, each predicted from
        up to max_length tokens before it (lm-eval's disjoint rolling windows), the first from
        `prefix` (default: the prefix token, BOS else EOS)."""
        prefix = self.prefix_token_id if prefix is None else prefix
        windows, owner = [], []
        for n, ids in enumerate(documents):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=list(ids), prefix_token=prefix, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, context, continuation))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(documents)
        for n, (logp, _) in zip(owner, scores):
            totals[n] += logp
        return totals

    # ---------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        order = Collator([r.args for r in requests],
                         sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until (jais2)")
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - max_gen
            if room <= 0:
                raise ValueError(f"max_gen_toks {max_gen} leaves no room for a prompt in the "
                                 f"model's context of {self.max_length} tokens")
            prompts = []
            for text in contexts:
                ids = self.tok_encode(text)
                if len(ids) > room:
                    self.truncated += 1
                    logger.warning("a prompt of %d tokens exceeds the model's context of %d less "
                                   "max_gen_toks %d: truncated from the left, as lm-eval's hf "
                                   "model does", len(ids), self.max_length, max_gen)
                    ids = ids[-room:]
                prompts.append(ids)
            sampler = Sampler()
            if kwargs.get("do_sample") and float(kwargs.get("temperature", 0.0)) > 0:
                sampler = Sampler(float(kwargs["temperature"]), kwargs.get("top_k"),
                                  kwargs.get("top_p"))
            stops, real = [s for s in until if s], len(prompts)

            def stop_when(b, tokens, stops=stops, real=real):
                # padding rows (a short last batch) stop at once
                return b >= real or any(s in self.tok_decode(tokens) for s in stops)

            pad = self.config.pad_token_id if self.config.pad_token_id is not None else \
                self.eos_ids[0] if self.eos_ids else 0
            rows = self._rows(len(prompts), scoring.PREFILL_ROWS)  # whole prefill groups
            padded = prompts + [prompts[-1]] * (rows - len(prompts))
            new = generate_with_stops(self.model, self.params, padded, max_new_tokens=max_gen,
                                      eos_ids=self.eos_ids, pad_id=int(pad),
                                      stop_when=stop_when,
                                      sampler=sampler, rng=jax.random.key(1234), mesh=self.mesh)
            for tokens in new[:len(prompts)]:
                results.append(postprocess_generated_text(self.tok_decode(tokens), until, None))
            bar.update(len(prompts))
        bar.close()
        return order.get_original(results)

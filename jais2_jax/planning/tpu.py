"""Compiler-checked plans: the project's real jitted train step (or prefill + decode step),
AOT-compiled for a TPU pod topology from any machine, a CPU one included.

With the `tpu` extra (libtpu), `jax.experimental.topologies.get_topology_desc` gives the devices
of a pod that is not there (`v5p:4x4x4`: 64 chips on 16 hosts); a mesh over them built by
`jais2_jax.sharding.make_mesh`, ShapeDtypeStructs carrying the run's shardings, and
`jit(...).lower(...).compile()` give XLA:TPU's own per-chip memory (`memory_analysis()`) and FLOPs
(`cost_analysis()`). A program that does not fit the chip's HBM fails to compile with
RESOURCE_EXHAUSTED; that is reported as "does not fit", never raised.

`jax.default_backend()` is "cpu" while compiling for a TPU target, so the model is built with
`attention_impl="splash"` explicitly: the kernel that `attention_impl=None` picks on a TPU host.

When a setting does not fit, the nearest one that does (stronger remat, gradient accumulation,
more fsdp, a smaller batch, a larger topology) is searched with the analytic estimate of
`jais2_jax.planning.memory` (traced, cheap), scaled by the compiled / analytic ratio of the requested
setting, and the pick is then compiled to confirm it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import tempfile
import time

import jax

from jais2_jax.inference.program import build_inference_program
from jais2_jax.model.cache import as_cache_dtype
from jais2_jax.model.config import Jais2Config
from jais2_jax.model.options import REMAT_POLICIES, ModelOptions, as_dtype
from jais2_jax.parallel import sharding
from jais2_jax.planning import memory as analytic
from jais2_jax.training.lora import lora_flops_per_token
from jais2_jax.training.program import build_train_program
from jais2_jax.training.run_config import RunConfig
from jais2_jax.training.step import flops_per_token, make_optimizer

GiB = 1024 ** 3
EXIT_DOES_NOT_FIT = 3

# generation -> (HBM per chip, topology names from small to large: one slice each)
_2D = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
_3D = ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16",
       "8x16x16", "16x16x16")
CHIPS = {
    "v4": (32 * GiB, _3D),
    "v5p": (95 * GiB, _3D),
    "v5e": (16 * GiB, _2D),
    "v6e": (32 * GiB, _2D),
}

# The keys of a training batch, as `jais2_jax.data.PackedRows` makes them.
# ---------------------------------------------------------------------------------- topologies
@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # "v5p:4x4x4"
    generation: str  # "v5p"
    dims: tuple[int, ...]
    num_slices: int

    @property
    def chips(self) -> int:
        return math.prod(self.dims) * self.num_slices

    @property
    def hbm(self) -> int:
        return CHIPS[self.generation][0]


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """`v5p:4x4x4`, `v5e:16x16`, `v6e:8x8`, `v4:2x2x2` -> Topology (checked, no libtpu needed)."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", name.strip().lower())
    if not m:
        raise ValueError(f"topology {name!r}: expected GENERATION:DIMS, e.g. v5p:4x4x4, v5e:16x16, "
                         f"v6e:8x8 (generations {sorted(CHIPS)})")
    generation, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
    want = len(CHIPS[generation][1][0].split("x"))
    if len(dims) != want or min(dims) < 1:
        raise ValueError(f"topology {name!r}: {generation} takes {want} positive dimensions, "
                         f"e.g. {generation}:{CHIPS[generation][1][2]}")
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    return Topology(f"{generation}:{m.group(2)}", generation, dims, num_slices)


@contextlib.contextmanager
def _quiet_stderr():
    """libtpu prints warnings about the missing TPU VM environment on fd 2; keep them unless
    something fails."""
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            tmp.seek(0)
            os.write(2, tmp.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def topology_devices(topology: Topology) -> list:
    """The devices of the topology (on no host), from libtpu."""
    try:
        import libtpu  # noqa: F401  (a clear error instead of libtpu's when it is missing)
        from jax.experimental import topologies
    except ImportError:
        raise ValueError("--topology needs libtpu: pip install -e '.[tpu]'") from None
    # Several processes may compile at once (tests, a background plan): libtpu's lock file
    # guards real chips, and there are none.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    bounds = tuple(math.gcd(2, d) for d in topology.dims[:2]) + (1,)  # 4 chips per host
    with _quiet_stderr():
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology.name, chip_config_name="default",
            chips_per_host_bounds=bounds, num_slices=topology.num_slices)
    return list(desc.devices)


# ------------------------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class Setting:
    """What the plan varies: mesh (data, fsdp, tensor) inside a slice, batch, remat, accumulation."""
    mesh: tuple[int, int, int]
    batch: int
    seq: int
    remat: str = "dots"
    grad_accum: int = 1
    prefill: int | None = None  # decode: prompt tokens per row (default seq)

    def describe(self, mode: str) -> str:
        mesh = "data={} fsdp={} tensor={}".format(*self.mesh)
        if mode == "decode":
            return f"mesh {mesh}; batch {self.batch}, cache {self.seq}, prefill {self.prefill or self.seq}"
        accum = f" (grad accum {self.grad_accum})" if self.grad_accum > 1 else ""
        return f"mesh {mesh}; batch {self.batch}{accum} x seq {self.seq}; remat {self.remat}"


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One compiled program's per-chip memory (bytes) and cost; `oom` holds XLA's message when
    it did not fit."""
    name: str
    seconds: float
    argument: int = 0
    output: int = 0
    alias: int = 0
    temp: int = 0
    code: int = 0
    flops: float | None = None
    oom: str | None = None
    oom_used: int | None = None  # bytes needed, from the message
    oom_temporaries_only: bool = False  # oom_used counts the scratch only

    @property
    def total(self) -> int:
        """Peak bytes on one chip: inputs, outputs not written over donated inputs, scratch, code."""
        if self.oom:
            return self.oom_used or 0
        return self.argument + self.output - self.alias + self.temp + self.code


@dataclasses.dataclass
class Result:
    topology: Topology
    mode: str
    setting: Setting
    programs: list[Compiled]
    model_flops: float | None = None  # per chip per step: 6N + attention (training only)
    skipped: str | None = None  # why nothing was compiled (the state alone cannot fit)
    estimate: int | None = None  # analytic bytes per chip (plan.make_plan)

    state: int = 0  # exact bytes per chip of params + grads + optimizer state (or + KV cache)

    @property
    def total(self) -> int:
        return max((p.total + (self.state if p.oom_temporaries_only else 0)
                    for p in self.programs), default=self.estimate or 0)

    @property
    def fits(self) -> bool:
        return (not self.skipped and bool(self.programs) and not any(p.oom for p in self.programs)
                and self.total <= self.topology.hbm)


# --------------------------------------------------------------------------------- compilation
_SIZE = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _compile(name: str, lowered_fn) -> Compiled:
    start = time.perf_counter()
    try:
        with _quiet_stderr():
            compiled = lowered_fn().compile()
    except Exception as e:  # XLA's OOM is a JaxRuntimeError; anything else is a real error
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
            raise
        # XLA:TPU says "Used 20.1G of 15.5G hbm" (everything) or "... HLO temporaries (18.7G)
        # exceeds available HBM (15.8G)" (scratch only: the arguments come on top).
        used = re.search(r"Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm", text) or \
            re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", text)
        line = next((ln.strip() for ln in text.splitlines() if "hbm" in ln.lower()),
                    text.splitlines()[0])
        return Compiled(name, time.perf_counter() - start, oom=line[:300],
                        oom_used=int(float(used.group(1)) * _SIZE[used.group(2)]) if used else None,
                        oom_temporaries_only=bool(used) and used.re.pattern.startswith("temp"))
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Compiled(name, seconds, argument=mem.argument_size_in_bytes,
                    output=mem.output_size_in_bytes, alias=mem.alias_size_in_bytes,
                    temp=mem.temp_size_in_bytes, code=mem.generated_code_size_in_bytes,
                    flops=(cost or {}).get("flops"))


def _run_config(run, s: Setting):
    run = run or RunConfig(model="-", data="-", output_dir="-")
    return run.replace(seq_len=s.seq, batch_size=s.batch, grad_accum_steps=s.grad_accum,
                       remat_policy=s.remat, attention_impl="splash",
                       loss_chunk=min(run.loss_chunk, s.seq))


def compile_train(config: Jais2Config, mesh, s: Setting, run=None) -> list[Compiled]:
    """The trainer's own step (`build_train_program`, as `jais2 train` builds it), compiled."""
    program = build_train_program(config, _run_config(run, s), mesh)
    return [_compile("train step", program.lower_train_step)]


def compile_decode(config: Jais2Config, mesh, s: Setting, param_dtype="bfloat16",
                   dtype="bfloat16", cache_dtype="bfloat16", quantize=None) -> list[Compiled]:
    """The prefill of `prefill` tokens per row into an empty cache of `seq` slots, and one decode
    step (`build_inference_program`)."""
    program = build_inference_program(config, batch_size=s.batch, max_length=s.seq, mesh=mesh,
                                      dtype=dtype, param_dtype=param_dtype,
                                      cache_dtype=as_cache_dtype(cache_dtype),
                                      options=ModelOptions(attention_impl="splash"),
                                      quantization=quantize)
    length = s.prefill or s.seq
    return [_compile(f"prefill ({length} tokens per row)", lambda: program.lower_prefill(length)),
            _compile("decode step", program.lower_decode_step)]


# ---------------------------------------------------------------------------- analytic estimates
class _Estimator:
    """Analytic bytes per chip (`plan.make_plan` on a device-free mesh), cached per setting."""

    def __init__(self, config, mode, param_dtype, dtype, cache_dtype, run=None, quantize=None):
        self.config, self.mode, self.run = config, mode, run
        self.kw = dict(param_dtype=param_dtype, dtype=dtype, cache_dtype=cache_dtype,
                       quantize=quantize)
        self.lora = run.lora if run is not None and mode == "train" else None
        self._cache = {}

    def state(self, s: Setting, chips: int) -> int:
        """Exact bytes per chip of what lives through the step: params + grads + optimizer state
        (train), params + KV cache (decode); no tracing of the model."""
        key = ("state", s.mesh, s.batch, s.seq, chips)
        if key not in self._cache and self.lora is not None:  # frozen base + adapters' state
            st = analytic.lora_state_bytes(
                self.config, sharding.abstract_mesh(s.mesh, chips), self.lora,
                param_dtype=self.kw["param_dtype"], dtype=self.kw["dtype"],
                optimizer=make_optimizer(_run_config(self.run, s)))
            self._cache[key] = sum(st.values())
        if key not in self._cache:
            mesh = sharding.abstract_mesh(s.mesh, chips)
            params_sh = sharding.param_shardings(self.config, mesh)
            abstract = sharding.unboxed_shapes(sharding.abstract_params(
                self.config, param_dtype=as_dtype(self.kw["param_dtype"])))
            params = sharding.bytes_per_device(abstract, params_sh)
            if self.kw["quantize"] is not None:
                params = analytic.quantized_param_bytes(self.config, mesh, self.kw["param_dtype"],
                                                        self.kw["quantize"])
            if self.mode == "train":
                optimizer = make_optimizer(_run_config(self.run, s))
                extra = params + sharding.bytes_per_device(
                    jax.eval_shape(optimizer.init, abstract),
                    sharding.opt_state_shardings(optimizer, params_sh, abstract))
            else:
                extra = analytic.cache_bytes(self.config, mesh, s.batch, s.seq,
                                             self.kw["cache_dtype"])
            self._cache[key] = params + extra
        return self._cache[key]

    def __call__(self, s: Setting, chips: int) -> tuple[int, int]:
        """(total, state) bytes per chip; state = params + grads + optimizer (train) or params +
        KV cache (decode): exact, from the shardings. ValueError when the setting is invalid."""
        key = (s, chips)
        if key not in self._cache:
            mesh = sharding.abstract_mesh(s.mesh, chips)
            micro = s.batch // s.grad_accum
            p = analytic.make_plan(self.config, mesh, batch=micro, seq=s.seq, mode=self.mode,
                                   remat=s.remat, prefill=s.prefill,
                                   loss_chunk=min(self.run.loss_chunk if self.run else 512, s.seq),
                                   lora=self.lora, **self.kw)
            # Accumulating keeps a float32 gradient sum beside each micro-batch's gradient.
            extra = p.grads if s.grad_accum > 1 else 0
            state = p.params + p.adapters + p.grads + p.opt_state + p.kv_cache + extra
            self._cache[key] = (p.total + extra, state)
        return self._cache[key]


def _candidates(s: Setting, mode: str, policies):
    """Settings near `s`, nearest first: (distance, description of the change, setting)."""
    data, fsdp, tensor = s.mesh
    meshes = [(s.mesh, None)]
    if data > 1:
        meshes.append(((1, data * fsdp, tensor), f"more fsdp (mesh 1,{data * fsdp},{tensor})"))
    if tensor > 1:
        meshes.append(((data, fsdp * tensor, 1), f"fsdp instead of tensor (mesh {data},{fsdp * tensor},1)"))
    remats = [(s.remat, None)] + ([(r, f"remat {r}") for r in policies if r != s.remat]
                                  if mode == "train" else [])
    accums = [(s.grad_accum, None)]
    if mode == "train":
        accums += [(s.grad_accum * 2 ** k, f"grad_accum_steps {s.grad_accum * 2 ** k} (same batch)")
                   for k in range(1, 7) if s.batch % (s.grad_accum * 2 ** k) == 0]
    batches = [(s.batch, None)] + [(s.batch // 2 ** k, f"batch {s.batch // 2 ** k}")
                                   for k in range(1, 8) if s.batch % 2 ** k == 0]
    out = []
    for mi, (mesh, m_txt) in enumerate(meshes):
        for ri, (remat, r_txt) in enumerate(remats):
            for ai, (accum, a_txt) in enumerate(accums):
                for bi, (batch, b_txt) in enumerate(batches):
                    if (batch // accum) % (mesh[0] * mesh[1]) or batch % accum:
                        continue
                    changes = [t for t in (r_txt, a_txt, m_txt, b_txt) if t]
                    # One change before two; remat before accumulation before mesh before batch
                    # (which changes the training run the least).
                    distance = 10 * len(changes) + ri + 2 * ai + 3 * mi + 4 * bi
                    out.append((distance, ", ".join(changes),
                                dataclasses.replace(s, mesh=mesh, remat=remat, grad_accum=accum,
                                                    batch=batch)))
    out.sort(key=lambda c: c[0])
    return [c for c in out if c[1]]


# ------------------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class Suggestion:
    change: str
    setting: Setting
    topology: Topology
    estimate: int
    checked: Result | None = None  # the compiled check of the suggestion


def plan_topology(config: Jais2Config, topology: Topology, setting: Setting, *, mode="train",
                  dcn_mesh=None, run=None, param_dtype=None, dtype="bfloat16",
                  cache_dtype="bfloat16", quantize=None) -> Result:
    """Compile `setting` for `topology` (after an exact check that the state can fit at all)."""
    param_dtype = param_dtype or (run.param_dtype if run else
                                  ("float32" if mode == "train" else "bfloat16"))
    estimator = _Estimator(config, mode, param_dtype, dtype, cache_dtype, run, quantize)
    per_slice = topology.chips // topology.num_slices
    dcn = dcn_mesh or ((topology.num_slices, 1, 1) if topology.num_slices > 1 else None)
    sharding.mesh_shape(setting.mesh, per_slice)  # a clear error for a mesh of the wrong size
    state = estimator.state(_global(setting, dcn), topology.chips)
    result = Result(topology, mode, setting, [], state=state)
    if mode == "train":
        per_token = (lora_flops_per_token(config, setting.seq, run.lora)
                     if run is not None and run.lora is not None
                     else flops_per_token(config, setting.seq))
        result.model_flops = per_token * setting.batch * setting.seq / topology.chips
    if state > topology.hbm:
        result.estimate = state
        what = "parameters, gradients and optimizer state" if mode == "train" else \
            "parameters and KV cache"
        result.skipped = (f"the {what} alone need {state / GiB:.2f} GiB per chip (exact, from "
                          f"the shardings) of {topology.hbm / GiB:.0f} GiB: not compiled")
        return result
    result.estimate = estimator(_global(setting, dcn), topology.chips)[0]
    mesh = sharding.make_mesh(setting.mesh, devices=topology_devices(topology), dcn_shape=dcn)
    if mode == "train":
        result.programs = compile_train(config, mesh, setting, run.replace(param_dtype=param_dtype)
                                        if run else _default_run(param_dtype, dtype))
    else:
        result.programs = compile_decode(config, mesh, setting, param_dtype, dtype, cache_dtype,
                                         quantize)
    return result


def _default_run(param_dtype, dtype):
    return RunConfig(model="-", data="-", output_dir="-", param_dtype=param_dtype, dtype=dtype)


def _global(s: Setting, dcn) -> Setting:
    """The setting with the mesh of the whole topology (ICI mesh x DCN mesh)."""
    if not dcn:
        return s
    return dataclasses.replace(s, mesh=tuple(a * b for a, b in zip(s.mesh, dcn)))


def suggest(config: Jais2Config, result: Result, *, run=None, param_dtype=None, dtype="bfloat16",
            cache_dtype="bfloat16", verify: int = 2, dcn_mesh=None,
            quantize=None) -> Suggestion | None:
    """The nearest setting that fits: analytic estimates (scaled by the compiled / analytic ratio
    of the failed setting) rank the candidates; the best `verify` are compiled until one fits.
    `dcn_mesh`: how the axes span the slices, as given to `plan_topology` (default data)."""
    topo, s, mode = result.topology, result.setting, result.mode
    param_dtype = param_dtype or (run.param_dtype if run else
                                  ("float32" if mode == "train" else "bfloat16"))
    estimator = _Estimator(config, mode, param_dtype, dtype, cache_dtype, run, quantize)
    ratio = max(result.total / result.estimate, 1.0) if result.total and result.estimate else 1.0
    dcn = dcn_mesh or ((topo.num_slices, 1, 1) if topo.num_slices > 1 else None)
    policies = [] if mode != "train" else sorted(  # the policy keeping most first
        REMAT_POLICIES, key=lambda r: -_try(estimator, _global(dataclasses.replace(s, remat=r), dcn),
                                            topo.chips)[0])

    def first_fit(topology, candidates):
        for _, change, cand in candidates:
            try:
                if estimator.state(_global(cand, dcn), topology.chips) > topology.hbm:
                    continue
            except ValueError:  # an indivisible mesh or batch: not a candidate
                continue
            total, _ = _try(estimator, _global(cand, dcn), topology.chips)
            if total and total * ratio <= topology.hbm:
                yield change, cand, int(total * ratio)

    tried = 0
    for change, cand, estimate in first_fit(topo, _candidates(s, mode, policies)):
        suggestion = Suggestion(change, cand, topo, estimate)
        if tried >= verify:
            return suggestion
        tried += 1
        suggestion.checked = plan_topology(config, topo, cand, mode=mode, dcn_mesh=dcn_mesh,
                                           run=run, param_dtype=param_dtype, dtype=dtype,
                                           cache_dtype=cache_dtype, quantize=quantize)
        if suggestion.checked.fits:
            return suggestion
        ratio = max(ratio, suggestion.checked.total / max(estimate / ratio, 1))
    # Nothing fits on these chips: the smallest larger topology of the generation (fsdp over all
    # of it, tensor kept) where the requested setting or a near one fits, estimated only.
    names = CHIPS[topo.generation][1]
    for name in names:
        bigger = parse_topology(f"{topo.generation}:{name}", topo.num_slices)
        if bigger.chips <= topo.chips:
            continue
        n = bigger.chips // topo.num_slices
        if n % s.mesh[2]:
            continue
        # fsdp over the whole topology; the batch grows to a row per data-parallel chip at least.
        dp = n // s.mesh[2] * topo.num_slices
        batch = -(-s.batch // dp) * dp
        base = dataclasses.replace(s, mesh=(1, n // s.mesh[2], s.mesh[2]), batch=batch)
        change = f"topology {bigger.name} with mesh 1,-1,{s.mesh[2]}" + (
            f", batch {batch}" if batch != s.batch else "")
        options = [(0, change, base)]
        options += [(d, f"{change}, {c}", cs) for d, c, cs in _candidates(base, mode, policies)
                    if "batch" not in c]
        for change, cand, estimate in first_fit(bigger, options):
            return Suggestion(change, cand, bigger, estimate)
    return None


def _try(estimator, s, chips):
    try:
        return estimator(s, chips)
    except ValueError:  # an indivisible mesh or batch: not a candidate
        return 0, 0


# ------------------------------------------------------------------------------------- printing
def format_result(result: Result, title: str = "") -> str:
    gib = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    topo = result.topology
    lines = [title] if title else []
    slices = f" x {topo.num_slices} slices" if topo.num_slices > 1 else ""
    lines.append(f"topology {topo.name}{slices}: {topo.chips} chips, {topo.hbm / GiB:.0f} GiB HBM "
                 f"each; {result.mode}: {result.setting.describe(result.mode)}; attention splash")
    if result.skipped:
        lines.append(f"  does NOT fit: {result.skipped}")
        return "\n".join(lines)
    for p in result.programs:
        if p.oom:
            lines.append(f"  {p.name}: compile failed after {p.seconds:.1f} s, out of memory: {p.oom}")
            continue
        lines.append(f"  {p.name}: compiled in {p.seconds:.1f} s; per chip:")
        lines += [f"    arguments    {gib(p.argument)}",
                  f"    outputs      {gib(p.output)}  ({p.alias / GiB:.2f} GiB of them in donated arguments)",
                  f"    temporaries  {gib(p.temp)}",
                  f"    code         {gib(p.code)}",
                  f"    total        {gib(p.total)}  ({100 * p.total / topo.hbm:.0f}% of HBM)"]
        if p.flops is not None:
            lines.append(f"    FLOPs        {p.flops:.3e} (XLA cost analysis: a loop body, e.g. "
                         f"the layer scan, counts once)")
    if result.model_flops:
        lines.append(f"  model FLOPs per step per chip: {result.model_flops:.3e} (6 x params x tokens "
                     f"+ attention, as MFU counts them; LoRA: 4 x base params + 6 x adapters)")
    verdict = "fits" if result.fits else "does NOT fit"
    lines.append(f"  verdict: {verdict} ({result.total / GiB:.2f} GiB of {topo.hbm / GiB:.0f} GiB "
                 f"per chip)")
    return "\n".join(lines)


def format_suggestion(sug: Suggestion | None, mode: str) -> str:
    if sug is None:
        return "  no nearby setting fits (tried remat, grad accumulation, fsdp, batch, larger topologies)"
    how = (f"compiled: {sug.checked.total / GiB:.2f} GiB per chip, fits" if sug.checked and
           sug.checked.fits else f"estimated {sug.estimate / GiB:.2f} GiB per chip (analytic x "
           f"the compiled/analytic ratio; not compiled)")
    return (f"  nearest change that fits: {sug.change}\n"
            f"    -> {sug.topology.name}: {sug.setting.describe(mode)}; {how}")

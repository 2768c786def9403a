"""`jais2 plan`: bytes per device for a model, mesh, batch and sequence length (see jais2_jax.planning.memory).

    jais2 plan --model jais2-70b --hardware v5p-128 --mesh fsdp --batch 64 --seq 4096 --remat full
    jais2 plan --model configs/jais2-70b.json --hardware 8xh100 --mesh tp --mode decode --batch 8 \
        --seq 8192 --prefill 2048

Needs no accelerator: the mesh is abstract (`--hardware` or `--devices` give its size).

With `--topology` (needs the `tpu` extra: libtpu) the project's real train step (or prefill +
decode step) is compiled for that TPU topology on this machine, and XLA's per-chip memory decides
(jais2_jax.planning.tpu). Exit code 0 when it fits, 3 when it does not (with the nearest change that
fits):

    jais2 plan --model jais2-70b --topology v5p:4x4x4 --mesh 1,-1,8 --batch 64 --seq 8192 --remat full
    jais2 plan --run configs/jais2-8b-v5p.yaml --topology v5p:4x4x2

A run config with a `lora:` block plans (and with --topology compiles) the LoRA / QLoRA step:
frozen base (compute dtype or int8), adapters, their gradients and optimizer state, activations.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--model",
                        help="preset name (jais2-8b, jais2-70b), a config.json, or a checkpoint dir")
    parser.add_argument("--mesh", default=None,
                        help="preset (fsdp, dp, tp, fsdp+tp), '2,-1,4' or 'data=2,fsdp=-1,tensor=4'")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--hardware", help="v5p-32, v5p-128, v5e-256, v4-64, v6e-16, 8xh100, 8xh200, ...")
    where.add_argument("--devices", type=int, help="device count (no HBM check)")
    where.add_argument("--topology", help="compile for a TPU topology: v5p:4x4x4 (v5p-128), "
                       "v5e:16x16 (v5e-256), v6e:8x8, ... (the tpu extra)")
    parser.add_argument("--num-slices", type=int, default=1,
                        help="--topology: slices joined by DCN (the mesh is per slice)")
    parser.add_argument("--dcn-mesh", default=None,
                        help="--topology with slices: slices per axis (default: data over slices)")
    parser.add_argument("--run", help="a run config (YAML): model, mesh, batch, seq, remat, "
                        "accumulation, dtypes and optimizer from it (flags override)")
    parser.add_argument("--grad-accum", type=int, default=None,
                        help="train: micro-batches per step (default 1 or the run config's)")
    parser.add_argument("--verify", type=int, default=2,
                        help="--topology: suggestions compiled to confirm them (0: estimate only)")
    parser.add_argument("--batch", type=int, help="global batch (sequences)")
    parser.add_argument("--seq", type=int,
                        help="sequence length (decode: KV cache slots per row)")
    parser.add_argument("--mode", choices=("train", "decode"), default="train")
    parser.add_argument("--prefill", type=int, default=None,
                        help="decode: prompt tokens per row prefilled at once (default --seq)")
    parser.add_argument("--remat", default=None, help="a policy of jais2_jax.model.REMAT_POLICIES: none, full, dots, ... (train)")
    parser.add_argument("--param-dtype", default=None,
                        help="default float32 for train, bfloat16 for decode")
    parser.add_argument("--dtype", default=None, help="compute dtype (default bfloat16, or --run's)")
    parser.add_argument("--cache-dtype", default="bfloat16",
                        help="KV cache dtype (decode): float32, bfloat16, float16 or int8")
    parser.add_argument("--quantize", choices=("int8", "fp8", "nf4"), default=None,
                        help="decode with weight-only int8 / fp8 projections (per-channel scales) or "
                             "nf4 (4-bit codes, a scale per 64 inputs)")
    parser.add_argument("--attention", choices=("flash", "xla"), default="flash",
                        help="flash: splash/cuDNN kernels keep no [T, T] scores (default)")


def _fill_from_run(args):
    """--run: a RunConfig; flags given on the command line take precedence over its values."""
    if not args.run:
        return None
    from jais2_jax.training.run_config import RunConfig
    run = RunConfig.from_yaml(args.run)
    for flag, field in (("model", "model"), ("batch", "batch_size"), ("seq", "seq_len"),
                        ("remat", "remat_policy"), ("grad_accum", "grad_accum_steps"),
                        ("param_dtype", "param_dtype")):
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(run, field))
    if args.mesh is None:
        args.mesh = run.mesh
    if args.dcn_mesh is None:
        args.dcn_mesh = run.dcn_mesh
    if args.dtype is None:
        args.dtype = run.dtype
    return run


def run(args) -> int:
    from jais2_jax.parallel import sharding
    from jais2_jax.planning import memory as plan
    run_config = _fill_from_run(args)
    args.dtype = args.dtype or "bfloat16"
    missing = [f"--{n}" for n in ("model", "batch", "seq") if getattr(args, n) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --run CONFIG.yaml)")
    for flag in ("batch", "seq", "devices", "grad_accum", "prefill", "num_slices"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    args.remat = args.remat or "dots"
    args.mesh = args.mesh or "fsdp"
    from jais2_jax.model.config import load_model_config
    config = load_model_config(args.model)
    if args.topology:
        return _run_topology(args, config, run_config)
    hbm, per_host = None, None
    if args.hardware:
        hw = plan.hardware(args.hardware)
        devices, hbm, per_host = hw.devices, hw.bytes_per_device, hw.devices_per_host
    elif args.devices is not None:
        devices = args.devices
    else:
        import jax
        devices = jax.device_count()
    mesh = sharding.abstract_mesh(args.mesh, devices, per_host)
    param_dtype = args.param_dtype or ("float32" if args.mode == "train" else "bfloat16")
    accum = args.grad_accum or 1
    if args.mode == "train" and args.batch % accum:
        raise ValueError(f"batch {args.batch} is not divisible by grad_accum {accum}")
    # With accumulation the backward pass keeps one micro-batch's activations at a time.
    batch = args.batch // accum if args.mode == "train" else args.batch
    lora = run_config.lora if run_config is not None and args.mode == "train" else None
    result = plan.make_plan(config, mesh, batch=batch, seq=args.seq, mode=args.mode,
                            remat=args.remat, param_dtype=param_dtype, dtype=args.dtype,
                            cache_dtype=args.cache_dtype, attention=args.attention,
                            prefill=args.prefill, quantize=args.quantize, lora=lora)
    where = args.hardware or f"{devices} devices"
    weights = f"{param_dtype}, {args.quantize} projections" if args.quantize else param_dtype
    if lora is not None:
        weights = (f"LoRA rank {lora.rank} on {', '.join(lora.target_modules)}, frozen base "
                   f"{lora.base_quantization or args.dtype}, adapters {param_dtype}")
    title = (f"{args.model} ({config.num_parameters() / 1e9:.2f}B parameters, {weights}) on "
             f"{where}, compute {args.dtype}")
    print(plan.format_plan(result, hbm, title))
    return 0


def _run_topology(args, config, run_config) -> int:
    import jax

    from jais2_jax.parallel import sharding
    from jais2_jax.planning import tpu as tpu_plan
    if not jax.config.jax_platforms:  # compiling for the topology needs no local accelerator,
        jax.config.update("jax_platforms", "cpu")  # and probing for one makes libtpu complain
    topology = tpu_plan.parse_topology(args.topology, args.num_slices)
    per_slice = topology.chips // topology.num_slices
    mesh = sharding.mesh_shape(args.mesh, per_slice, 4)  # 4 chips per TPU host
    dcn = None if args.dcn_mesh is None else sharding.mesh_shape(args.dcn_mesh, topology.num_slices)
    setting = tpu_plan.Setting(mesh=mesh, batch=args.batch, seq=args.seq, remat=args.remat,
                               grad_accum=args.grad_accum or 1, prefill=args.prefill)
    if args.mode == "decode" and args.prefill is not None and not 0 < args.prefill <= args.seq:
        raise ValueError(f"prefill {args.prefill} must be in [1, seq={args.seq}]")
    if args.seq > config.max_position_embeddings:
        raise ValueError(f"seq {args.seq} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    kw = dict(run=run_config, param_dtype=args.param_dtype, dtype=args.dtype,
              cache_dtype=args.cache_dtype, quantize=args.quantize)
    result = tpu_plan.plan_topology(config, topology, setting, mode=args.mode, dcn_mesh=dcn, **kw)
    param_dtype = args.param_dtype or (run_config.param_dtype if run_config else
                                       ("float32" if args.mode == "train" else "bfloat16"))
    weights = f"{param_dtype}, {args.quantize} projections" if args.quantize else param_dtype
    lora = run_config.lora if run_config is not None and args.mode == "train" else None
    if lora is not None:
        weights = (f"LoRA rank {lora.rank}, frozen base {lora.base_quantization or args.dtype}, "
                   f"adapters {param_dtype}")
    title = (f"{args.model} ({config.num_parameters() / 1e9:.2f}B parameters, {weights}), "
             f"compute {args.dtype}, KV cache {args.cache_dtype}")
    print(tpu_plan.format_result(result, title), flush=True)
    if result.fits:
        return 0
    print(tpu_plan.format_suggestion(tpu_plan.suggest(config, result, verify=args.verify,
                                                      dcn_mesh=dcn, **kw), args.mode))
    return tpu_plan.EXIT_DOES_NOT_FIT

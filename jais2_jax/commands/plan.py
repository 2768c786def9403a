"""`jais2 plan`: bytes per device for a model, mesh, batch and sequence length (see jais2_jax.plan).

    jais2 plan --model jais2-70b --hardware v5p-128 --mesh fsdp --batch 64 --seq 4096 --remat full
    jais2 plan --model configs/jais2-70b.json --hardware 8xh100 --mesh tp --mode decode --batch 8 \
        --seq 8192 --prefill 2048

Needs no accelerator: the mesh is abstract (`--hardware` or `--devices` give its size).
"""

from __future__ import annotations

import os


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="preset name (jais2-8b, jais2-70b), a config.json, or a checkpoint dir")
    parser.add_argument("--mesh", default="fsdp",
                        help="preset (fsdp, dp, tp, fsdp+tp), '2,-1,4' or 'data=2,fsdp=-1,tensor=4'")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--hardware", help="v5p-32, v5p-128, v5e-256, v4-64, v6e-16, 8xh100, 8xh200, ...")
    where.add_argument("--devices", type=int, help="device count (no HBM check)")
    parser.add_argument("--batch", type=int, required=True, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, required=True,
                        help="sequence length (decode: KV cache slots per row)")
    parser.add_argument("--mode", choices=("train", "decode"), default="train")
    parser.add_argument("--prefill", type=int, default=None,
                        help="decode: prompt tokens per row prefilled at once (default --seq)")
    parser.add_argument("--remat", default="dots", help="a policy of jais2_jax.model.REMAT_POLICIES: none, full, dots, ... (train)")
    parser.add_argument("--param-dtype", default=None,
                        help="default float32 for train, bfloat16 for decode")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--cache-dtype", default="bfloat16")
    parser.add_argument("--attention", choices=("flash", "xla"), default="flash",
                        help="flash: splash/cuDNN kernels keep no [T, T] scores (default)")


def _config(model: str):
    from jais2_jax.config import Jais2Config, preset
    if os.path.exists(model):
        return Jais2Config.from_json_file(model)
    return preset(model)


def run(args) -> int:
    from jais2_jax import plan, sharding
    config = _config(args.model)
    hbm, per_host = None, None
    if args.hardware:
        hw = plan.hardware(args.hardware)
        devices, hbm, per_host = hw.devices, hw.bytes_per_device, hw.devices_per_host
    elif args.devices:
        devices = args.devices
    else:
        import jax
        devices = jax.device_count()
    mesh = sharding.abstract_mesh(args.mesh, devices, per_host)
    param_dtype = args.param_dtype or ("float32" if args.mode == "train" else "bfloat16")
    result = plan.make_plan(config, mesh, batch=args.batch, seq=args.seq, mode=args.mode,
                            remat=args.remat, param_dtype=param_dtype, dtype=args.dtype,
                            cache_dtype=args.cache_dtype, attention=args.attention,
                            prefill=args.prefill)
    where = args.hardware or f"{devices} devices"
    title = (f"{args.model} ({config.num_parameters() / 1e9:.2f}B parameters, {param_dtype}) on "
             f"{where}, compute {args.dtype}")
    print(plan.format_plan(result, hbm, title))
    return 0

"""`jais2 train CONFIG.yaml [--set key=value ...]`: train, or resume from the output directory."""

from __future__ import annotations

# Exit codes besides 0 (done) and 1 (bad input): the run stopped on its own.
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 143  # 128 + SIGTERM: the scheduler's convention; the checkpoint is saved


def add_arguments(parser):
    parser.add_argument("config", help="run config (YAML), e.g. configs/tiny-cpu.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run config key (value parsed as YAML); repeatable")
    parser.add_argument("--until-step", type=int, default=None,
                        help="stop (with a checkpoint) at this step; rerun the same command to "
                             "continue")
    parser.add_argument("--distributed", default="auto", choices=("auto", "on", "off"),
                        help="jax.distributed.initialize: auto = when a multi-host launch is "
                             "detected (TPU pod, SLURM, ...)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def run(args) -> int:
    from jais2_jax.training.run_config import RunConfig
    run_config = RunConfig.from_yaml(args.config, args.set)  # bad config: error before JAX starts
    from jais2_jax.parallel import distributed
    if args.distributed != "off":
        distributed.initialize(args.distributed)
    from jais2_jax.training.trainer import train
    result = train(run_config, until_step=args.until_step, show_progress=not args.no_progress)
    print(f"{result['status']} at step {result['step']}; output in {result['output_dir']}")
    return {"nonfinite": EXIT_NONFINITE, "preempted": EXIT_PREEMPTED}.get(result["status"], 0)

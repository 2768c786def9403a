#!/usr/bin/env bash
# One GPU host (e.g. 8 x H100): one process drives all local GPUs.
#
#   bash train/launch_gpu_host.sh configs/jais2-8b-h100x8.yaml [--set key=value ...]
#
# Several hosts: run this on each with JAX_COORDINATOR_ADDRESS=host0:1234, JAX_NUM_PROCESSES=N and
# JAX_PROCESS_ID=i set (or inside a SLURM step with one task per host); jax.distributed starts
# itself from those.
set -euo pipefail
cd "$(dirname "$0")/.."
# Let XLA overlap the FSDP all-gathers / reduce-scatters with compute, and let its autotuner pick
# Triton GEMMs with fused elementwise work where they beat cuBLAS (~1% of a one-H100 2B step).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_triton_gemm_any=true"
exec python train/train.py "$@"

"""Multi-host runs on JAX's own multi-controller runtime: one process per host, same program.

`initialize()` starts `jax.distributed` when asked, or when it detects a multi-process launch
(explicit `JAX_COORDINATOR_ADDRESS`/`JAX_NUM_PROCESSES`/`JAX_PROCESS_ID`, a SLURM job step with
several tasks, a multi-host Cloud TPU slice or a multi-slice run). It never runs at import.
Each process then loads only its own rows of a batch (`local_batch_rows`) and
`global_batch` assembles the global array with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

log = logging.getLogger(__name__)


def detect_launch(env: dict | None = None) -> str | None:
    """The kind of multi-process launch the environment describes, or None for a single process."""
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "env"
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1))) > 1:
        return "slurm"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu-multislice"
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    if len([h for h in hosts.split(",") if h]) > 1:
        return "tpu-pod"
    return None


def initialize(mode: str = "auto", *, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None) -> bool:
    """Start the distributed runtime; returns whether this is a multi-process run.

    mode: "auto" (start when a launch is detected or arguments are given), "on" (always: JAX's
    own cluster detection fills what is not given), "off" (never). Call it before anything touches
    the devices. Calling it again is harmless.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode {mode!r}: choose 'auto', 'on' or 'off'")
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if mode == "off":
        return False
    env = os.environ
    explicit = coordinator_address or num_processes is not None or process_id is not None
    launch = detect_launch()
    if mode == "auto" and not explicit and launch is None:
        return False
    if launch == "env":
        # JAX reads the address itself but not the count and rank: take them from the same place.
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
                   if k not in env and (num_processes if k == "JAX_NUM_PROCESSES" else process_id) is None]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not")
        num_processes = int(env["JAX_NUM_PROCESSES"]) if num_processes is None else num_processes
        process_id = int(env["JAX_PROCESS_ID"]) if process_id is None else process_id
    # CPU devices of different processes talk through gloo (tests, CPU clusters); it only touches
    # the CPU client, and asking for the backend here would start it before the runtime.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("starting jax.distributed (%s)", launch or "explicit")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
    return jax.process_count() > 1


def local_batch_rows(sharding: NamedSharding, global_shape: Sequence[int]) -> slice:
    """The rows (dimension 0) of a global batch that this process's devices hold.

    A process loads exactly these rows and passes them to `global_batch`. Raises if its devices
    hold a non-contiguous set of rows (a mesh laid out against the data order).
    """
    index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
    rows = set()
    for index in index_map.values():
        r = index[0] if index else slice(None)
        rows.update(range(*r.indices(global_shape[0])))
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo:
        raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows "
                         f"{sorted(rows)}; build the mesh with make_mesh so hosts own row blocks")
    return slice(lo, hi)


def check_batch_split(sharding: NamedSharding, global_shape: Sequence[int]) -> None:
    """Each process must hold its own 1/process_count of the batch rows, which is what the data
    loader gives it: a mesh whose batch axes (data x fsdp) do not span the processes (e.g. tensor
    across hosts) would have them all hold the same rows, fed with different data."""
    rows = local_batch_rows(sharding, global_shape)
    share = global_shape[0] // jax.process_count()
    if rows.stop - rows.start != share:
        raise ValueError(f"process {jax.process_index()} holds {rows.stop - rows.start} of the "
                         f"{global_shape[0]} batch rows, not its share {share}: the mesh's batch "
                         "axes (data x fsdp) must span the processes (keep tensor within a host)")


def global_batch(local_data, sharding: NamedSharding, global_batch_size: int | None = None):
    """One global array (or a tree of them, e.g. ids and mask) from each process's rows.

    `local_data`: numpy arrays holding this process's `local_batch_rows`; with one process this
    is the whole batch. `global_batch_size` defaults to local rows x process count (equal shares).
    """
    def place(x):
        x = np.asarray(x)
        rows = x.shape[0] * jax.process_count() if global_batch_size is None else global_batch_size
        return jax.make_array_from_process_local_data(sharding, x, (rows,) + x.shape[1:])

    return jax.tree_util.tree_map(place, local_data)

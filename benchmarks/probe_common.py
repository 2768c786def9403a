"""What the GPU probes share: the repository on sys.path, the measured copy bandwidth, and a
median-of-calls timer (the first call, which compiles, is not timed)."""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BW = 3.0e12  # measured copy bandwidth of the H100 (shared/anchors), bytes/s


def bench(fn, *args, reps=30):
    """Median wall seconds of fn(*args), each call waited for with block_until_ready."""
    import jax
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)

"""How the profiler times a call: samples of back-to-back calls, taken round-robin over a set of calls, with the
device synchronised around each sample."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

SAMPLES = 7  # per grid point, unless told


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: a CUDA call returns before its kernels have run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, samples: int = SAMPLES,
            sample_s: float = 0.01) -> tuple[float, float, float]:
    """(median, p10, p90) seconds per call of `fn`; see `measure_round_robin`."""
    return measure_round_robin([fn], device, samples, sample_s)[0]


def measure_round_robin(calls: list[Callable[[], object]], device: torch.device, samples: int = SAMPLES,
                        sample_s: float = 0.01, bar: tqdm | None = None) -> list[tuple[float, float, float]]:
    """(median, p10, p90) seconds per call of each of `calls`. A sample runs one call back to back enough times to
    last `sample_s`, so that timer and synchronisation overheads do not swamp microsecond-scale decode steps.

    The samples are taken round-robin (each round, one sample of every call) rather than all of one call's at once:
    a shared machine's speed drifts over seconds, and with back-to-back samples a slow spell fell on all samples of
    a run of neighbouring points. Two CPU profiles of the demo shapes taken one after the other then disagreed by
    more than 25% on a fifth of their points, in runs of neighbours, which bent the table's shape; round-robin, a
    spell costs each point one sample, and the medians come from moments spread over the whole profile.
    `bar` advances by one per sample."""
    rounds, inners = [], []
    for fn in calls:
        fn()  # warm-up
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        once = max(time.perf_counter() - start, 1e-7)
        inners.append(max(1, min(1000, int(sample_s / once))))
        # slow points (3-bit prefill on a CPU core): fewer samples, their spread is small anyway
        rounds.append(min(samples, 3) if once > 0.1 else samples)
        if bar is not None:
            bar.update(samples - rounds[-1])
    times: list[list[float]] = [[] for _ in calls]
    for r in range(samples):
        for fn, inner, n, out in zip(calls, inners, rounds, times):
            if r >= n:
                continue
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            synchronize(device)
            out.append((time.perf_counter() - start) / inner)
            if bar is not None:
                bar.update()
    return [_spread(t) for t in times]


def _spread(times: list[float]) -> tuple[float, float, float]:
    times = sorted(times)
    # inclusive: within the samples (the default extrapolates past them, below 0 with three samples)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return statistics.median(times), q[0], q[-1]

"""What a micro-batch pays outside the stages' layers, measured on the runtime's own stage ring: the hop from one
stage to the next, and the router's work per step with the step's way around the ring."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import torch

from llmpq_serve.profile_table import StepPoint, TransferFit
from llmpq_serve.profiler.timing import measure, synchronize


def profile_transfer(device: torch.device, dtype: torch.dtype, hidden: int = 4096) -> TransferFit:
    """A stage-to-stage hop as the ring makes it: off the device, through the runtime's own link (a loopback TCP
    socket, `ring.loopback_pair`) and onto the device again, timed as half a round trip between two threads for
    activations of 1 to 4096 tokens. The fit's latency is the smallest message's hop less its bytes at the fitted
    bandwidth, which comes from the largest and smallest messages: a least-squares line over sizes this far apart
    would set the latency by the largest message's noise."""
    from llmpq_serve.runtime.ring import loopback_pair

    near, far = loopback_pair()

    def echo() -> None:
        try:
            while True:
                meta, x = far.recv()
                far.send(meta, x.to(device))
        except (ConnectionError, OSError):  # the pair closed: profiling is over
            pass

    def round_trip(x: torch.Tensor) -> torch.Tensor:
        near.send({}, x)
        return near.recv()[1].to(device)

    echoing = threading.Thread(target=echo, name="profile-hop-echo", daemon=True)
    echoing.start()
    sizes, times = [], []
    try:
        for tokens in (1, 16, 256, 4096):
            x = torch.randn(tokens, hidden, device=device, dtype=dtype)
            sizes.append(x.numel() * x.element_size())
            times.append(measure(partial(round_trip, x), device)[0] / 2)
    finally:
        near.close()
        far.close()
        echoing.join()
    bytes_per_s = (sizes[-1] - sizes[0]) / max(times[-1] - times[0], 1e-12)
    return TransferFit(latency_s=max(times[0] - sizes[0] / bytes_per_s, 0.0), bytes_per_s=bytes_per_s, sizes=sizes,
                       seconds=times)


def answer_with(rows: int, vocab: int, dtype: str, host: str, port: int, compute_s: float = 0.0,
                device: str = "cpu", threads: int = 1) -> None:
    """A ring stage that computes on `device` for `compute_s` (matrix products, `threads` CPU threads) and then
    answers with its first rows of a [rows, vocab] logits tensor in `dtype`, each row's greedy token an ordinary one
    of the stand-in tokenizer: with it, a step's time less the stage's own is the router's work and the step's way
    around the ring. Run in a process of its own (`stage_process`)."""
    import logging

    from llmpq_serve.runtime.ring import StageLoop
    from llmpq_serve.runtime.threads import ThreadCount

    logging.getLogger("llmpq_serve.runtime.ring").setLevel(logging.ERROR)  # its ring closing is the normal end
    dev = torch.device(device)
    work = torch.randn(256, 256, device=dev)
    logits = torch.zeros(rows, vocab, dtype=getattr(torch, dtype))
    tokens = torch.randint(1, min(STAND_IN_VOCAB, vocab), (rows,), generator=torch.Generator().manual_seed(0))
    logits[torch.arange(rows), tokens] = 1.0
    count = ThreadCount(threads)

    def run(mb, x: torch.Tensor) -> torch.Tensor:
        count.use()
        end = time.perf_counter() + compute_s
        while time.perf_counter() < end:
            work @ work
            synchronize(dev)
        return logits[:len(mb.slots)]

    loop = StageLoop(run, 0, 1)
    loop.start(host, port)
    loop.thread.join()
    # The ring is closed and nothing is left to clean up. The interpreter's teardown aborted this process in half the
    # runs here ("terminate called without an active exception": a C++ thread still joinable), printing that
    # into `llmpq profile`'s output, so it is skipped.
    os._exit(0)


def stage_process(rows: int, vocab: int, dtype: torch.dtype, host: str, port: int, compute_s: float = 0.0,
                  device: str = "cpu", threads: int = 1) -> subprocess.Popen:
    """`answer_with` in a new interpreter. Not a multiprocessing child: a spawned one imports the caller's main
    module again, which in a script without a `__main__` guard runs the profiling again, in the child, and hangs
    both; a fork would copy this process's threads' locks mid-use."""
    root = str(Path(__file__).resolve().parents[2])  # the package as this process imports it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    code = (f"from llmpq_serve.profiler.ring_costs import answer_with; "
            f"answer_with({rows}, {vocab}, {str(dtype).removeprefix('torch.')!r}, {host!r}, {port}, {compute_s!r}, "
            f"{device!r}, {threads})")
    return subprocess.Popen([sys.executable, "-c", code], env=env)


STAND_IN_VOCAB = 512


def stand_in_tokenizer():
    """A byte-level BPE tokenizer like the demo models' (the profiler has no checkpoint's own): detokenizing is part
    of the router's work per step."""
    from llmpq_serve.demo_model import read_texts, stdlib_files, train_tokenizer

    return train_tokenizer(read_texts(stdlib_files()[0], 200_000), STAND_IN_VOCAB)


# How long the stand-in stage computes per step before it answers. A router that waited for its stages steps slower
# than one answered at once: over the ring on the 2-core CPU, 4-row steps cost 0.53 ms beyond the stage's own time
# when it answered at once, and 0.69 / 0.77 / 1.27 / 1.32 / 1.50 ms when it computed 0.75 / 1.8 / 3.7 / 7.7 / 14.5 ms
# first (the processes' caches and the cores' state are no longer the step's after the wait). A wait on the plateau,
# about a demo stage's decode call.
STEP_COMPUTE_S = 0.008


def profile_step_overhead(batches: tuple[int, ...], vocab: int = 32000, steps: int = 64,
                          dtype: torch.dtype = torch.float32, compute_s: float = STEP_COMPUTE_S,
                          device: torch.device | str = "cpu") -> list[StepPoint]:
    """Seconds per micro-batch step outside the stages' layers: the router's own work (scheduling, sampling,
    detokenizing, handing out events to the requests' streams) and the step's way over the stage ring, out to the
    first stage and back from the last (pickling, sockets, the wake-ups of both processes). Measured on a real ring
    whose one stage, a process of its own, computes on `device` for `compute_s` per step (`answer_with`), as a real
    stage keeps the router waiting, for one decode micro-batch of each size: `steps` greedy tokens of a full group,
    each row repeating one ordinary token of the stand-in tokenizer; the stage's own time (what the ring reports it
    busy) is taken off. The logits come in `dtype`, the stages' runtime dtype, as the sampler gets them."""
    from llmpq_serve.runtime.engine import PipelineEngine
    from llmpq_serve.runtime.ring import RingChain
    from llmpq_serve.runtime.sampling import SamplingParams
    from llmpq_serve.runtime.scheduler import Scheduler

    tokenizer = stand_in_tokenizer()
    stages: list[subprocess.Popen] = []

    async def join(host: str, port: int) -> None:
        stages.append(stage_process(max(batches), vocab, dtype, host, port, compute_s, str(device),
                                    torch.get_num_threads()))

    async def one_run(chain: RingChain, mb: int) -> float:
        engine = PipelineEngine(Scheduler(chain, tokenizer, mb, mb, 1, steps + 16), tokenizer, "step", dict)
        params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)

        async def consume(i: int) -> None:
            async for _ in engine.generate([1] * 8, params, f"r{i}"):
                pass

        busy = chain.busy_s[0]
        start = time.perf_counter()
        await asyncio.gather(*[consume(i) for i in range(mb)])
        elapsed = time.perf_counter() - start
        await engine.scheduler.stop()
        return (elapsed - (chain.busy_s[0] - busy)) / steps

    async def all_runs() -> list[StepPoint]:
        chain = RingChain(1, "127.0.0.1", join)
        try:
            out = []
            for mb in batches:
                await one_run(chain, mb)  # warm-up
                out.append(StepPoint(micro_batch=mb, stage_compute_s=compute_s,
                                     median_s=statistics.median([await one_run(chain, mb) for _ in range(5)])))
            return out
        finally:
            chain.close()

    try:
        return asyncio.run(all_runs())
    finally:
        for stage in stages:
            try:
                stage.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stage.kill()
                stage.wait()

"""The whole pipeline in one process: every stage shard in memory, the same scheduler. The reference the Ray
transport must match, and what fast tests use."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import torch

from llmpq_serve.runtime.engine import PipelineEngine
from llmpq_serve.runtime.layers import Rows
from llmpq_serve.runtime.scheduler import RowsSpec, Scheduler, SchedulerOptions
from llmpq_serve.runtime.shard import QuantOptions, StageShard, StageSpec
from llmpq_serve.runtime.threads import ThreadCount
from llmpq_serve.runtime.transfer import to_host
from llmpq_serve.spec import slot_count


def stage_specs(plan) -> list[StageSpec]:
    """The StageSpecs of a planner Plan, in pipeline order."""
    return StageSpec.chain([(s.layers[0], s.layers[1], s.bits) for s in plan.stages])


def even_stages(layers: int, stages: int, bits: int = 16) -> list[StageSpec]:
    """`stages` stages of (nearly) equal layer counts, all at `bits`."""
    bounds = [round(i * layers / stages) for i in range(stages + 1)]
    return StageSpec.chain([(a, b, (bits,) * (b - a)) for a, b in itertools.pairwise(bounds)])


class StageRunner:
    """A stage shard and its KV cache: what a stage deployment holds, too.

    `threads`: CPU threads of the stage's ops (default: torch's count where the runner is made), set in each thread
    that runs the stage (see `runtime.threads`)."""

    def __init__(self, path: str | Path, stage: StageSpec, slots: int, max_seq: int, device: str = "cpu",
                 quant: QuantOptions | None = None, threads: int | None = None):
        self.shard = StageShard(path, stage, device, quant)
        self.cache = self.shard.new_cache(slots, max_seq)
        self.threads = ThreadCount(threads or torch.get_num_threads())

    def run(self, rows: RowsSpec, x: torch.Tensor) -> torch.Tensor:
        self.threads.use()
        if rows.clear:
            self.cache.clear(rows.clear)
        out = self.shard(x, Rows(rows.slots, rows.starts, rows.counts), self.cache)
        return to_host(out)


class LocalChain:
    """Stages in this process; each stage call runs in a worker thread (torch releases the GIL inside its kernels),
    so different stages overlap where their kernels run, while their Python work takes turns on the GIL (most of a
    step for the small demo models: they then run nearly one after the other). A FIFO lock per stage keeps one
    micro-batch on a stage at a time, in arrival order."""

    def __init__(self, runners: list[StageRunner]):
        self.runners = runners
        self.stages = len(runners)
        self.busy_s = [0.0] * self.stages
        self._locks = [asyncio.Lock() for _ in runners]

    async def forward(self, rows: RowsSpec, x: torch.Tensor) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        for k, runner in enumerate(self.runners):
            async with self._locks[k]:
                start = loop.time()
                x = await asyncio.to_thread(runner.run, rows, x)
                self.busy_s[k] += loop.time() - start
        return x


def local_engine(path: str | Path, stages: list[StageSpec], prefill_micro_batch: int, decode_micro_batch: int,
                 max_batch: int, max_seq: int, device: str = "cpu", quant: QuantOptions | None = None,
                 options: SchedulerOptions | None = None, plan: dict | None = None) -> PipelineEngine:
    from transformers import AutoTokenizer

    slots = slot_count(max_batch, decode_micro_batch)
    runners = [StageRunner(path, s, slots, max_seq, device, quant) for s in stages]
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    scheduler = Scheduler.for_batch(LocalChain(runners), tokenizer, prefill_micro_batch, decode_micro_batch,
                                    max_batch, max_seq, options or SchedulerOptions())
    return PipelineEngine(scheduler, tokenizer, Path(path).name, lambda: plan or {})

"""The HTTP ingress: OpenAI-compatible API, and the scheduler that drives micro-batches through the stage
deployments."""

from __future__ import annotations

from typing import Any

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from llmpq_serve.runtime.engine import PipelineEngine
from llmpq_serve.runtime.scheduler import RowsSpec, Scheduler
from llmpq_serve.server.openai_app import build_app


class RayChain:
    """The stage chain over deployment handles: each hop goes through the object store."""

    def __init__(self, handles: list[DeploymentHandle]):
        self.handles = handles
        self.stages = len(handles)

    async def run(self, index: int, rows: RowsSpec, x: Any) -> torch.Tensor:
        return await self.handles[index].forward.remote(rows, x)


@serve.deployment(num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Router:
    def __init__(self, stages: list[DeploymentHandle], path: str, model_name: str, plan: dict,
                 prefill_micro_batch: int, decode_micro_batch: int, max_batch: int, max_seq: int, max_queue: int):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        self.stages = stages
        scheduler = Scheduler.for_batch(RayChain(stages), tokenizer, prefill_micro_batch, decode_micro_batch,
                                        max_batch, max_seq, max_queue)
        self.engine = PipelineEngine(scheduler, tokenizer, model_name, lambda: plan)

    def __serve_build_asgi_app__(self):
        return build_app(lambda: self.engine)

    async def placements(self) -> list[dict]:
        """Where each stage runs (node, accelerator type): for operators and the placement test."""
        return [await h.placement.remote() for h in self.stages]

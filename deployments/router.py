"""The HTTP ingress: OpenAI-compatible API, and the scheduler that drives micro-batches through the stage
deployments over the stage ring."""

from __future__ import annotations

import asyncio

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from llmpq_serve.runtime.engine import PipelineEngine
from llmpq_serve.runtime.ring import RingChain
from llmpq_serve.runtime.scheduler import Scheduler
from llmpq_serve.server.openai_app import build_app


def ring_over(stages: list[DeploymentHandle]) -> RingChain:
    """A ring from this replica's node through the stage deployments, in order, and back."""

    async def join(host: str, port: int) -> None:
        await asyncio.gather(*[h.join.remote(host, port, i, len(stages)) for i, h in enumerate(stages)])

    return RingChain(len(stages), ray.util.get_node_ip_address(), join)


@serve.deployment(num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Router:
    def __init__(self, stages: list[DeploymentHandle], path: str, model_name: str, plan: dict,
                 prefill_micro_batch: int, decode_micro_batch: int, max_batch: int, max_seq: int, max_queue: int,
                 mixed_steps: bool = False):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        self.stages = stages
        scheduler = Scheduler.for_batch(ring_over(stages), tokenizer, prefill_micro_batch, decode_micro_batch,
                                        max_batch, max_seq, max_queue, mixed_steps)
        self.engine = PipelineEngine(scheduler, tokenizer, model_name, lambda: plan)

    def __serve_build_asgi_app__(self):
        return build_app(lambda: self.engine)

    async def placements(self) -> list[dict]:
        """Where each stage runs (node, accelerator type): for operators and the placement test."""
        return [await h.placement.remote() for h in self.stages]

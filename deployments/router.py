"""The HTTP ingress: OpenAI-compatible API, and the scheduler that drives micro-batches through the stage
deployments over the stage ring. It follows the planner: each deployment of stages the planner makes becomes the
scheduler's chain, and the requests in flight move over to it."""

from __future__ import annotations

import asyncio
import logging

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from llmpq_serve.runtime.engine import PipelineEngine
from llmpq_serve.runtime.ring import RingChain
from llmpq_serve.runtime.scheduler import Scheduler, SchedulerOptions
from llmpq_serve.server.openai_app import build_app

logger = logging.getLogger("llmpq")
# The router and the planner hold every request and the plan: they run on the head node, which the cluster cannot
# lose without going down anyway, and not on a GPU node that may leave.
CONTROL_PLANE = {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}
STARTING = "the model is not loaded yet: the planner is deploying the stages"


def ring_over(stages: list[DeploymentHandle]) -> RingChain:
    """A ring from this replica's node through the stage deployments, in order, and back."""

    async def join(host: str, port: int) -> None:
        await asyncio.gather(*[h.join.remote(host, port, i, len(stages)) for i, h in enumerate(stages)])

    return RingChain(len(stages), ray.util.get_node_ip_address(), join)


@serve.deployment(num_replicas=1, max_ongoing_requests=1024, ray_actor_options=CONTROL_PLANE)
@serve.ingress()
class Router:
    def __init__(self, planner: DeploymentHandle, path: str, model_name: str, max_batch: int, max_seq: int,
                 scheduling: SchedulerOptions):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model_name, self.max_batch, self.max_seq = model_name, max_batch, max_seq
        self.scheduling = scheduling
        self.engine: PipelineEngine | None = None  # until the planner's first stages are up: the API answers 503
        self.not_ready = STARTING
        self.paused: str | None = None  # why the engine's stages are gone for now (a re-plan deleted them)
        self.stages: list[DeploymentHandle] = []
        self.plan: dict = {}
        self.generation = self.replans = 0
        self.planner_id: str | None = None  # whose generations these are
        self._follower = asyncio.get_event_loop().create_task(self._follow(planner))

    def __serve_build_asgi_app__(self):
        return build_app(lambda: self.engine, lambda: self.not_ready, lambda: self.paused)

    async def _follow(self, planner: DeploymentHandle) -> None:
        reason = None
        while True:
            try:
                update = await planner.next_stages.remote(self.generation, reason, self.planner_id)
                if "stages" in update:
                    await self._switch(update)
            except Exception:  # the planner restarted, the call broke, or the stages did not answer: ask again
                logger.exception("following the planner's stages failed")
                await asyncio.sleep(1.0)
                continue
            if "reason" in update:
                reason = update["reason"]
                self.not_ready = reason or STARTING
                self.paused = None if update.get("serving", True) else self.not_ready

    async def _switch(self, update: dict) -> None:
        chain = ring_over(update["stages"])
        prefill_mb, decode_mb = update["prefill_micro_batch"], update["decode_micro_batch"]
        if self.engine is None:
            scheduler = Scheduler.for_batch(chain, self.tokenizer, prefill_mb, decode_mb, self.max_batch,
                                            self.max_seq, self.scheduling)
            self.engine = PipelineEngine(scheduler, self.tokenizer, self.model_name, lambda: self.plan)
        else:
            old = self.engine.scheduler.chain
            moved = await self.engine.scheduler.switch(chain, prefill_mb, decode_mb, self.max_batch)
            old.close()
            self.replans += 1
            logger.info("moved to plan generation %d: %d requests prefilled again", update["generation"], moved)
        self.stages, self.plan, self.generation = update["stages"], update["plan"], update["generation"]
        self.paused = None
        self.planner_id = update["planner"]

    async def placements(self) -> list[dict]:
        """Where each stage runs (node, accelerator type): for operators and the placement test."""
        return [await h.placement.remote() for h in self.stages]

    def status(self) -> dict:
        """Which plan generation serves, how many times the router moved to a new one, how many requests were
        prefilled again on new or reopened stages, and the node the router runs on."""
        resumed = self.engine.scheduler.resumed if self.engine else 0
        return {"generation": self.generation, "replans": self.replans, "ready": self.engine is not None,
                "stages": len(self.stages), "resumed_requests": resumed, "node": ray.get_runtime_context().get_node_id()}

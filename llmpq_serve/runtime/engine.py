"""The engine the HTTP layer talks to: a scheduler over some stage chain, one event stream per request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from llmpq_serve.runtime.sampling import SamplingParams
from llmpq_serve.runtime.scheduler import GenerationEvent, Scheduler


class PipelineEngine:
    def __init__(self, scheduler: Scheduler, tokenizer, model_name: str, plan: Callable[[], dict]):
        self.scheduler, self.tokenizer, self.model_name = scheduler, tokenizer, model_name
        self.max_context = scheduler.max_seq
        self._plan = plan

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[GenerationEvent]:
        req = self.scheduler.submit(prompt_ids, params, request_id)
        try:
            while True:
                event = await req.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:  # finished, failed, or the client went away: the slot is freed at the next boundary
            self.scheduler.cancel(req)

    def plan(self) -> dict:
        return self._plan()

    def health(self) -> dict[str, Any]:
        """Not ready while requests wait for a lost stage: a load balancer should send new ones elsewhere."""
        s = self.scheduler
        health = {"ready": True, "queue_depth": len(s.waiting), "running": s.running, "free_slots": s.pool.free,
                  "resumed_requests": s.resumed, "stage_busy_s": [round(b, 3) for b in s.stage_busy_s]}
        if (down_s := s.down_s) is not None:
            health.update(ready=False, pipeline_down_s=round(down_s, 1),
                          reason=f"a pipeline stage has been down for {down_s:.0f} s: {len(s.live)} request(s) wait "
                                 f"for it to come back or be replaced, for up to {s.options.recovery_s:.0f} s")
        return health

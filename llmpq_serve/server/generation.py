"""One request to the engine as the HTTP layer sees it: engine failures become API errors, its timing goes to the
metrics, and closing it before it finishes cancels it in the engine."""

from __future__ import annotations

import logging
import time

import anyio

from llmpq_serve.runtime.sampling import SamplingParams
from llmpq_serve.server.engine import Engine, GenerationEvent, QueueFullError
from llmpq_serve.server.errors import APIError, engine_failed, queue_full
from llmpq_serve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class Generation:
    """Call `close()` exactly once, however the request ends."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams, request_id: str,
                 metrics: ServerMetrics) -> None:
        self.request_id = request_id
        self.last: GenerationEvent | None = None
        self._metrics = metrics
        self._failed = False
        try:
            self._events = engine.generate(prompt_ids, params, request_id)
        except Exception as exc:
            raise self._failure(exc) from exc
        self._started_at = self._first_at = self._last_at = time.monotonic()
        metrics.running.inc()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def finish_reason(self) -> str | None:
        return self.last.finish_reason if self.last is not None else None

    async def next(self) -> GenerationEvent | None:
        """The next event; None once the request has finished."""
        if self.finished:
            return None
        try:
            event = await anext(self._events)
        except StopAsyncIteration:
            raise self._failure(RuntimeError("the event stream ended before the request finished")) from None
        except Exception as exc:
            raise self._failure(exc) from exc
        self._last_at = time.monotonic()
        if self.last is None:
            self._first_at = self._last_at
            self._metrics.ttft.observe(self._first_at - self._started_at)
        self.last = event
        return event

    async def close(self) -> None:
        # Shielded: when the client goes away the request's task is being cancelled, and the engine must still hear
        # of it to free the request's KV cache.
        with anyio.CancelScope(shield=True):
            await self._events.aclose()  # type: ignore[attr-defined]  # Engine.generate's iterators have aclose()
        self._metrics.running.dec()
        if self.last is not None and self.finished:
            generated = self.last.completion_tokens
            if generated > 1:
                self._metrics.tpot.observe((self._last_at - self._first_at) / (generated - 1))
        elif not self._failed:
            self._metrics.cancelled.inc()

    def _failure(self, exc: Exception) -> APIError:
        self._failed = True
        if isinstance(exc, QueueFullError):
            return queue_full(exc.retry_after)
        logger.error("engine failed on request %s", self.request_id, exc_info=exc)
        self._metrics.engine_errors.inc()
        # The exception's text stays in the log: it may describe the deployment, which is not the client's business.
        return engine_failed(f"see the server log for request {self.request_id}")

"""What the HTTP layer needs of the model runtime: one async stream of events per request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from llmpq_serve.runtime.sampling import SamplingParams
from llmpq_serve.runtime.scheduler import GenerationEvent, QueueFullError

__all__ = ["Engine", "GenerationEvent", "QueueFullError"]


class Engine(Protocol):
    model_name: str
    max_context: int  # prompt + max_tokens must fit
    tokenizer: Any  # a transformers PreTrainedTokenizerBase

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[GenerationEvent]:
        """May raise QueueFullError when iteration starts (before the first event). The consumer calling aclose() on
        the iterator (e.g. client disconnected) cancels the request and frees its KV cache."""
        ...

    def plan(self) -> dict:
        """The live plan as a JSON-able dict."""
        ...

    def health(self) -> dict:
        """{"ready": bool, ...}; ints "queue_depth" and "resumed_requests" here are exported by /metrics."""
        ...

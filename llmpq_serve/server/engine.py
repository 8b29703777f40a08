"""What the HTTP layer needs of the model runtime: one async stream of events per request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from llmpq_serve.runtime.sampling import SamplingParams


@dataclass
class GenerationEvent:
    text: str  # text newly released to the client (may be "")
    token_ids: list[int]  # token ids generated in this step
    finish_reason: str | None  # "stop" | "length" | None (None = more to come)
    prompt_tokens: int
    completion_tokens: int  # total generated so far


class QueueFullError(Exception):
    """The engine admits no more requests for now; the client may retry after `retry_after` seconds."""

    def __init__(self, retry_after: float, message: str = "the request queue is full") -> None:
        super().__init__(message)
        self.retry_after = retry_after


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
        """{"ready": bool, ...}; an int "queue_depth" here is exported by /metrics."""
        ...

"""A generation as each endpoint writes it: the whole response, or the chunks of its stream."""

from __future__ import annotations

import time
from typing import Protocol

from pydantic import BaseModel

from llmpq_serve.server.engine import GenerationEvent
from llmpq_serve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
    Delta,
    Usage,
)


class Format(Protocol):
    def opening(self) -> list[BaseModel]:
        """Chunks that start a stream, before the first token."""
        ...

    def chunk(self, event: GenerationEvent) -> BaseModel: ...

    def usage_chunk(self, usage: Usage) -> BaseModel: ...

    def response(self, text: str, finish_reason: str | None, usage: Usage) -> BaseModel: ...


class CompletionFormat:
    def __init__(self, request_id: str, model: str) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())

    def opening(self) -> list[BaseModel]:
        return []

    def chunk(self, event: GenerationEvent) -> BaseModel:
        choice = CompletionChoice(text=event.text, finish_reason=event.finish_reason)
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def response(self, text: str, finish_reason: str | None, usage: Usage) -> BaseModel:
        choice = CompletionChoice(text=text, finish_reason=finish_reason)
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage)


class ChatFormat:
    def __init__(self, request_id: str, model: str) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())

    def opening(self) -> list[BaseModel]:
        # OpenAI streams the assistant's role on its own before any content.
        choice = ChatChunkChoice(delta=Delta(role="assistant", content=""))
        return [ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])]

    def chunk(self, event: GenerationEvent) -> BaseModel:
        choice = ChatChunkChoice(delta=Delta(content=event.text), finish_reason=event.finish_reason)
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def response(self, text: str, finish_reason: str | None, usage: Usage) -> BaseModel:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice],
                                      usage=usage)

"""A request's choices as each endpoint writes them: the whole response, or the chunks of its stream."""

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
    def opening(self, choices: int) -> list[BaseModel]:
        """Chunks that start a stream, before the first token."""
        ...

    def chunk(self, index: int, event: GenerationEvent) -> BaseModel: ...

    def usage_chunk(self, usage: Usage) -> BaseModel: ...

    def response(self, choices: list[tuple[str, str | None]], usage: Usage) -> BaseModel:
        """`choices`: (text, finish reason) of each choice, in index order."""
        ...


class CompletionFormat:
    def __init__(self, request_id: str, model: str) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())

    def opening(self, choices: int) -> list[BaseModel]:
        return []

    def chunk(self, index: int, event: GenerationEvent) -> BaseModel:
        choice = CompletionChoice(index=index, text=event.text, finish_reason=event.finish_reason)
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def response(self, choices: list[tuple[str, str | None]], usage: Usage) -> BaseModel:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, usage=usage, choices=[
            CompletionChoice(index=i, text=text, finish_reason=reason) for i, (text, reason) in enumerate(choices)])


class ChatFormat:
    def __init__(self, request_id: str, model: str) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())

    def opening(self, choices: int) -> list[BaseModel]:
        # OpenAI streams each choice's assistant role on its own before any content.
        return [ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                    choices=[ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
                for i in range(choices)]

    def chunk(self, index: int, event: GenerationEvent) -> BaseModel:
        choice = ChatChunkChoice(index=index, delta=Delta(content=event.text), finish_reason=event.finish_reason)
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def response(self, choices: list[tuple[str, str | None]], usage: Usage) -> BaseModel:
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, usage=usage, choices=[
            ChatChoice(index=i, message=AssistantMessage(content=text), finish_reason=reason)
            for i, (text, reason) in enumerate(choices)])

"""Server-sent events, as OpenAI streams them: `data: {json}` events, then `data: [DONE]`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = "data: [DONE]\n\n"


def event(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


class EventStream(StreamingResponse):
    """Runs `on_close` however the response ends. Starlette leaves the body iterator suspended when the client goes
    away (or never starts it, if the client left before the headers went out), so cleanup that must happen at once,
    such as cancelling the engine's request, cannot rely on the body's own `finally`."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(body, headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Shielded: when the client disconnects this task is being cancelled, which would cut the cleanup short.
            with anyio.CancelScope(shield=True):
                await self._on_close()

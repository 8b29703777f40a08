"""The generations one HTTP request asks for (each prompt of a batch, `n` times), run side by side in the engine:
submitted together, so they share micro-batches, and their events merged in the order they come."""

from __future__ import annotations

import asyncio

from llmpq_serve.server.engine import GenerationEvent
from llmpq_serve.server.errors import APIError
from llmpq_serve.server.generation import Generation
from llmpq_serve.server.protocol import Usage


class Choices:
    """Choice i is `generations[i]`. Call `close()` exactly once, however the request ends: it cancels the choices
    not finished."""

    def __init__(self, generations: list[Generation], prompt_tokens: int) -> None:
        self.generations, self.prompt_tokens = generations, prompt_tokens
        self._events: asyncio.Queue[tuple[int, GenerationEvent | APIError | None]] = asyncio.Queue()
        self._running = self._unanswered = len(generations)
        self._answered = asyncio.Event()
        self._early_error: APIError | None = None  # of a choice that failed before its first event
        self._closed: set[int] = set()
        # an engine request is submitted when its task first asks for an event: all of them in the same loop turn.
        # One choice, the common case, is read straight from its generation: merging costs a task hop per event
        self._tasks = [asyncio.create_task(self._follow(i, g)) for i, g in enumerate(generations)
                       ] if len(generations) > 1 else []

    async def _follow(self, index: int, gen: Generation) -> None:
        answered = False
        try:
            while (event := await gen.next()) is not None:
                if not answered:
                    answered = True
                    self._answer()
                self._events.put_nowait((index, event))
        except APIError as err:
            if not answered and self._early_error is None:
                self._early_error = err
                # at once: waiting for the other choices' first tokens would hold a 429 until the queue ahead
                # of them had drained, the very moment the server is overloaded
                self._answered.set()
            self._events.put_nowait((index, err))
        finally:
            if not answered:
                self._answer()
            self._closed.add(index)
            await gen.close()
            self._events.put_nowait((index, None))

    def _answer(self) -> None:
        self._unanswered -= 1
        if not self._unanswered:
            self._answered.set()

    async def next(self) -> tuple[int, GenerationEvent] | None:
        """(choice index, its next event); None once every choice has finished. Nothing comes until every choice
        has its first event or has failed: a choice refused (429) or failed before its first event fails the whole
        request while its status code can still say so. Later, raises the first choice error."""
        if not self._tasks:
            event = await self.generations[0].next()
            return None if event is None else (0, event)
        await self._answered.wait()
        if self._early_error is not None:
            raise self._early_error
        while self._running:
            index, item = await self._events.get()
            if item is None:
                self._running -= 1
            elif isinstance(item, APIError):
                raise item
            else:
                return index, item
        return None

    def finish_reason(self, index: int) -> str | None:
        return self.generations[index].finish_reason

    def usage(self) -> Usage:
        """Each prompt's tokens once, however many choices it has (as OpenAI counts them), and every choice's."""
        completion = sum(g.last.completion_tokens for g in self.generations if g.last is not None)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # a single choice has no task, and a task cancelled before it ever ran never closed its own
        for index, gen in enumerate(self.generations):
            if index not in self._closed:
                await gen.close()

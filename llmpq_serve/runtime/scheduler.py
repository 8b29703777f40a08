"""Phase-aware micro-batch scheduling over a chain of stages, written once for every transport.

Prefill micro-batches (up to `prefill_micro_batch` new requests) and decode micro-batches (one per slot group of
`decode_micro_batch` requests) travel the chain stage by stage. Each stage runs one micro-batch at a time, in
arrival order, and many micro-batches are on their way at once, so while stage k runs one micro-batch stage k+1
runs the one before it: the pipe stays full. Batching is continuous: a request joins its group's next decode step
as soon as its prefill is done, and leaves at the step it finishes; nobody waits for a whole batch.

With `mixed_steps` a prefill micro-batch that arrives while requests are decoding rides along with the next decode
step of a group instead of travelling on its own: the stage runs both in one pass and reads its weights once. On the
2-core CPU demo that cut the stages' compute by about 10%, but the new request waits for a step boundary and every
decoding request waits for the prefill, so closed-loop throughput fell by 3-7%: it is off by default, and the phases
stay apart, as the LLM-PQ cost model describes them."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch

from llmpq_serve.runtime.kvcache import SlotPool
from llmpq_serve.runtime.sampling import Detokenizer, SamplingParams, make_generator, sample


@dataclass(frozen=True)
class RowsSpec:
    """A micro-batch's rows as plain lists (what crosses to a stage): cache slot, first position, new tokens."""

    slots: list[int]
    starts: list[int]
    counts: list[int]


class StageChain(Protocol):
    """The transport: runs micro-batch `rows` with input `x` (the rows' new token ids, packed [tokens]) through
    every stage, each stage taking micro-batches one at a time in the order they were given, and returns the last
    stage's logits [B, vocab] of each row's last token. `busy_s[k]`: seconds stage k has spent running micro-batches."""

    stages: int
    busy_s: list[float]

    async def forward(self, rows: RowsSpec, x: torch.Tensor) -> torch.Tensor: ...


class QueueFullError(Exception):
    """The engine admits no more requests for now; the client may retry after `retry_after` seconds."""

    def __init__(self, retry_after: float, message: str = "the request queue is full") -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class GenerationEvent:
    text: str  # text newly released to the client (may be "")
    token_ids: list[int]  # token ids generated in this step
    finish_reason: str | None  # "stop" | "length" | None (None = more to come)
    prompt_tokens: int
    completion_tokens: int  # total generated so far


@dataclass
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    detok: Detokenizer
    generator: torch.Generator | None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    slot: int = -1
    length: int = 0  # tokens in the KV cache
    done: bool = False
    cancelled: bool = False

    @property
    def last_token(self) -> int:
        return self.detok.token_ids[-1]


def slot_count(max_batch: int, decode_micro_batch: int) -> int:
    """KV-cache slots for `max_batch` concurrent requests: whole groups of one decode micro-batch each."""
    return math.ceil(max_batch / decode_micro_batch) * decode_micro_batch


class Scheduler:
    def __init__(self, chain: StageChain, tokenizer, prefill_micro_batch: int, decode_micro_batch: int,
                 groups: int, max_seq: int, max_queue: int = 256, mixed_steps: bool = False):
        self.chain, self.tokenizer = chain, tokenizer
        self.prefill_mb, self.decode_mb = prefill_micro_batch, decode_micro_batch
        self.max_seq, self.max_queue, self.mixed = max_seq, max_queue, mixed_steps
        self.pool = SlotPool(groups, decode_micro_batch)
        self.waiting: deque[Request] = deque()
        self.admitted: deque[list[Request]] = deque()  # prefill micro-batches waiting for a step to carry them
        self.decoding: list[dict[str, Request]] = [{} for _ in range(groups)]
        self._wake = asyncio.Event()
        self._group_wake = [asyncio.Event() for _ in range(groups)]
        self._tasks: list[asyncio.Task] = []
        self._ids = itertools.count()

    @classmethod
    def for_batch(cls, chain: StageChain, tokenizer, prefill_micro_batch: int, decode_micro_batch: int,
                  max_batch: int, max_seq: int, max_queue: int, mixed_steps: bool = False) -> Scheduler:
        """A scheduler with room for `max_batch` concurrent requests."""
        return cls(chain, tokenizer, prefill_micro_batch, decode_micro_batch,
                   slot_count(max_batch, decode_micro_batch) // decode_micro_batch, max_seq, max_queue, mixed_steps)

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._admit_loop())]
            self._tasks += [asyncio.create_task(self._decode_loop(g)) for g in range(self.pool.groups)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    @property
    def stage_busy_s(self) -> list[float]:
        return self.chain.busy_s

    @property
    def running(self) -> int:
        return sum(len(g) for g in self.decoding)

    # ---- requests -------------------------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + params.max_tokens > self.max_seq:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context of {self.max_seq} tokens")
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(retry_after=1.0)
        self.start()
        req = Request(request_id or f"req-{next(self._ids)}", list(prompt), params,
                      Detokenizer(self.tokenizer, params, self.tokenizer.eos_token_id), make_generator(params))
        self.waiting.append(req)
        self._wake.set()
        return req

    def cancel(self, req: Request) -> None:
        """Frees the request's slot at the next micro-batch boundary (at once if it never got one)."""
        if req.done:
            return
        req.cancelled = True
        if req in self.waiting:
            self.waiting.remove(req)
            req.done = True

    def _finish(self, req: Request) -> None:
        req.done = True
        if req.slot >= 0:
            self.decoding[self.pool.group_of(req.slot)].pop(req.id, None)
            self.pool.release(req.id)
            req.slot = -1
        self._wake.set()

    def _fail(self, reqs: list[Request], error: BaseException) -> None:
        for req in reqs:
            if not req.done:
                req.events.put_nowait(error)
                self._finish(req)

    # ---- sampling -------------------------------------------------------------------------------------------------
    def _emit(self, reqs: list[Request], logits: torch.Tensor) -> None:
        tokens = sample(logits, [r.params for r in reqs], [r.generator for r in reqs])
        for req, tok in zip(reqs, tokens):
            if req.cancelled:
                self._finish(req)
                continue
            text, finish = req.detok.add(tok)
            req.events.put_nowait(GenerationEvent(text, [tok], finish, len(req.prompt), len(req.detok.token_ids)))
            if finish is not None:
                self._finish(req)

    # ---- admission ------------------------------------------------------------------------------------------------
    async def _admit_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.waiting and self.pool.free:
                batch = []
                while self.waiting and self.pool.free and len(batch) < self.prefill_mb:
                    req = self.waiting.popleft()
                    req.slot = self.pool.allocate(req.id)
                    batch.append(req)
                if self.mixed and self.running:
                    self.admitted.append(batch)
                    # its own group carries it: that group is either stepping already or idle and free to go now
                    self._group_wake[self.pool.group_of(batch[0].slot)].set()
                else:  # nothing is decoding to ride along with (a burst of arrivals): fill the pipe at once
                    asyncio.create_task(self._step([], batch))

    # ---- steps ----------------------------------------------------------------------------------------------------
    async def _decode_loop(self, group: int) -> None:
        members = self.decoding[group]
        while True:
            for r in [r for r in members.values() if r.cancelled]:
                self._finish(r)
            fresh = self.admitted.popleft() if self.admitted else []
            if not members and not fresh:
                self._group_wake[group].clear()
                await self._group_wake[group].wait()
                continue
            await self._step(sorted(members.values(), key=lambda r: r.slot), fresh)

    async def _step(self, decode: list[Request], fresh: list[Request]) -> None:
        """One micro-batch: the next token of every `decode` request, and the prefill of every `fresh` one."""
        step = decode + fresh
        rows = RowsSpec([r.slot for r in step], [r.length for r in decode] + [0] * len(fresh),
                        [1] * len(decode) + [len(r.prompt) for r in fresh])
        x = torch.tensor([r.last_token for r in decode] + [t for r in fresh for t in r.prompt], dtype=torch.long)
        try:
            logits = await self.chain.forward(rows, x)
        except Exception as e:  # noqa: BLE001 - a stage failed: these requests end with the error, the others go on
            self._fail(step, e)
            return
        for r in decode:
            r.length += 1
        for r in fresh:
            r.length = len(r.prompt)
        self._emit(step, logits)
        for r in fresh:
            if not r.done:
                g = self.pool.group_of(r.slot)
                self.decoding[g][r.id] = r
                self._group_wake[g].set()

"""Phase-aware micro-batch scheduling over a chain of stages, written once for every transport.

Prefill micro-batches (up to `prefill_micro_batch` new requests) and decode micro-batches (one per slot group of
`decode_micro_batch` requests) travel the chain stage by stage. Each stage runs one micro-batch of each phase at a
time, in arrival order (a transport may run a decode step beside a prefill, or keep to one micro-batch at a time),
and many micro-batches are on their way at once, so while stage k runs one micro-batch stage k+1 runs the one before
it: the pipe stays full. Batching is continuous: a request joins its group's next decode step as soon as its prefill
is done, and leaves at the step it finishes; nobody waits for a whole batch.

With `mixed_steps` a prefill micro-batch that arrives while requests are decoding rides along with the next decode
step of a group instead of travelling on its own: the stage runs both in one pass and reads its weights once. On the
2-core CPU demo that cut the stages' compute by about 10%, but the new request waits for a step boundary and every
decoding request waits for the prefill, so closed-loop throughput fell by 3-7%: it is off by default, and the phases
stay apart, as the LLM-PQ cost model describes them.

With `prefill_chunk` a standalone prefill carries at most that many prompt tokens per micro-batch; a long prompt goes
in pieces, each continuing in the cache where the last stopped, so it never holds a decode micro-batch up at a stage
for longer than one piece takes. On the CPU demo (prompts of 16-96 tokens, stages sharing 2 cores) pieces of 28
tokens lost throughput (599 against 653 tok/s): the stages' idle halves the pieces fill are the cores the router and
the clients use, and a request's slot idles longer before it decodes. Off by default; for long prompts on GPUs.

With `prefill_wait_s` a prefill micro-batch that the pipe has room for but that is not full waits until it is, or
until its oldest request has waited that long. Requests sent at once never arrive at once (over HTTP on the CPU demo,
8 of them reach the router over ~10 ms), and without the wait the first goes in alone, the next ones too while the
pipe has room: 5 prefill micro-batches where the plan has 4, 4 where it has 2, each paying a stage's fixed cost per
call. A request that comes alone pays the wait once, in its time to first token."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch

from llmpq_serve.runtime.kvcache import SlotPool
from llmpq_serve.runtime.sampling import Detokenizer, SamplingParams, make_generator, sample
from llmpq_serve.spec import slot_count


@dataclass(frozen=True)
class RowsSpec:
    """A micro-batch's rows as plain lists (what crosses to a stage): cache slot, first position, new tokens."""

    slots: list[int]
    starts: list[int]
    counts: list[int]
    # slots to zero before the micro-batch runs: their last owner left a NaN or infinity in their K/V, which masked
    # attention would still read (as 0 * NaN) into the next owner's output, and that one's into the next
    clear: tuple[int, ...] = ()

    @property
    def decode(self) -> bool:
        """A decode micro-batch: one new token per row (a stage may run it beside a prefill)."""
        return all(n == 1 for n in self.counts)


class StageChain(Protocol):
    """The transport: runs micro-batch `rows` with input `x` (the rows' new token ids, packed [tokens]) through
    every stage, each stage taking a phase's micro-batches one at a time in the order they were given (a decode
    micro-batch may overtake a prefill), and returns the last stage's logits [B, vocab] of each row's last token.
    `busy_s[k]`: seconds stage k has spent running micro-batches."""

    stages: int
    busy_s: list[float]

    async def forward(self, rows: RowsSpec, x: torch.Tensor) -> torch.Tensor: ...


class ChainLostError(RuntimeError):
    """The chain itself is down (a stage's process or node is gone), not one micro-batch's work: the scheduler keeps
    the requests on their way and prefills them again once the chain is back or replaced."""


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
    arrived: float = field(default_factory=time.monotonic)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    slot: int = -1
    length: int = 0  # tokens in the KV cache
    done: bool = False
    cancelled: bool = False

    @property
    def last_token(self) -> int:
        return self.detok.token_ids[-1]

    @property
    def context(self) -> list[int]:
        """What a prefill of this request runs: its prompt, and after a switch to a new chain also the tokens it had
        produced, whose KV entries went with the old chain."""
        return self.prompt + self.detok.token_ids


@dataclass(frozen=True)
class SchedulerOptions:
    """How the scheduler admits and forms micro-batches, besides the plan's micro-batch sizes (see the module's
    doc); the serve config's `scheduling()` gives them for a deployment."""

    max_queue: int = 256  # waiting requests beyond which `submit` refuses more
    mixed_steps: bool = False
    recovery_s: float = 300.0  # how long requests wait for a lost chain to come back (or be replaced) before failing
    prefill_chunk: int | None = None  # prompt tokens per standalone prefill micro-batch (None: whole prompts)
    prefill_wait_s: float = 0.0  # how long a partial standalone prefill micro-batch may wait to fill


class Scheduler:
    def __init__(self, chain: StageChain, tokenizer, prefill_micro_batch: int, decode_micro_batch: int,
                 groups: int, max_seq: int, options: SchedulerOptions = SchedulerOptions()):
        self.tokenizer = tokenizer
        self.max_seq, self.options = max_seq, options
        self._lost_since: float | None = None
        self.resumed = 0  # requests prefilled again with their tokens after a switch or a lost chain
        self._recovery: asyncio.Task | None = None
        self.waiting: deque[Request] = deque()
        self.live: dict[str, Request] = {}  # every request not finished, in arrival order
        self._wake = asyncio.Event()
        self._arrival = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._steps: set[asyncio.Task] = set()  # standalone prefill steps on their way
        self._ids = itertools.count()
        self._poisoned: set[int] = set()  # slots whose K/V hold a NaN or infinity on some stage (RowsSpec.clear)
        self._use(chain, prefill_micro_batch, decode_micro_batch, groups)

    def _use(self, chain: StageChain, prefill_micro_batch: int, decode_micro_batch: int, groups: int) -> None:
        self.chain = chain
        self.prefill_mb, self.decode_mb = prefill_micro_batch, decode_micro_batch
        self.pool = SlotPool(groups, decode_micro_batch)
        self.admitted: deque[list[Request]] = deque()  # prefill micro-batches waiting for a step to carry them
        self.decoding: list[dict[str, Request]] = [{} for _ in range(groups)]
        self._group_wake = [asyncio.Event() for _ in range(groups)]
        # standalone prefill micro-batches in the chain: at most one per stage. Requests that arrive meanwhile wait
        # and form the next micro-batch together, as planned, instead of each going in alone
        self._prefill_room = asyncio.Semaphore(chain.stages)

    @classmethod
    def for_batch(cls, chain: StageChain, tokenizer, prefill_micro_batch: int, decode_micro_batch: int,
                  max_batch: int, max_seq: int, options: SchedulerOptions = SchedulerOptions()) -> Scheduler:
        """A scheduler with room for `max_batch` concurrent requests."""
        return cls(chain, tokenizer, prefill_micro_batch, decode_micro_batch,
                   slot_count(max_batch, decode_micro_batch) // decode_micro_batch, max_seq, options)

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._admit_loop())]
            self._tasks += [asyncio.create_task(self._decode_loop(g)) for g in range(self.pool.groups)]

    async def stop(self) -> None:
        tasks = self._tasks + list(self._steps)
        if self._recovery is not None and self._recovery is not asyncio.current_task():
            tasks.append(self._recovery)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []

    async def switch(self, chain: StageChain, prefill_micro_batch: int | None = None,
                     decode_micro_batch: int | None = None, max_batch: int | None = None) -> int:
        """Moves every live request onto a new chain (a re-plan: other stages, devices or micro-batch sizes). The
        micro-batches on their way through the old chain are abandoned; each request that had started is prefilled
        again on the new chain with its prompt and the tokens it has produced, then decodes on, so its client's
        stream goes on where it was. Requests keep their order. Returns how many had started."""
        if chain is not self.chain:
            self._lost_since = None
            self._poisoned.clear()  # a new chain's caches are new
        await self.stop()
        pmb = prefill_micro_batch or self.prefill_mb
        dmb = decode_micro_batch or self.decode_mb
        groups = slot_count(max_batch, dmb) // dmb if max_batch else self.pool.slots // dmb or 1
        # cancelled requests go with the old pool, whose slots they hold: the new one may have fewer
        for req in [r for r in self.live.values() if r.cancelled]:
            self._finish(req)
        self._use(chain, pmb, dmb, groups)
        started = 0
        for req in self.live.values():
            started += req.slot >= 0
            req.slot, req.length = -1, 0
        self.resumed += started
        self.waiting = deque(self.live.values())
        if self.waiting:
            self.start()
            self._wake.set()
        return started

    @property
    def stage_busy_s(self) -> list[float]:
        return self.chain.busy_s

    @property
    def down_s(self) -> float | None:
        """Seconds since the chain was lost while requests wait for it to come back or be replaced; None while it
        serves, or once nothing waits on it (the next request finds out whether it is back)."""
        return None if self._lost_since is None else time.monotonic() - self._lost_since

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
        if request_id in self.live:  # the two would share its KV slot and its place in the decode group
            raise ValueError(f"a request with id {request_id!r} is already running")
        if len(self.waiting) >= self.options.max_queue:
            raise QueueFullError(retry_after=1.0)
        self.start()
        req = Request(request_id or f"req-{next(self._ids)}", list(prompt), params,
                      Detokenizer(self.tokenizer, params, self.tokenizer.eos_token_id), make_generator(params))
        self.waiting.append(req)
        self.live[req.id] = req
        self._wake.set()
        self._arrival.set()
        return req

    def cancel(self, req: Request) -> None:
        """Frees the request's slot at the next micro-batch boundary (at once if it never got one)."""
        if req.done:
            return
        req.cancelled = True
        if req in self.waiting:
            self.waiting.remove(req)
            self._finish(req)

    def _finish(self, req: Request) -> None:
        req.done = True
        self.live.pop(req.id, None)
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

    # ---- a lost chain ---------------------------------------------------------------------------------------------
    def _chain_lost(self, error: ChainLostError) -> None:
        if self._lost_since is None:
            self._lost_since = time.monotonic()
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.create_task(self._recover(error))

    async def _recover(self, error: ChainLostError) -> None:
        """Every live request again, from its prompt and tokens, on the chain as it is now (a transport reopens a
        broken chain on its next micro-batch); until `recovery_s` has passed, then they fail."""
        await asyncio.sleep(0.5)  # the other micro-batches of the broken chain fail meanwhile
        # a step that got through meanwhile (the transport reopened the chain) has reset `_lost_since`; the requests
        # whose micro-batches were lost still need the switch to go on
        lost_since = self._lost_since
        if lost_since is None or time.monotonic() - lost_since <= self.options.recovery_s:
            await self.switch(self.chain)
            if not self.live:  # no step will tell whether the chain is back: a request that comes will
                self._lost_since = None
            return
        await self.stop()
        lost = ChainLostError(f"the pipeline has been down for over {self.options.recovery_s:.0f} s: {error}")
        self._fail(list(self.live.values()), lost)
        self.waiting.clear()
        self._use(self.chain, self.prefill_mb, self.decode_mb, self.pool.groups)
        self._lost_since = None

    # ---- sampling -------------------------------------------------------------------------------------------------
    def _emit(self, reqs: list[Request], logits: torch.Tensor) -> None:
        tokens = sample(logits, [r.params for r in reqs], [r.generator for r in reqs])
        for req, tok in zip(reqs, tokens):
            if req.cancelled:
                self._finish(req)
                continue
            if tok is None:
                self._poisoned.add(req.slot)
                self._fail([req], RuntimeError("the model's logits for this request hold a NaN or infinity, from "
                                               "which no token can be drawn"))
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
                standalone = not (self.options.mixed_steps and self.running)
                if standalone:
                    await self._prefill_room.acquire()
                    await self._until_filled()
                    if not (self.waiting and self.pool.free):  # cancelled or taken meanwhile
                        self._prefill_room.release()
                        break
                batch = []
                while self.waiting and self.pool.free and len(batch) < self.prefill_mb:
                    req = self.waiting.popleft()
                    req.slot = self.pool.allocate(req.id)
                    batch.append(req)
                if not standalone:
                    self.admitted.append(batch)
                    # its own group carries it: that group is either stepping already or idle and free to go now
                    self._group_wake[self.pool.group_of(batch[0].slot)].set()
                else:  # nothing is decoding to ride along with (a burst of arrivals): fill the pipe at once
                    task = asyncio.create_task(self._prefill(batch))
                    self._steps.add(task)
                    task.add_done_callback(self._steps.discard)
                    room = self._prefill_room  # a switch replaces it: release the one taken
                    task.add_done_callback(lambda _, room=room: room.release())

    async def _until_filled(self) -> None:
        """Returns once the next prefill micro-batch is full (as many waiting requests as it or the free slots hold)
        or its oldest request has waited `prefill_wait_s`."""
        while self.waiting and len(self.waiting) < min(self.prefill_mb, self.pool.free):
            left = self.waiting[0].arrived + self.options.prefill_wait_s - time.monotonic()
            if left <= 0:
                return
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), left)
            except asyncio.TimeoutError:  # not TimeoutError: on Python 3.10 the two differ
                return

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
            if not await self._step(sorted(members.values(), key=lambda r: r.slot),
                                    [(r, len(r.context) - r.length) for r in fresh]):
                # the recovery restarts every loop once it has moved the requests on; retrying here at once would
                # only open the lost chain again and again
                return

    async def _prefill(self, batch: list[Request]) -> None:
        """The prefill of `batch` on its own micro-batches: whole prompts in one, or with `prefill_chunk` that many
        prompt tokens per micro-batch, the next sent when the last is back. A prefill longer than a decode step then
        does not hold the decode micro-batch up at every stage: its pieces run on each stage while the decode
        micro-batch is on another one, in the time the stage would otherwise wait."""
        todo = {r.id: len(r.context) for r in batch}
        while batch:
            budget, part = self.options.prefill_chunk or math.inf, []
            for r in batch:
                take = min(budget, todo[r.id] - r.length)
                if take <= 0:
                    break
                part.append((r, take))
                budget -= take
            if not await self._step([], part):
                return
            for r in batch:
                if r.cancelled and not r.done:
                    self._finish(r)
            batch = [r for r in batch if not r.done and r.length < todo[r.id]]

    async def _step(self, decode: list[Request], fresh: list[tuple[Request, int]]) -> bool:
        """One micro-batch: the next token of every `decode` request, and the next n prompt tokens of every `fresh`
        (request, n); a fresh request whose whole context is then in the cache gets its first token. False when the
        chain is lost."""
        step = decode + [r for r, _ in fresh]
        pieces = [r.context[r.length:r.length + n] for r, n in fresh]
        slots = [r.slot for r in step]
        clear = tuple(s for s in slots if s in self._poisoned) if self._poisoned else ()
        rows = RowsSpec(slots, [r.length for r in step], [1] * len(decode) + [len(p) for p in pieces], clear)
        x = torch.tensor([r.last_token for r in decode] + [t for p in pieces for t in p], dtype=torch.long)
        try:
            logits = await self.chain.forward(rows, x)
            self._poisoned.difference_update(clear)
        except ChainLostError as e:
            self._chain_lost(e)
            return False
        except Exception as e:  # noqa: BLE001 - a stage failed: these requests end with the error, the others go on
            self._fail(step, e)
            return True
        self._lost_since = None
        for r in decode:
            r.length += 1
        for (r, _), p in zip(fresh, pieces):
            r.length += len(p)
        ready = [i for i, r in enumerate(step) if i < len(decode) or r.length == len(r.context)]
        prefilled = [step[i] for i in ready if i >= len(decode)]
        try:
            self._emit([step[i] for i in ready], logits if len(ready) == len(step) else logits[ready])
        except Exception as e:  # noqa: BLE001 - turning them into tokens and text failed: fail these, not the loop
            self._fail(step, e)
            return True
        for r in prefilled:
            if not r.done:
                g = self.pool.group_of(r.slot)
                self.decoding[g][r.id] = r
                self._group_wake[g].set()
        return True

"""The pipeline's data plane: micro-batches travel router -> stage 0 -> ... -> last stage -> router over
point-to-point torch.distributed (gloo) links, as pipeline-parallel engines do, rather than as one RPC per hop.

A Ray Serve handle call cost about a millisecond of CPU on each side and two of latency per hop on the CPU demo; a
gloo send over an open TCP link costs well under a tenth of that. With a hop per stage per decode step, that
difference was a large part of every step. Control (where to connect, placement, health) stays on Serve handles.

Ranks: the router is 0, stage i is i + 1. Each stage runs one loop thread: receive from the previous rank, run the
micro-batch, send to the next; so every stage works on micro-batches in arrival order, one at a time, and several
micro-batches are in the ring at once. A failed micro-batch travels on as an error message, keeping the order; a
stage process that dies closes its links, and everything waiting on them fails instead of hanging."""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import pickle
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from llmpq_serve.runtime.scheduler import ChainLostError
from llmpq_serve.runtime.transfer import to_host

logger = logging.getLogger(__name__)

# Links stay open while the service idles; a dead peer is noticed by its closed socket, not by this timeout.
LINK_TIMEOUT = datetime.timedelta(days=365)
CONNECT_TIMEOUT = datetime.timedelta(minutes=10)  # every rank must have joined by then (stages load their weights)
JOIN_TIMEOUT_S = 60.0  # the stages' answer to a join call (a replica on a node that left never answers)
_TAG = 0


def connect(host: str, port: int, rank: int, world: int) -> dist.ProcessGroup:
    """This process's links to the others of a ring whose rank 0 listens on host:port; blocks until all joined."""
    store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=CONNECT_TIMEOUT,
                          wait_for_workers=False)
    # a fresh group object, not the process-wide default group: a redeploy builds a new ring in the same process
    return dist.ProcessGroupGloo(store, rank, world, LINK_TIMEOUT)


class RingError(RuntimeError):
    """A micro-batch failed on a stage; the message says which and why."""


class RingDownError(RingError, ChainLostError):
    """The ring itself broke or could not open (a stage's process is gone): the scheduler keeps the requests."""


def send(group: dist.ProcessGroup, dst: int, meta: dict, payload: torch.Tensor | None) -> None:
    """One message: a size header, then the pickled metadata and the payload's bytes in one buffer."""
    meta = dict(meta)
    body = b""
    if payload is not None:
        payload = to_host(payload.detach()).contiguous()
        meta["dtype"], meta["shape"] = payload.dtype, tuple(payload.shape)
        body = payload.view(-1).view(torch.uint8)
    header = pickle.dumps(meta)
    # padded to 8 bytes so that the payload after it can be viewed as any dtype (pickle ignores the padding)
    head = torch.frombuffer(bytearray(header + bytes(-len(header) % 8)), dtype=torch.uint8)
    buffer = torch.cat([head, body]) if len(body) else head
    group.send([torch.tensor([buffer.numel(), head.numel()], dtype=torch.int64)], dst, _TAG).wait()
    group.send([buffer], dst, _TAG).wait()


def recv(group: dist.ProcessGroup, src: int) -> tuple[dict, torch.Tensor | None]:
    sizes = torch.empty(2, dtype=torch.int64)
    group.recv([sizes], src, _TAG).wait()
    total, head = sizes.tolist()
    buffer = torch.empty(total, dtype=torch.uint8)
    group.recv([buffer], src, _TAG).wait()
    meta = pickle.loads(buffer[:head].numpy().tobytes())
    if "dtype" not in meta:
        return meta, None
    payload = buffer[head:].view(meta.pop("dtype")).reshape(meta.pop("shape"))
    return meta, payload


class StageLoop:
    """A stage's side of the ring: `run(rows, x)` on every micro-batch that arrives, in order, in its own thread."""

    def __init__(self, run: Callable[[Any, torch.Tensor], torch.Tensor], index: int, stages: int):
        self.run, self.index, self.stages = run, index, stages
        self.thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> None:
        self.thread = threading.Thread(target=self._serve, args=(host, port), name=f"ring-stage{self.index}",
                                       daemon=True)
        self.thread.start()

    def _serve(self, host: str, port: int) -> None:
        rank, world = self.index + 1, self.stages + 1
        try:
            group = connect(host, port, rank, world)
        except Exception:  # the router times out waiting for this stage and reports it
            logger.exception("stage %d could not join the ring at %s:%d", self.index, host, port)
            return
        prev, nxt = rank - 1, (rank + 1) % world
        while True:
            try:
                meta, x = recv(group, prev)
            except Exception:  # a peer went away: this ring is over, a redeploy builds a new one
                logger.warning("stage %d: ring closed", self.index, exc_info=True)
                return
            out = None
            if "error" not in meta:
                start = time.perf_counter()
                try:
                    out = self.run(meta["rows"], x)
                except Exception as e:  # this micro-batch fails; the ring and its order go on
                    logger.exception("stage %d failed on a micro-batch", self.index)
                    meta = {"error": f"stage {self.index}: {type(e).__name__}: {e}"}
                else:
                    meta["busy"] = [*meta.get("busy", []), time.perf_counter() - start]
            try:
                send(group, nxt, meta, out)
            except Exception:  # as for recv
                logger.warning("stage %d: ring closed", self.index, exc_info=True)
                return


class RingChain:
    """The router's side: a StageChain whose `forward` sends a micro-batch into the ring and awaits what the last
    stage returns. Micro-batches come back in the order they were sent, so results are matched by position.

    `join(host, port)` must make every stage start its StageLoop against host:port (the Ray layer does it with a
    handle call per stage). The ring opens on the first micro-batch; if it breaks (a stage process died), the
    micro-batches in it fail with RingDownError and the next one opens a new ring, so a restarted stage brings the
    service back. `close()` lets go of it for good (a re-plan moved on to other stages)."""

    def __init__(self, stages: int, host: str, join: Callable[[str, int], Any]):
        self.stages = stages
        self.busy_s = [0.0] * stages
        self._host, self._join = host, join
        self._link: asyncio.Task | None = None

    async def forward(self, rows: Any, x: torch.Tensor) -> torch.Tensor:
        if self._link is None or (self._link.done() and (self._link.exception() or self._link.result().broken)):
            self._link = asyncio.ensure_future(self._open())
        try:
            link = await asyncio.shield(self._link)
        except (asyncio.CancelledError, RingDownError):
            raise
        except Exception as e:  # a stage could not join: the chain is as down as with a broken ring
            raise RingDownError(f"the stage ring could not open: {type(e).__name__}: {e}") from e
        future = asyncio.get_running_loop().create_future()
        link.outbox.put((rows, x, future))
        return await future

    async def _open(self) -> _Link:
        port = free_port(self._host)
        opened = asyncio.get_running_loop().run_in_executor(None, connect, self._host, port, 0, self.stages + 1)
        await asyncio.wait_for(self._join(self._host, port), JOIN_TIMEOUT_S)
        return _Link(await opened, self.stages, self.busy_s)

    def close(self) -> None:
        """Drop the open ring: the stages' loops see their links close and stop."""
        if self._link is not None and self._link.done() and not self._link.exception():
            self._link.result().close()
        elif self._link is not None:
            self._link.cancel()


class _Link:
    """One open ring, seen from the router: a thread that sends, one that receives, and what is in flight."""

    def __init__(self, group: dist.ProcessGroup, stages: int, busy_s: list[float]):
        self.group, self.stages, self.busy_s = group, stages, busy_s
        self.outbox: queue.Queue = queue.Queue()
        self.pending: collections.deque[asyncio.Future] = collections.deque()
        self.lock = threading.Lock()
        self.broken: BaseException | None = None
        threading.Thread(target=self._send_loop, name="ring-send", daemon=True).start()
        threading.Thread(target=self._recv_loop, name="ring-recv", daemon=True).start()

    def close(self) -> None:
        self._fail_all(RingDownError("the stage ring was closed"), expected=True)
        self.outbox.put(None)

    def _send_loop(self) -> None:
        while True:
            item = self.outbox.get()
            if item is None:
                return
            rows, x, future = item
            with self.lock:
                if self.broken is not None:
                    _settle(future, RingDownError(f"the stage ring is down: {self.broken}"))
                    continue
                self.pending.append(future)
            try:
                send(self.group, 1, {"rows": rows}, x)
            except Exception as e:  # noqa: BLE001 - stage 0 is gone: fail what is in flight
                self._fail_all(e)

    def _recv_loop(self) -> None:
        while True:
            try:
                meta, out = recv(self.group, self.stages)
            except Exception as e:  # noqa: BLE001 - the last stage is gone
                self._fail_all(e)
                return
            with self.lock:
                future = self.pending.popleft()
            if "error" in meta:
                _settle(future, RingError(meta["error"]))
                continue
            for k, seconds in enumerate(meta["busy"]):
                self.busy_s[k] += seconds
            _settle(future, out)

    def _fail_all(self, error: BaseException, expected: bool = False) -> None:
        with self.lock:
            if self.broken is None and not expected:
                logger.error("the stage ring is down", exc_info=error)
            self.broken = error
            while self.pending:
                _settle(self.pending.popleft(), RingDownError(f"the stage ring is down: {error}"))
            # nothing holds the links open any more: the surviving stages' loops see them close and stop
            self.group = None


def _settle(future: asyncio.Future, result: Any) -> None:
    """Resolve `future` from a ring thread, on its own event loop."""

    def apply() -> None:
        if future.done():  # the awaiting request was cancelled meanwhile
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    future.get_loop().call_soon_threadsafe(apply)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` right now."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]

"""The pipeline's data plane: micro-batches travel router -> stage 0 -> ... -> last stage -> router over plain TCP
links, one per neighbouring pair, opened once per ring, rather than as one RPC per hop.

A Ray Serve handle call cost about a millisecond of CPU on each side and two of latency per hop on the CPU demo. The
ring's first links were torch.distributed gloo pairs, whose every message waits for its receiver to post a
matching receive: a round trip of handshakes, each waiting for the other process to get a core. On the 2-core demo,
with the stages and the router busy, that cost 1-4 ms per hop (a 16 KB ping-pong: 0.5 ms idle, 4.4 ms with both
cores busy), against 0.07 / 0.17 ms for a TCP socket, whose sender hands the bytes to the kernel and goes on.
Control (where to connect, placement, health) stays on Serve handles; torch's TCPStore only introduces the ranks.

Ranks: the router is 0, stage i is i + 1. A stage runs its micro-batches in two lanes, each a thread taking its
micro-batches one at a time in arrival order: decode micro-batches in the thread that reads the link, prefill
micro-batches (a row with more than one new token) in a second one. A decode step that reaches a stage in the
middle of a prefill then runs beside it (kernels release the GIL) instead of waiting the prefill out, and can
overtake it on the way to the next stage, so every message carries its micro-batch's id and the router matches
results by id. A failed micro-batch travels on as an error message under its id; a stage process that dies closes
its links, and everything waiting on them fails instead of hanging."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import pickle
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from llmpq_serve.runtime.scheduler import ChainLostError
from llmpq_serve.runtime.transfer import to_host

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = datetime.timedelta(minutes=10)  # every rank must have joined by then (stages load their weights)
JOIN_TIMEOUT_S = 60.0  # the stages' answer to a join call (a replica on a node that left never answers)
# The ring's links once every stage has answered its join, their weights long loaded: seconds. A stage that died
# just after answering, or whose connect failed, would otherwise hold every micro-batch for CONNECT_TIMEOUT, the
# chain not yet counted as down, so neither recovery nor /healthz would know
RING_UP_TIMEOUT_S = 30.0
_PREFIX = struct.Struct("<IQ")  # a message: header bytes, payload bytes; then the pickled header, then the payload
_RANK = struct.Struct("<I")  # the first bytes on a link: who opened it


class RingError(RuntimeError):
    """A micro-batch failed on a stage; the message says which and why."""


class RingDownError(RingError, ChainLostError):
    """The ring itself broke or could not open (a stage's process is gone): the scheduler keeps the requests."""


class Links:
    """One rank's place in a ring: the link from the previous rank and the one to the next. `send` returns once the
    kernel has the bytes, and may be called from several threads; `recv` blocks until a whole message is in, and is
    called from one thread at a time."""

    def __init__(self, store: dist.TCPStore | None, inbound: socket.socket, outbound: socket.socket):
        self._store = store  # rank 0 serves the store: it must outlive the others' look-ups of their neighbours
        self.inbound, self.outbound = inbound, outbound
        self._sending = threading.Lock()  # a stage's two lanes send on the same link: messages must not interleave

    def send(self, meta: dict, payload: torch.Tensor | None) -> None:
        meta = dict(meta)
        body = None
        if payload is not None:
            payload = to_host(payload.detach()).contiguous()
            meta["dtype"], meta["shape"] = payload.dtype, tuple(payload.shape)
            body = payload.view(-1).view(torch.uint8).numpy()  # no copy; any dtype, bfloat16 too
        header = pickle.dumps(meta)
        size = 0 if body is None else body.nbytes
        with self._sending:
            self.outbound.sendall(_PREFIX.pack(len(header), size) + header)
            if size:
                self.outbound.sendall(body)

    def recv(self) -> tuple[dict, torch.Tensor | None]:
        header, size = _PREFIX.unpack(_read(self.inbound, _PREFIX.size))
        meta = pickle.loads(_read(self.inbound, header))
        if "dtype" not in meta:
            return meta, None
        buffer = torch.empty(size, dtype=torch.uint8)
        _read_into(self.inbound, memoryview(buffer.numpy()))
        return meta, buffer.view(meta.pop("dtype")).reshape(meta.pop("shape"))

    def close(self) -> None:
        """Both links down: a thread blocked in `recv` here returns with an error, and so do the neighbours'."""
        for sock in (self.inbound, self.outbound):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed by the peer
                pass
            sock.close()


def connect(host: str, port: int, rank: int, world: int, cancelled: threading.Event | None = None) -> Links:
    """This process's links in a ring of `world` ranks whose rank 0 serves the rendezvous store on host:port: each
    rank listens, publishes its address, connects to the next rank and accepts the previous one. Blocks until both
    links are up, or until `cancelled` is set: the caller gave up on this ring (its stages could not join), and a
    thread left waiting out CONNECT_TIMEOUT would hold a port and an executor thread for each such try."""
    store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=CONNECT_TIMEOUT, wait_for_workers=False)
    timeout = CONNECT_TIMEOUT.total_seconds()
    waiting = _Wait(cancelled, time.monotonic() + timeout)
    with _listener() as listener:
        listener.settimeout(_POLL_S)
        store.set(f"ring/{rank}", f"{_address_toward(host)}:{listener.getsockname()[1]}")
        peer = f"ring/{(rank + 1) % world}"
        waiting.until(lambda: store.check([peer]), f"rank {(rank + 1) % world} to publish its address")
        peer_host, peer_port = store.get(peer).decode().rsplit(":", 1)
        outbound = socket.create_connection((peer_host, int(peer_port)), timeout=timeout)
        try:
            outbound.sendall(_RANK.pack(rank))
            inbound = waiting.until(lambda: _accept(listener), f"rank {(rank - 1) % world} to connect")
            inbound.settimeout(timeout)
            (prev,) = _RANK.unpack(_read(inbound, _RANK.size))
        except BaseException:
            outbound.close()
            raise
    if prev != (rank - 1) % world:
        for sock in (inbound, outbound):
            sock.close()
        raise ConnectionError(f"rank {rank} was reached by rank {prev}, not by its previous rank {(rank - 1) % world}")
    for sock in (inbound, outbound):
        _tune(sock)
    return Links(store, inbound, outbound)


_POLL_S = 0.01  # how soon a connect that waits for a neighbour notices it was cancelled


class _Wait:
    def __init__(self, cancelled: threading.Event | None, deadline: float):
        self.cancelled, self.deadline = cancelled, deadline

    def until(self, ready: Callable[[], Any], what: str) -> Any:
        """`ready()`'s first true value, polled every _POLL_S."""
        while not (value := ready()):
            if self.cancelled is not None and self.cancelled.is_set():
                raise ConnectionAbortedError(f"stopped waiting for {what}: the ring is no longer wanted")
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"waited {CONNECT_TIMEOUT} for {what}")
            time.sleep(_POLL_S)
        return value


def _accept(listener: socket.socket) -> socket.socket | None:
    """The next connection to `listener`, or None if none came within its timeout."""
    try:
        return listener.accept()[0]
    except TimeoutError:
        return None


def _tune(sock: socket.socket) -> None:
    sock.settimeout(None)  # links idle as long as the service does; a dead peer is noticed by its closed socket
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a decode step is one small message
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # and a vanished node, by keep-alive probes


def loopback_pair() -> tuple[Links, Links]:
    """Two ranks of one process linked both ways over this machine's loopback, as `connect` links ring neighbours:
    what the profiler times a stage-to-stage hop on."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = listener.getsockname()
        a_out = socket.create_connection(address)
        b_in, _ = listener.accept()
        b_out = socket.create_connection(address)
        a_in, _ = listener.accept()
    for sock in (a_out, a_in, b_out, b_in):
        _tune(sock)
    return Links(None, a_in, a_out), Links(None, b_in, b_out)


def _listener() -> socket.socket:
    """A socket listening on a free port of every address of this machine, IPv6 ones too where it has them."""
    if socket.has_dualstack_ipv6():
        return socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("", 0))


def _address_toward(host: str) -> str:
    """This machine's address on the route to `host` (what the other ranks, which reach `host` too, can reach)."""
    family, _, _, _, address = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(address)  # a UDP connect only picks the route; nothing is sent
        return probe.getsockname()[0]


def _read(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    _read_into(sock, memoryview(buffer))
    return buffer


def _read_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("the link closed")
        got += n


class StageLoop:
    """A stage's side of the ring: `run(rows, x)` on every micro-batch that arrives. The thread that reads the link
    runs decode micro-batches; prefill micro-batches go to a second thread."""

    def __init__(self, run: Callable[[Any, torch.Tensor], torch.Tensor], index: int, stages: int):
        self.run, self.index, self.stages = run, index, stages
        self.thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> None:
        self.thread = threading.Thread(target=self._serve, args=(host, port), name=f"ring-stage{self.index}",
                                       daemon=True)
        self.thread.start()

    def _serve(self, host: str, port: int) -> None:
        try:
            links = connect(host, port, self.index + 1, self.stages + 1)
        except Exception:  # the router times out waiting for this stage and reports it
            logger.exception("stage %d could not join the ring at %s:%d", self.index, host, port)
            return
        prefills = queue.SimpleQueue()
        threading.Thread(target=self._prefill_lane, args=(links, prefills), daemon=True,
                         name=f"ring-stage{self.index}-prefill").start()
        try:
            while True:
                meta, x = links.recv()
                if "error" in meta:  # failed upstream: pass it on
                    links.send(meta, None)
                elif meta["rows"].decode:
                    # decode steps run right here: a hand-off to another thread would add a wake-up to every hop
                    self._run(links, meta, x)
                else:
                    prefills.put((meta, x))
        except OSError:  # a neighbour went away: this ring is over, a redeploy builds a new one
            logger.warning("stage %d: ring closed", self.index, exc_info=True)
        finally:
            links.close()
            prefills.put(None)

    def _prefill_lane(self, links: Links, prefills: queue.SimpleQueue) -> None:
        try:
            while (item := prefills.get()) is not None:
                self._run(links, *item)
        except OSError:  # the ring closed: the reading thread sees it too
            pass

    def _run(self, links: Links, meta: dict, x: torch.Tensor) -> None:
        start = time.perf_counter()
        out = None
        try:
            out = self.run(meta["rows"], x)
        except Exception as e:  # this micro-batch fails; the ring goes on
            logger.exception("stage %d failed on a micro-batch", self.index)
            meta = {"id": meta["id"], "error": f"stage {self.index}: {type(e).__name__}: {e}"}
        else:
            meta["busy"] = [*meta.get("busy", []), time.perf_counter() - start]
        links.send(meta, out)


class RingChain:
    """The router's side: a StageChain whose `forward` sends a micro-batch into the ring and awaits what the last
    stage returns, matched by the micro-batch's id (a decode step may overtake a prefill).

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
        link.submit(rows, x, future)
        return await future

    async def _open(self) -> _Link:
        port = free_port(self._host)
        cancelled = threading.Event()
        opened = asyncio.get_running_loop().run_in_executor(None, connect, self._host, port, 0, self.stages + 1,
                                                            cancelled)
        try:
            await asyncio.wait_for(self._join(self._host, port), JOIN_TIMEOUT_S)
            try:
                links = await asyncio.wait_for(asyncio.shield(opened), RING_UP_TIMEOUT_S)
            except TimeoutError:
                raise ConnectionError(f"the stages answered their join but their links were not up within "
                                      f"{RING_UP_TIMEOUT_S:.0f} s") from None
            return _Link(links, self.stages, self.busy_s)
        except BaseException:
            cancelled.set()
            opened.add_done_callback(_close_unused)  # links that came up after all belong to no ring
            raise

    def close(self) -> None:
        """Drop the open ring: the stages' loops see their links close and stop."""
        if self._link is not None and self._link.done() and not self._link.exception():
            self._link.result().close()
        elif self._link is not None:
            self._link.cancel()


def _close_unused(opened: asyncio.Future) -> None:
    if not opened.cancelled() and opened.exception() is None:
        opened.result().close()


class _Link:
    """One open ring, seen from the router: micro-batches are sent from the event loop (token ids only: small, and
    the kernel takes them at once), a thread receives what the last stage returns; `pending` is what is in flight,
    by micro-batch id."""

    def __init__(self, links: Links, stages: int, busy_s: list[float]):
        self.links, self.stages, self.busy_s = links, stages, busy_s
        self.pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self.lock = threading.Lock()
        self.broken: BaseException | None = None
        threading.Thread(target=self._recv_loop, name="ring-recv", daemon=True).start()

    def close(self) -> None:
        self._fail_all(RingDownError("the stage ring was closed"), expected=True)

    def submit(self, rows: Any, x: torch.Tensor, future: asyncio.Future) -> None:
        with self.lock:
            if self.broken is not None:
                _settle(future, RingDownError(f"the stage ring is down: {self.broken}"))
                return
            mb = next(self._ids)
            self.pending[mb] = future  # before the send: the answer may come back at once
        try:
            self.links.send({"id": mb, "rows": rows}, x)
        except OSError as e:  # stage 0 is gone: fail what is in flight
            self._fail_all(e)

    def _recv_loop(self) -> None:
        while True:
            try:
                meta, out = self.links.recv()
            except Exception as e:  # noqa: BLE001 - the last stage is gone, or close() took the links down
                self._fail_all(e)
                return
            with self.lock:
                future = self.pending.pop(meta["id"])
            if "error" in meta:
                _settle(future, RingError(meta["error"]))
                continue
            for k, seconds in enumerate(meta["busy"]):
                self.busy_s[k] += seconds
            _settle(future, out)

    def _fail_all(self, error: BaseException, expected: bool = False) -> None:
        with self.lock:
            if self.broken is None:
                if not expected:
                    logger.error("the stage ring is down", exc_info=error)
                self.broken = error
                # the surviving stages' loops see their links close and stop
                self.links.close()
            for future in self.pending.values():
                _settle(future, RingDownError(f"the stage ring is down: {error}"))
            self.pending.clear()


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
    family, _, _, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family) as s:
        s.bind(address)
        return s.getsockname()[1]

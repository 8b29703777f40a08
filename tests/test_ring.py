"""The stage ring (the Ray layer's data plane) without Ray: stage loops in threads of this process, linked by real
TCP links. Its output equals the in-process transport's, a stage that fails a micro-batch fails only those
requests, and messages keep their dtype, shape and metadata."""

import asyncio
import datetime
import socket
import threading

import pytest
import torch

from llmpq_serve.runtime import ring
from llmpq_serve.runtime.engine import PipelineEngine
from llmpq_serve.runtime.local import StageRunner, even_stages, local_engine
from llmpq_serve.runtime.sampling import SamplingParams
from llmpq_serve.runtime.scheduler import RowsSpec, Scheduler, SchedulerOptions
from llmpq_serve.spec import slot_count
from tests.conftest import StubTokenizer
from tests.test_runtime import PROMPTS, run_all

HOST = "127.0.0.1"


def ring_engine(path, stages, prefill_mb, decode_mb, max_batch, max_seq, wrap=lambda k, run: run):
    from transformers import AutoTokenizer

    slots = slot_count(max_batch, decode_mb)
    runners = [StageRunner(path, s, slots, max_seq) for s in stages]

    async def join(host: str, port: int) -> None:
        for k, runner in enumerate(runners):
            ring.StageLoop(wrap(k, runner.run), k, len(runners)).start(host, port)

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    chain = ring.RingChain(len(runners), HOST, join)
    scheduler = Scheduler.for_batch(chain, tokenizer, prefill_mb, decode_mb, max_batch, max_seq,
                                    SchedulerOptions(max_queue=64))
    return PipelineEngine(scheduler, tokenizer, "demo", dict)


@pytest.fixture
def ring_engines():
    """`ring_engine`, whose rings are closed after the test: until then each stage's loop holds its shard and KV
    cache, and the router's side its receiving thread and sockets."""
    made = []

    def make(*args, **kwargs):
        made.append(ring_engine(*args, **kwargs))
        return made[-1]

    yield make
    for engine in made:
        engine.scheduler.chain.close()


@pytest.mark.parametrize("stages", [1, 3])
def test_ring_gives_the_local_transports_tokens(demo_checkpoint, ring_engines, stages):
    path = demo_checkpoint("llama")
    prompts = PROMPTS * 2
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    for params in (greedy, seeded):
        local = asyncio.run(run_all(local_engine(path, even_stages(3, stages), 2, 2, 4, 96), prompts, params))
        engine = ring_engines(path, even_stages(3, stages), 2, 2, 4, 96)
        assert asyncio.run(run_all(engine, prompts, params)) == local
        busy = engine.scheduler.stage_busy_s
        assert len(busy) == stages and all(b > 0 for b in busy)


def test_a_failed_micro_batch_fails_its_requests_and_the_ring_goes_on(demo_checkpoint, ring_engines):
    path = demo_checkpoint("llama")
    calls = {"n": 0}

    def wrap(k, run):
        if k != 1:
            return run

        def flaky(rows, x):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("out of device memory")
            return run(rows, x)

        return flaky

    engine = ring_engines(path, even_stages(3, 2), 1, 1, 1, 64, wrap)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    async def go():
        first = await asyncio.gather(run_all(engine, PROMPTS[:1], params), return_exceptions=True)
        second = await run_all(engine, PROMPTS[1:2], params)
        return first[0], second

    first, second = asyncio.run(go())
    assert isinstance(first, ring.RingError) and "stage 1: RuntimeError: out of device memory" in str(first)
    assert len(second[0]) == 4
    assert engine.scheduler.pool.free == engine.scheduler.pool.slots


def test_a_decode_step_runs_beside_a_prefill_at_a_stage_and_overtakes_it():
    """Each stage's prefill here cannot finish until a decode step has run on that stage: with one lane per stage
    the decode step would wait behind it and the prefill would time out. The last stage's prefill also waits for the
    decode step to be back at the router, so which of the two lanes sends first cannot decide the order."""
    decoded = [threading.Event(), threading.Event()]
    decode_back = threading.Event()

    def stage(k):
        def run(rows, x):
            if rows.decode:
                decoded[k].set()
            elif not decoded[k].wait(timeout=20):
                raise TimeoutError("no decode step ran beside this prefill")
            elif k == 1 and not decode_back.wait(timeout=20):
                raise TimeoutError("the decode step did not get back while the prefill waited")
            return x + 1

        return run

    async def join(host: str, port: int) -> None:
        for k in range(2):
            ring.StageLoop(stage(k), k, 2).start(host, port)

    async def go():
        chain = ring.RingChain(2, HOST, join)
        assert torch.equal(await chain.forward(RowsSpec([0], [0], [1]), torch.zeros(1)), torch.full((1,), 2.0))
        for event in decoded:
            event.clear()
        finished = []
        prefill = asyncio.create_task(chain.forward(RowsSpec([0], [1], [3]), torch.tensor([1.0, 2.0, 3.0])))
        decode = asyncio.create_task(chain.forward(RowsSpec([1], [5], [1]), torch.tensor([10.0])))
        for name, task in (("prefill", prefill), ("decode", decode)):
            task.add_done_callback(lambda _, name=name: finished.append(name))
        decode.add_done_callback(lambda _: decode_back.set())
        results = await asyncio.gather(prefill, decode)
        chain.close()
        return finished, results

    finished, (prefilled, decoded_out) = asyncio.run(asyncio.wait_for(go(), timeout=60))
    assert finished == ["decode", "prefill"]
    assert torch.equal(prefilled, torch.tensor([3.0, 4.0, 5.0])) and torch.equal(decoded_out, torch.tensor([12.0]))


def open_ring(world: int, host: str = HOST) -> list[ring.Links]:
    port = ring.free_port(host)
    links = {}

    def open_rank(rank):
        links[rank] = ring.connect(host, port, rank, world)

    threads = [threading.Thread(target=open_rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return [links[r] for r in range(world)]


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host", [HOST, pytest.param("::1", marks=pytest.mark.skipif(
    not has_ipv6_loopback(), reason="no IPv6 loopback here"))])
def test_messages_keep_dtype_shape_and_metadata(host):
    links = open_ring(2, host)
    big = torch.randn(512, 1024)  # 2 MB: more than one socket read
    payloads = [torch.arange(6).view(2, 3), torch.randn(2, 1, 5), torch.randn(3, 4).bfloat16(), None, big,
                torch.empty(0, 4)]
    try:
        for payload in payloads:
            meta = {"rows": ([0, 1], [3, 4], [1, 1]), "note": "x" * (len(str(payload)) % 7)}
            sender = threading.Thread(target=links[0].send, args=(meta, payload))  # a big one waits for the reader
            sender.start()
            got_meta, got = links[1].recv()
            sender.join(timeout=60)
            assert got_meta == meta
            if payload is None:
                assert got is None
            else:
                assert got.dtype == payload.dtype and torch.equal(got, payload)
        # and the other way round the ring (rank 1's next is rank 0)
        links[1].send({"back": True}, torch.ones(3))
        assert links[0].recv()[0] == {"back": True}
    finally:
        for link in links:
            link.close()


def test_a_closed_link_fails_the_neighbour_instead_of_hanging():
    links = open_ring(3)
    try:
        links[1].close()  # rank 1 is gone: rank 2 reads from it and rank 0 writes to it
        with pytest.raises(OSError):
            links[2].recv()
        with pytest.raises(OSError):
            for _ in range(100):  # the kernel may take the first writes before it learns the peer is gone
                links[0].send({}, torch.zeros(1024))
    finally:
        for link in (links[0], links[2]):
            link.close()


def test_a_ring_whose_stages_cannot_join_leaves_no_connect_waiting(monkeypatch):
    """The router's side of a ring waits for its stages in a thread; when they cannot join (a stage is gone), that
    thread gives up at once instead of holding a port and an executor thread for CONNECT_TIMEOUT, try after try."""
    ended = []

    def connect(*args):
        try:
            return real_connect(*args)
        except ConnectionAbortedError as e:
            ended.append(e)
            raise

    real_connect = ring.connect
    monkeypatch.setattr(ring, "connect", connect)
    monkeypatch.setattr(ring, "CONNECT_TIMEOUT", datetime.timedelta(seconds=5))  # how long one that waits holds on

    async def join(host, port):
        raise RuntimeError("stage 1 is gone")

    async def go():
        chain = ring.RingChain(2, HOST, join)
        for _ in range(3):
            with pytest.raises(ring.RingDownError, match="stage 1 is gone"):
                await chain.forward(RowsSpec([0], [0], [1]), torch.zeros(1, dtype=torch.long))
        for _ in range(200):
            if len(ended) == 3:
                break
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(go(), timeout=60))
    assert len(ended) == 3


def test_stages_that_answer_their_join_but_never_link_up_bring_the_chain_down(monkeypatch):
    """A stage that died right after its join call answered: the micro-batch fails as a lost chain (the scheduler
    then recovers or fails its requests, /healthz says so) instead of waiting out CONNECT_TIMEOUT."""
    monkeypatch.setattr(ring, "RING_UP_TIMEOUT_S", 0.5)

    async def join(host, port):
        return None

    async def go():
        chain = ring.RingChain(1, HOST, join)
        try:
            with pytest.raises(ring.RingDownError, match="not up within"):
                await chain.forward(RowsSpec([0], [0], [1]), torch.zeros(1, dtype=torch.long))
        finally:
            chain.close()

    asyncio.run(asyncio.wait_for(go(), timeout=30))


def serve_stage(path, spec, slots, max_seq, host, port):
    """A stage in its own process, as a stage deployment's replica is."""
    loop = ring.StageLoop(StageRunner(path, spec, slots, max_seq).run, 0, 1)
    loop.start(host, port)
    loop.thread.join()


def test_a_dead_stage_loses_no_request_the_next_ring_carries_it_on(demo_checkpoint):
    """A stage process dies mid-stream: the ring is down, the scheduler keeps the request, a new ring opens (here:
    a new stage process joins) and the request is prefilled again with what it had produced and goes on."""
    import multiprocessing

    from transformers import AutoTokenizer

    path = demo_checkpoint("llama")
    (spec,) = even_stages(3, 1)
    ctx = multiprocessing.get_context("spawn")
    procs = []

    async def join(host: str, port: int) -> None:
        procs.append(ctx.Process(target=serve_stage, args=(str(path), spec, 2, 128, host, port), daemon=True))
        procs[-1].start()

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    chain = ring.RingChain(1, HOST, join)
    scheduler = Scheduler.for_batch(chain, tokenizer, 1, 1, 2, 128, SchedulerOptions(max_queue=8))
    engine = PipelineEngine(scheduler, tokenizer, "demo", dict)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def go():
        first = await run_all(engine, PROMPTS[1:2], params)
        stream = engine.generate(tokenizer(PROMPTS[1]).input_ids, params, "survivor")
        tokens = (await anext(stream)).token_ids
        procs[0].kill()
        async for event in stream:
            tokens += event.token_ids
        return first[0], tokens

    try:
        first, survivor = asyncio.run(asyncio.wait_for(go(), timeout=300))
        assert survivor == first and len(procs) == 2
    finally:
        chain.close()
        for p in procs:
            p.kill()
            p.join(timeout=30)


def test_requests_fail_when_the_chain_stays_down_past_the_recovery_time():
    from llmpq_serve.runtime.scheduler import ChainLostError

    class DownChain:
        stages, busy_s = 1, [0.0]

        async def forward(self, rows, x):
            raise ring.RingDownError("the stage ring is down: gone")

    tok = StubTokenizer()
    engine = PipelineEngine(Scheduler.for_batch(DownChain(), tok, 1, 1, 2, 64,
                                                SchedulerOptions(max_queue=8, recovery_s=1.0)), tok, "t", dict)

    async def go():
        start = asyncio.get_running_loop().time()
        with pytest.raises(ChainLostError, match="down for over 1 s"):
            async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=4), "r"):
                pass
        return asyncio.get_running_loop().time() - start

    waited = asyncio.run(asyncio.wait_for(go(), timeout=60))
    assert 1.0 <= waited < 30 and not engine.scheduler.live

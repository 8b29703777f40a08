"""The runtime in one process: shards match HF, the scheduler's output matches HF greedy generation token for token
whatever the stage count and whoever a request is batched with; KV slots are freed; sampling is reproducible."""

import asyncio
import time

import pytest
import torch

from llmpq_serve.runtime.kvcache import CacheFullError, SlotPool
from llmpq_serve.runtime.local import even_stages, local_engine
from llmpq_serve.runtime.sampling import SamplingParams
from llmpq_serve.runtime.scheduler import ChainLostError, Scheduler, SchedulerOptions
from tests.conftest import StubTokenizer

PROMPTS = ["def main():\n", "import os\nimport sys\n\nclass Parser(object):\n    def", "x = 1", "for i in range(10):"]
NEW = 12


def hf_greedy(path, prompts, new=NEW):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


async def run_all(engine, prompts, params, stagger=False, behind_first=False):
    """`behind_first`: the other requests arrive once the first has its first token, so they meet it decoding
    whatever the machine's speed."""
    first_token = asyncio.Event()

    async def one(i, p):
        if stagger:
            await asyncio.sleep(0.01 * i)
        if behind_first and i:
            await first_token.wait()
        toks = []
        async for ev in engine.generate(engine.tokenizer(p).input_ids, params, f"r{i}"):
            toks += ev.token_ids
            if i == 0:
                first_token.set()
        return toks

    try:
        return await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    finally:
        await engine.scheduler.stop()


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_greedy_matches_hf_generate(demo_checkpoint, arch, stages):
    path = demo_checkpoint(arch)
    engine = local_engine(path, even_stages(3, stages), prefill_micro_batch=2, decode_micro_batch=2, max_batch=4,
                          max_seq=128)
    got = asyncio.run(run_all(engine, PROMPTS, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True),
                              stagger=True))
    assert got == hf_greedy(path, PROMPTS)


def test_more_requests_than_slots_all_finish_and_free_their_slots(demo_checkpoint):
    path = demo_checkpoint("llama")
    engine = local_engine(path, even_stages(3, 2), 3, 2, max_batch=2, max_seq=64)
    prompts = PROMPTS * 2
    got = asyncio.run(run_all(engine, prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)))
    assert [len(g) for g in got] == [5] * len(prompts)
    assert engine.scheduler.pool.free == engine.scheduler.pool.slots and engine.scheduler.running == 0


def test_seeded_sampling_is_reproducible_and_batch_invariant(demo_checkpoint):
    path = demo_checkpoint("opt")
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    alone = asyncio.run(run_all(local_engine(path, even_stages(3, 1), 1, 1, 1, 64), PROMPTS[:1], params))
    crowd = asyncio.run(run_all(local_engine(path, even_stages(3, 2), 4, 4, 4, 64), PROMPTS, params))
    assert crowd[0] == alone[0]


def test_a_batch_with_several_choices_over_http_matches_one_request_per_choice(demo_checkpoint):
    """The real engine behind the HTTP API: 2 prompts x n=2 in one request. Greedy, every choice of a prompt is
    HF's greedy continuation; seeded, choice j of a prompt is what a request of its own with seed + j draws."""
    import httpx

    from llmpq_serve.server.openai_app import build_app

    path = demo_checkpoint("llama")
    engine = local_engine(path, even_stages(3, 2), 2, 2, 4, 64)
    body = {"prompt": PROMPTS[:2], "n": 2, "max_tokens": NEW, "ignore_eos": True}
    sampled = {"temperature": 0.9, "top_p": 0.95}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(lambda: engine)),
                                     base_url="http://test", timeout=120) as http:
            greedy = (await http.post("/v1/completions", json=body | {"temperature": 0})).json()
            seeded = (await http.post("/v1/completions", json=body | sampled | {"seed": 5})).json()
            alone = [(await http.post("/v1/completions", json=body | sampled | {"prompt": p, "n": 1, "seed": 5 + j}))
                     .json()["choices"][0]["text"] for p in PROMPTS[:2] for j in range(2)]
        await engine.scheduler.stop()
        return greedy, seeded, alone

    greedy, seeded, alone = asyncio.run(go())
    expected = [engine.tokenizer.decode(ids, skip_special_tokens=True) for ids in hf_greedy(path, PROMPTS[:2])]
    assert [c["text"] for c in greedy["choices"]] == [expected[0]] * 2 + [expected[1]] * 2
    assert [c["text"] for c in seeded["choices"]] == alone and alone[0] != alone[1]
    assert engine.scheduler.pool.free == engine.scheduler.pool.slots


def test_cancel_frees_the_slot(demo_checkpoint):
    path = demo_checkpoint("llama")
    engine = local_engine(path, even_stages(3, 2), 1, 1, 1, 64)

    async def go():
        gen = engine.generate(engine.tokenizer("x = 1").input_ids, SamplingParams(max_tokens=40, ignore_eos=True),
                              "a")
        await gen.__anext__()
        await gen.aclose()  # the client went away
        for _ in range(100):
            if engine.scheduler.pool.free == 1:
                break
            await asyncio.sleep(0.01)
        free = engine.scheduler.pool.free
        await engine.scheduler.stop()
        return free

    assert asyncio.run(go()) == 1


def test_stage_error_ends_its_requests_with_the_error(demo_checkpoint):
    path = demo_checkpoint("llama")
    engine = local_engine(path, even_stages(3, 2), 1, 1, 2, 64)
    runner = engine.scheduler.chain.runners[1]

    def broken(rows, x):
        raise RuntimeError("stage 1 lost its device")

    runner.run = broken
    with pytest.raises(RuntimeError, match="lost its device"):
        asyncio.run(run_all(engine, PROMPTS[:1], SamplingParams(max_tokens=3)))
    assert engine.scheduler.pool.free == engine.scheduler.pool.slots


def test_slot_pool_fills_groups_and_refuses_when_full():
    pool = SlotPool(groups=2, group_size=2)
    slots = [pool.allocate(f"r{i}") for i in range(4)]
    assert sorted(slots) == [0, 1, 2, 3] and slots[:2] == [0, 1]  # the first group fills before the second opens
    with pytest.raises(CacheFullError):
        pool.allocate("r4")
    pool.release("r1")
    assert pool.allocate("r5") == 1


def test_shard_logits_match_hf_for_ragged_prompts(demo_checkpoint):
    from transformers import AutoModelForCausalLM

    from llmpq_serve.runtime.layers import Rows
    from llmpq_serve.runtime.shard import StageShard, StageSpec

    path = demo_checkpoint("opt")
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    shard = StageShard(path, StageSpec(0, 3, (16, 16, 16), True, True))
    cache = shard.new_cache(3, 32)
    prompts = [torch.randint(3, 200, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 11, 2)]
    logits = shard(torch.cat(prompts), Rows([2, 0, 1], [0, 0, 0], [len(p) for p in prompts]), cache)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i], hf(p[None]).logits[0, -1], atol=1e-4, rtol=1e-4)


def test_a_stage_sets_its_thread_count_in_every_thread_that_runs_it(demo_checkpoint, monkeypatch):
    """torch's CPU thread count is kept per OS thread: a stage computing in a worker thread would otherwise spread
    each op over every core, whatever its creator set."""
    import threading

    from llmpq_serve.runtime.local import StageRunner
    from llmpq_serve.runtime.scheduler import RowsSpec

    runner = StageRunner(demo_checkpoint("opt"), even_stages(3, 1)[0], 2, 32, threads=1)
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: set_to.append((threading.current_thread().name, n)))
    rows = RowsSpec(slots=[0], starts=[0], counts=[3])

    def twice() -> None:
        for _ in range(2):
            runner.run(rows, torch.tensor([5, 6, 7]))

    threads = [threading.Thread(target=twice) for _ in range(2)]
    for t in threads:
        t.start()
        t.join()
    assert sorted(set_to) == sorted((t.name, 1) for t in threads)  # once in each thread


def test_cuda_stages_attend_without_cudnn_whose_graphs_are_built_per_key_length():
    """cuDNN's attention builds a graph for every new key length, i.e. every decode step: a CUDA stage's layers run
    with it switched off (and only there: the flags are the process's)."""
    from llmpq_serve.runtime.layers import attention_kernels

    flags = torch.backends.cuda
    with attention_kernels(torch.device("cuda")):
        assert not flags.cudnn_sdp_enabled() and flags.mem_efficient_sdp_enabled() and flags.math_sdp_enabled()
    assert flags.cudnn_sdp_enabled()
    with attention_kernels(torch.device("cpu")):
        assert flags.cudnn_sdp_enabled()


@pytest.fixture(params=[False, True], ids=["grouped-heads", "folded-heads"])
def folded(request, monkeypatch):
    """Attention with grouped query heads as they are (the CPU's way) and folded onto their key heads (CUDA's)."""
    from llmpq_serve.runtime import layers

    monkeypatch.setattr(layers, "_folds_heads", lambda q: request.param)
    return request.param


def test_one_micro_batch_may_mix_decode_rows_prefills_and_continued_prompts(demo_checkpoint, folded):
    """Packed rows: decode rows, a new prompt and a prompt continued from the cache (start > 0) in one pass give
    the logits each would give alone, with grouped query heads as they are or folded."""
    from transformers import AutoModelForCausalLM

    from llmpq_serve.runtime.layers import Rows
    from llmpq_serve.runtime.shard import StageShard, StageSpec

    path = demo_checkpoint("llama")
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    shard = StageShard(path, StageSpec(0, 3, (16, 16, 16), True, True))
    cache = shard.new_cache(4, 32)
    seqs = [torch.randint(3, 200, (n,), generator=torch.Generator().manual_seed(n)) for n in (6, 9, 7, 12)]
    # slots 0 and 1 hold all but their last token, slot 3 its first 5: as if prefilled earlier
    shard(torch.cat([seqs[0][:-1], seqs[1][:-1], seqs[3][:5]]), Rows([0, 1, 3], [0, 0, 0], [5, 8, 5]), cache)
    mixed = Rows([1, 0, 2, 3], [8, 5, 0, 5], [1, 1, 7, 7])
    logits = shard(torch.cat([seqs[1][-1:], seqs[0][-1:], seqs[2], seqs[3][5:]]), mixed, cache)
    for row, seq in zip(logits, [seqs[1], seqs[0], seqs[2], seqs[3]]):
        torch.testing.assert_close(row, hf(seq[None]).logits[0, -1], atol=1e-4, rtol=1e-4)


def test_decode_rows_with_free_slots_between_them_give_their_own_logits(demo_checkpoint, folded):
    """Decode rows that leave cache slots free between them (a group with some requests gone) attend over the
    slots' range with idle rows, or, when the gaps outnumber the rows, over gathered copies; either way each row
    gets the logits it would get alone."""
    from transformers import AutoModelForCausalLM

    from llmpq_serve.runtime.layers import Rows
    from llmpq_serve.runtime.shard import StageShard, StageSpec

    path = demo_checkpoint("llama")
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    shard = StageShard(path, StageSpec(0, 3, (16, 16, 16), True, True))
    cache = shard.new_cache(6, 32)
    seqs = [torch.randint(3, 200, (n,), generator=torch.Generator().manual_seed(n)) for n in range(6, 12)]
    shard(torch.cat([s[:-1] for s in seqs]), Rows(list(range(6)), [0] * 6, [len(s) - 1 for s in seqs]), cache)
    for slots in ([4, 1, 2], [0, 5]):  # slots 1-4 with slot 3 idle; 2 rows over 6 slots: gathered
        rows = Rows(slots, [len(seqs[i]) - 1 for i in slots], [1] * len(slots))
        assert (rows.groups[0].within is not None) == (slots == [4, 1, 2])
        logits = shard(torch.cat([seqs[i][-1:] for i in slots]), rows, cache)
        for row, i in zip(logits, slots):
            torch.testing.assert_close(row, hf(seqs[i][None]).logits[0, -1], atol=1e-4, rtol=1e-4)


def test_mixed_steps_carry_prefills_in_decode_steps_and_keep_the_tokens(demo_checkpoint):
    from llmpq_serve.runtime.local import LocalChain

    path = demo_checkpoint("llama")
    engine = local_engine(path, even_stages(3, 2), prefill_micro_batch=2, decode_micro_batch=4, max_batch=4,
                          max_seq=128, options=SchedulerOptions(mixed_steps=True))
    chain = engine.scheduler.chain
    mixed = []
    forward = chain.forward

    async def recording(rows, x):
        mixed.append(1 in rows.counts and any(n > 1 for n in rows.counts))
        return await forward(rows, x)

    chain.forward = recording
    assert isinstance(chain, LocalChain)
    got = asyncio.run(run_all(engine, PROMPTS, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True),
                              behind_first=True))
    assert got == hf_greedy(path, PROMPTS)
    assert any(mixed)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_chunked_prefill_splits_prompts_and_keeps_the_tokens(demo_checkpoint, arch):
    """With prefill_chunk, a prefill micro-batch carries at most that many prompt tokens, pieces of one prompt
    continue where the last stopped, and every request still gets HF's greedy tokens."""
    path = demo_checkpoint(arch)
    engine = local_engine(path, even_stages(3, 2), prefill_micro_batch=2, decode_micro_batch=4, max_batch=4,
                          max_seq=128, options=SchedulerOptions(prefill_chunk=5))
    chain = engine.scheduler.chain
    prefills = []
    forward = chain.forward

    async def recording(rows, x):
        if any(n > 1 for n in rows.counts):
            prefills.append(rows)
        return await forward(rows, x)

    chain.forward = recording
    got = asyncio.run(run_all(engine, PROMPTS, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)))
    assert got == hf_greedy(path, PROMPTS)
    assert prefills and all(sum(rows.counts) <= 5 for rows in prefills)
    assert any(s > 0 and n > 1 for rows in prefills for s, n in zip(rows.starts, rows.counts))  # a continued piece
    assert engine.scheduler.pool.free == engine.scheduler.pool.slots


def test_switching_to_a_new_chain_mid_generation_keeps_every_stream(demo_checkpoint):
    """A re-plan moves live requests to other stages and micro-batch sizes: each is prefilled again with its prompt
    and the tokens it had produced, and its stream goes on to exactly HF's greedy output."""
    from llmpq_serve.runtime.local import LocalChain, StageRunner

    path = demo_checkpoint("llama")
    engine = local_engine(path, even_stages(3, 2), prefill_micro_batch=2, decode_micro_batch=2, max_batch=4,
                          max_seq=128)
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    prompts = [engine.tokenizer(p).input_ids for p in PROMPTS]
    produced = [0] * len(PROMPTS)
    at_switch, prefilled = {}, []

    async def one(i, ids):
        toks = []
        async for ev in engine.generate(ids, params, f"r{i}"):
            toks += ev.token_ids
            produced[i] = len(toks)
        return toks

    async def switch_when_half_done():
        while sum(produced) < len(PROMPTS) * NEW // 2:
            await asyncio.sleep(0.001)
        chain = LocalChain([StageRunner(path, s, 4, 128) for s in even_stages(3, 3)])
        forward = chain.forward

        async def recording(rows, x):
            prefilled.extend(n for n in rows.counts if n > 1)
            return await forward(rows, x)

        chain.forward = recording
        at_switch.update({r.id: len(r.context) for r in engine.scheduler.live.values()})
        at_switch["moved"] = await engine.scheduler.switch(chain, prefill_micro_batch=1, decode_micro_batch=4,
                                                           max_batch=4)

    async def main():
        try:
            *got, _ = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)], switch_when_half_done())
            return got
        finally:
            await engine.scheduler.stop()

    got = asyncio.run(main())
    assert got == hf_greedy(path, PROMPTS)
    moved = at_switch.pop("moved")
    assert moved > 0 and engine.scheduler.decode_mb == 4
    # each request was prefilled on the new chain with its prompt and every token it had produced
    assert sorted(prefilled) == sorted(at_switch.values())
    assert all(n > len(p) for n, p in zip(at_switch.values(), prompts))
    assert engine.scheduler.pool.free == engine.scheduler.pool.slots and not engine.scheduler.live


class SlowChain:
    """A 2-stage chain whose every micro-batch takes 40 ms; it notes the rows of each prefill micro-batch, when
    each went in, and the most prefills in flight at once."""

    def __init__(self):
        self.stages, self.busy_s = 2, [0.0, 0.0]
        self.in_flight = self.most = 0
        self.prefills: list[int] = []
        self.prefill_at: list[float] = []

    async def forward(self, rows, x):
        prefill = any(n > 1 for n in rows.counts)
        if prefill:
            self.prefills.append(len(rows.counts))
            self.prefill_at.append(time.monotonic())
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        await asyncio.sleep(0.04)
        if prefill:
            self.in_flight -= 1
        return torch.zeros(len(rows.counts), 8)


def scheduler_over(chain, prefill_mb: int, decode_mb: int, max_batch: int, **options):
    return Scheduler.for_batch(chain, StubTokenizer(), prefill_mb, decode_mb, max_batch, 64,
                               SchedulerOptions(max_queue=16, **options))


async def trickle(scheduler, n: int, gap_s: float) -> list[float]:
    """`n` one-token requests `gap_s` apart; returns when each was submitted."""
    submitted = [0.0] * n

    async def one(i):
        await asyncio.sleep(gap_s * i)
        submitted[i] = time.monotonic()
        req = scheduler.submit([1, 2, 3], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        while (await req.events.get()).finish_reason is None:
            pass

    try:
        await asyncio.gather(*[one(i) for i in range(n)])
    finally:
        await scheduler.stop()
    return submitted


def test_arrivals_while_the_chain_is_full_of_prefills_form_planned_micro_batches():
    """Standalone prefills take at most one micro-batch per stage; requests arriving meanwhile wait and go in
    together (up to the planned prefill micro-batch), rather than each alone: a trickle of 8 requests 5 ms apart
    into a 2-stage chain whose micro-batch takes 40 ms."""
    chain = SlowChain()
    asyncio.run(trickle(scheduler_over(chain, 4, 8, 8), 8, 0.005))
    assert chain.most == 2
    assert sum(chain.prefills) == 8 and len(chain.prefills) < 8 and max(chain.prefills) > 1


def test_a_burst_spread_over_milliseconds_fills_the_planned_prefill_micro_batches_when_allowed_to_wait():
    """8 requests 3 ms apart, prefill micro-batch 4: without a wait the first goes in alone; with prefill_wait_s
    they go in as the 2 micro-batches planned. A lone request waits the wait once, no longer."""
    eager = SlowChain()
    asyncio.run(trickle(scheduler_over(eager, 4, 8, 8), 8, 0.003))
    assert eager.prefills[0] == 1 and len(eager.prefills) > 2

    waiting = SlowChain()
    asyncio.run(trickle(scheduler_over(waiting, 4, 8, 8, prefill_wait_s=0.05), 8, 0.003))
    assert waiting.prefills == [4, 4]

    alone = SlowChain()
    (sent,) = asyncio.run(trickle(scheduler_over(alone, 4, 8, 8, prefill_wait_s=0.05), 1, 0))
    assert alone.prefills == [1] and 0.05 <= alone.prefill_at[0] - sent < 0.5


def test_the_prefill_wait_ends_when_the_free_slots_are_all_taken():
    """With 2 slots free a prefill micro-batch of 4 can hold only 2: it goes once they are there, not at the wait's
    end."""
    chain = SlowChain()
    sent = asyncio.run(trickle(scheduler_over(chain, 4, 2, 2, prefill_wait_s=5.0), 2, 0.01))
    assert chain.prefills == [2] and chain.prefill_at[0] - sent[1] < 1.0


def test_the_serve_config_hands_every_scheduling_option_to_the_scheduler():
    from llmpq_serve.config import ServeConfig

    config = ServeConfig(model="m", max_queue=7, mixed_steps=True, recovery_timeout_s=9, prefill_chunk_tokens=3,
                         prefill_wait_ms=12)
    assert config.scheduling() == SchedulerOptions(max_queue=7, mixed_steps=True, recovery_s=9.0, prefill_chunk=3,
                                                   prefill_wait_s=0.012)
    assert ServeConfig(model="m").scheduling().prefill_wait_s == pytest.approx(0.005)


class FlakyChain:
    """A 1-stage chain of 10 ms micro-batches answering zeros; `nan_decode_steps` of its first decode steps answer
    NaN instead (in row `nan_row` only, if given), and its first prefill of more than one token fails as a lost chain
    when `lose_a_prefill`."""

    def __init__(self, nan_decode_steps: int = 0, lose_a_prefill: bool = False, nan_row: int | None = None):
        self.stages, self.busy_s = 1, [0.0]
        self.nan_decode_steps, self.lose_a_prefill, self.nan_row = nan_decode_steps, lose_a_prefill, nan_row

    async def forward(self, rows, x):
        await asyncio.sleep(0.01)
        if self.lose_a_prefill and max(rows.counts) > 1:
            self.lose_a_prefill = False
            raise ChainLostError("the stage ring is down")
        logits = torch.zeros(len(rows.counts), 8)
        if rows.decode and self.nan_decode_steps:
            self.nan_decode_steps -= 1
            logits[slice(None) if self.nan_row is None else self.nan_row] = float("nan")
        return logits


async def finish(req) -> BaseException | None:
    """Waits for the request's end: its error, or None once it finished."""
    while True:
        event = await asyncio.wait_for(req.events.get(), 30)
        if isinstance(event, BaseException):
            return event
        if event.finish_reason is not None:
            return None


def test_logits_no_token_can_be_drawn_from_fail_their_requests_and_the_group_goes_on():
    """A decode step whose logits are NaN fails its requests with the error; the group's loop, which sampled them,
    lives on and serves the next request in the same slot."""
    async def go():
        scheduler = scheduler_over(FlakyChain(nan_decode_steps=1), 1, 1, 1)
        first = scheduler.submit([1, 2], SamplingParams(max_tokens=4, ignore_eos=True, seed=0))
        error = await finish(first)
        second = scheduler.submit([1, 2], SamplingParams(max_tokens=4, ignore_eos=True, seed=0))
        try:
            return error, await finish(second), scheduler.pool.free
        finally:
            await scheduler.stop()

    error, second, free = asyncio.run(go())
    assert isinstance(error, RuntimeError) and second is None and free == 1


def test_logits_broken_in_one_row_fail_that_request_only():
    """One request's row of a decode micro-batch is NaN (as a tiny temperature once made it, in the sampler): its
    batch mate, another client's request, goes on to its last token."""
    async def go():
        scheduler = scheduler_over(FlakyChain(nan_decode_steps=1, nan_row=0), 2, 2, 2)
        reqs = [scheduler.submit([1, 2], SamplingParams(max_tokens=4, ignore_eos=True, seed=i)) for i in range(2)]
        try:
            return await asyncio.gather(*[finish(r) for r in reqs])
        finally:
            await scheduler.stop()

    errors = asyncio.run(go())
    assert sorted(e is None for e in errors) == [False, True]
    assert "NaN or infinity" in str(next(e for e in errors if e is not None))


def test_a_slot_whose_request_went_non_finite_serves_its_next_owner_right(demo_checkpoint):
    """A request whose hidden states overflow fails alone, and the NaN K/V it leaves in its slot must not reach the
    slot's next owner through the positions its attention masks (0 * NaN is NaN)."""
    path = demo_checkpoint("llama")
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    short, long = [7, 8, 9], list(range(40, 80))  # batched together: the short one's mask spans the stale positions

    async def go(overflow: bool):
        engine = local_engine(path, even_stages(3, 2), 2, 2, max_batch=2, max_seq=128)
        runner = engine.scheduler.chain.runners[1]
        run = runner.run

        def overflowing(rows, x):
            return run(rows, torch.full_like(x, float("inf")) if rows.counts == [30] else x)

        runner.run = overflowing if overflow else run
        try:
            sick = await finish(engine.scheduler.submit(list(range(5, 35)), greedy))
            poisoned = bool(runner.cache.k[:, 0].isnan().any())
            reqs = [engine.scheduler.submit(p, greedy) for p in (short, long)]
            errors = await asyncio.gather(*[finish(r) for r in reqs])
            return sick, poisoned, errors, [r.detok.token_ids for r in reqs]
        finally:
            await engine.scheduler.stop()

    *_, clean = asyncio.run(go(overflow=False))
    sick, poisoned, errors, tokens = asyncio.run(go(overflow=True))
    assert "NaN or infinity" in str(sick) and poisoned
    assert errors == [None, None] and tokens == clean


def test_a_request_id_already_running_is_refused():
    scheduler = scheduler_over(FlakyChain(), 1, 1, 2)

    async def go():
        scheduler.submit([1, 2], SamplingParams(max_tokens=4), "same")
        try:
            scheduler.submit([3], SamplingParams(max_tokens=4), "same")
        finally:
            await scheduler.stop()

    with pytest.raises(ValueError, match="'same' is already running"):
        asyncio.run(go())


def test_a_step_that_gets_through_during_a_recovery_strands_no_lost_request():
    """The chain drops one prefill micro-batch and comes straight back: a decode step of another request gets
    through while the recovery waits, and the lost request is still prefilled again and finishes."""
    async def go():
        scheduler = scheduler_over(FlakyChain(lose_a_prefill=True), 1, 1, 2)
        decoding = scheduler.submit([1], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
        await decoding.events.get()
        lost = scheduler.submit([1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        try:
            return await finish(lost), await finish(decoding), scheduler.pool.free
        finally:
            await scheduler.stop()

    assert asyncio.run(go()) == (None, None, 2)


class OutageChain(FlakyChain):
    """A FlakyChain that is lost while `down` is set."""

    def __init__(self):
        super().__init__()
        self.down = False

    async def forward(self, rows, x):
        if self.down:
            await asyncio.sleep(0.01)
            raise ChainLostError("the stage ring is down")
        return await super().forward(rows, x)


def test_health_is_not_ready_while_requests_wait_for_a_lost_stage():
    """While the chain is down with a request waiting on it, the engine's health is not ready and says why; once
    the chain is back the request finishes and health is ready again. A recovery that finds no request left clears
    the mark too: no step would ever clear it, and a load balancer heeding it would send none."""
    from llmpq_serve.runtime.engine import PipelineEngine

    async def go():
        chain = OutageChain()
        engine = PipelineEngine(scheduler_over(chain, 1, 1, 1), StubTokenizer(), "t", dict)
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        chain.down = True
        req = engine.scheduler.submit([1, 2], params)
        await asyncio.sleep(0.3)
        during = engine.health()
        chain.down = False
        error, after = await finish(req), engine.health()
        chain.down = True
        gone = engine.scheduler.submit([1, 2], params)
        await asyncio.sleep(0.1)
        lost_then = engine.health()["ready"]
        engine.scheduler.cancel(gone)  # its client left while it waited
        await asyncio.sleep(1.0)
        try:
            return during, error, after, lost_then, engine.health()
        finally:
            await engine.scheduler.stop()

    during, error, after, lost_then, alone = asyncio.run(go())
    assert not during["ready"] and "down for 0 s: 1 request(s) wait" in during["reason"]
    assert 0 < during["pipeline_down_s"] < 1
    assert error is None and after["ready"] and "reason" not in after and "pipeline_down_s" not in after
    assert not lost_then and alone["ready"]


def test_a_switch_to_fewer_slots_finishes_a_cancelled_request_in_a_slot_the_new_pool_lacks():
    """A client left while its request held slot 7; the re-plan's new pool has 6 slots. The others go on."""
    async def go():
        scheduler = scheduler_over(FlakyChain(), 1, 4, 6)  # 2 groups of 4: 8 slots
        params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        reqs = [scheduler.submit([1, 2, 3], params) for _ in range(8)]
        for req in reqs:
            await req.events.get()
        gone = next(r for r in reqs if r.slot == 7)
        scheduler.cancel(gone)
        await scheduler.switch(FlakyChain(), 1, 2, 6)  # 3 groups of 2: 6 slots
        try:
            return [await finish(r) for r in reqs if r is not gone], scheduler.pool.free, scheduler.pool.slots
        finally:
            await scheduler.stop()

    errors, free, slots = asyncio.run(go())
    assert errors == [None] * 7 and free == slots == 6


def test_an_opt_with_projections_in_and_out_matches_hf_in_two_stages(tmp_path):
    """opt-350m's layout: embeddings projected into the hidden size on the first stage and out of it on the last,
    post-norm layers."""
    from transformers import OPTConfig, OPTForCausalLM

    from llmpq_serve.runtime.local import LocalChain, StageRunner

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=256, ffn_dim=512, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=128,
                                     do_layer_norm_before=False, dropout=0.0)).eval()
    model.save_pretrained(tmp_path)
    prompt = [5, 17, 42, 99, 3]
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    scheduler = Scheduler(LocalChain([StageRunner(tmp_path, s, 1, 64) for s in even_stages(2, 2)]), StubTokenizer(),
                          1, 1, 1, 64)

    async def go():
        req = scheduler.submit(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        try:
            assert await finish(req) is None
        finally:
            await scheduler.stop()
        return req.detok.token_ids

    assert asyncio.run(go()) == expected[0, len(prompt):].tolist()

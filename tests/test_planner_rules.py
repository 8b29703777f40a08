"""Plan invariants, each method's rules, and errors a user can act on."""

import math
import re

import pytest

from llmpq_serve.bench.planning import load_cases, roofline_problem
from llmpq_serve.planner import METHODS, InfeasibleError, Plan, Problem, QualityTarget, plan
from llmpq_serve.planner.problem import even_split
from llmpq_serve.spec import ClusterSpec, ModelSpec, Workload

PAPER = "../shared/paper_clusters.yaml"


@pytest.fixture(scope="module")
def cases():
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / PAPER
    return {c.id: c for c in load_cases(path)}


def _problem(case, **quality) -> Problem:
    return roofline_problem(case.model, case.cluster, case.workload, quality=QualityTarget(**quality))


def check_invariants(p: Plan, problem: Problem) -> None:
    """Every layer exactly once, in order, every device at most its memory, the budget kept."""
    assert [s.layers for s in p.stages] == [(a, b) for a, b in zip(
        [0] + [s.layers[1] for s in p.stages[:-1]], [s.layers[1] for s in p.stages])]
    assert p.stages[-1].layers[1] == problem.model.layers and len(p.bits) == problem.model.layers
    assert len({s.device.id for s in p.stages}) == len(p.stages)
    for pred in p.predicted.stages:
        assert pred.memory_bytes <= pred.memory_limit_bytes
    if problem.quality.budget is not None:
        assert p.predicted.quality <= problem.quality.budget + 1e-9
    again, over = problem.evaluate([s.device for s in p.stages], [s.bits for s in p.stages], p.prefill_micro_batch,
                                   p.decode_micro_batch)
    assert not over and again.latency_s == pytest.approx(p.predicted.latency_s)


@pytest.mark.parametrize("cid", ["3", "6"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_respects_memory_and_its_rules(cases, cid, method):
    case = cases[cid]
    problem = _problem(case, budget=0.25) if method.startswith("llmpq") else _problem(case)
    p = plan(problem, method)
    check_invariants(p, problem)
    rules = METHODS[method]
    if rules.uniform_bits:
        assert len(set(p.bits)) == 1
    if not rules.phase_aware:
        assert p.prefill_micro_batch == p.decode_micro_batch
    if rules.even_split:
        assert sorted(s.layers[1] - s.layers[0] for s in p.stages) == sorted(even_split(problem.model.layers,
                                                                                        len(p.stages)))
    if rules.highest_bits_that_fit:  # no plan of the same method at any higher bit-width fits
        (bits,) = set(p.bits)
        for higher in (b for b in problem.bits if b > bits):
            restricted = roofline_problem(case.model, case.cluster, case.workload, bits=(higher,))
            with pytest.raises(InfeasibleError):
                plan(restricted, method)


def test_llmpq_matched_never_slower_than_the_fastest_baseline(cases):
    case = cases["4"]
    problem = _problem(case)
    baselines = []
    for m in ("uniform", "pipeedge"):
        try:
            baselines.append(plan(problem, m))
        except InfeasibleError:
            pass
    fastest = max(baselines, key=lambda p: p.predicted.tokens_per_s)
    matched = problem.with_quality(QualityTarget(budget=fastest.predicted.quality))
    p = plan(matched, "llmpq", seeds=tuple(baselines))
    check_invariants(p, matched)
    assert p.predicted.tokens_per_s >= fastest.predicted.tokens_per_s
    assert p.predicted.quality <= fastest.predicted.quality + 1e-12


def test_plan_json_round_trip_and_table(cases):
    problem = _problem(cases["3"], theta=1.0)
    p = plan(problem, "llmpq")
    again = Plan.from_json(p.to_json())
    assert again == p
    table = p.table()
    assert "stage" in table and "T4" in table and "tokens/s" in table and p.solver.status in table


def test_plan_rejects_gaps_in_the_layers(cases):
    p = plan(_problem(cases["3"], theta=1.0), "llmpq")
    data = p.model_dump()
    data["stages"][1]["layers"] = (data["stages"][1]["layers"][0] + 1, data["stages"][1]["layers"][1])
    data["stages"][1]["bits"] = data["stages"][1]["bits"][1:]
    with pytest.raises(ValueError, match="expected"):
        Plan.model_validate(data)


@pytest.mark.parametrize(("change", "says"), [
    (lambda d: d["stages"][1].update(device=d["stages"][0]["device"]), "several stages"),
    (lambda d: d["stages"][0]["device"].update(id="elsewhere/T4#9"), "does not have"),
    (lambda d: d.update(decode_micro_batch=0), "greater than 0"),
    (lambda d: d.update(prefill_micro_batch=-3), "greater than 0"),
    (lambda d: d["stages"][0]["bits"].__setitem__(0, 5), "bit-widths must be among"),
    (lambda d: d["predicted"]["stages"].pop(), "stage predictions"),
])
def test_a_plan_read_back_is_checked_as_the_solvers_guarantee(cases, change, says):
    """A plan file or /v1/plan's answer is user input to `Plan.load`: what no solver produces is refused."""
    data = plan(_problem(cases["3"], theta=1.0), "llmpq").model_dump()
    change(data)
    with pytest.raises(ValueError, match=says):
        Plan.model_validate(data)


def test_the_kv_cache_is_planned_as_the_runtime_allocates_it():
    """Every request's slot holds the server's whole context, and slots come in whole decode micro-batch groups;
    a workload of shorter requests does not shrink the cache the stages allocate."""
    import torch

    from llmpq_serve.costmodel import CostConfig, CostModel
    from llmpq_serve.runtime.kvcache import KVCache
    from llmpq_serve.spec import slot_count

    model = ModelSpec.from_catalog("opt-13b")
    one = ClusterSpec.from_dict({"devices": [{"type": "A100-SXM4-80GB", "count": 1}]})
    workload = Workload(batch_size=16, prompt_len=64, gen_len=64)
    cost = CostModel(model, CostConfig(profiles_dir=None))
    problem = Problem(model, one, workload, cost=cost, context=512)
    for mb_decode in (4, 6):  # 6 does not divide 16: 3 groups, 18 slots
        cache = KVCache(1, slot_count(16, mb_decode), 512, model.kv_heads, model.head_dim,
                        dtype=torch.float16, device="meta")
        assert problem.layer_memory(16, mb_decode) - cost.layer_weight_bytes(16) == cache.nbytes()
    with pytest.raises(ValueError, match="a context of 100 tokens must hold"):
        Problem(model, one, workload, cost=cost, context=100)
    # a context that the workload fits in but the cluster does not: the plan says so, it does not OOM at deploy
    with pytest.raises(InfeasibleError, match="batch 64 x 2048 tokens"):
        plan(Problem(model, one, Workload(batch_size=64, prompt_len=64, gen_len=64), cost=cost, context=2048),
             "llmpq")


def test_model_too_big_names_devices_and_missing_gib():
    problem = roofline_problem(ModelSpec.from_catalog("bloom-176b"),
                      ClusterSpec.from_dict({"devices": [{"type": "T4", "count": 2}]}), Workload())
    with pytest.raises(InfeasibleError, match=r"hold at most \d+ of 70 layers \(.*T4#1 \d+\), [\d.]+ GiB missing"):
        plan(problem, "llmpq")


def test_device_without_room_for_one_layer_is_named():
    cluster = ClusterSpec.from_dict({"devices": [{"type": "P100-PCIE-12GB", "count": 1},
                                                 {"type": "A100-SXM4-80GB", "count": 1}]})
    problem = roofline_problem(ModelSpec.from_catalog("bloom-176b"), cluster, Workload(batch_size=64))
    with pytest.raises(InfeasibleError, match=r"P100-PCIE-12GB#0 \(P100-PCIE-12GB\) lacks [\d.]+ GiB"):
        plan(problem, "llmpq")


def test_a_small_device_that_fits_a_layer_in_the_middle_of_the_chain_is_not_blamed():
    """Listed first, the P100 would carry BLOOM's 7 GB of embeddings and hold no layer; the search may put it in the
    middle, where it holds three. What is short is the cluster's memory as a whole, and the report says where each
    device's share went."""
    cluster = ClusterSpec.from_dict({"devices": [{"type": "P100-PCIE-12GB", "count": 1},
                                                 {"type": "A100-SXM4-80GB", "count": 2}]})
    problem = roofline_problem(ModelSpec.from_catalog("bloom-176b"), cluster, Workload(batch_size=52))
    with pytest.raises(InfeasibleError) as error:
        plan(problem, "llmpq")
    message = str(error.value)
    assert "lacks" not in message and "P100-PCIE-12GB#0 3," in message
    assert re.search(r"hold at most 53 of 70 layers \(.*\), [\d.]+ GiB missing", message)


def test_unreachable_budget_and_even_split_explain_themselves(cases):
    case = cases["4"]
    with pytest.raises(InfeasibleError, match="quality budget 0.0000"):
        plan(_problem(case, budget=0.0), "llmpq")
    with pytest.raises(InfeasibleError, match="even split puts 12 layers"):
        plan(_problem(case), "uniform")


def test_a_search_cut_by_its_time_limit_before_its_first_plan_lays_out_the_best_ranked_combos(cases):
    """A plan with nothing proved beats none (a server re-planning has no one to ask for more time)."""
    problem = _problem(cases["4"])
    p = plan(problem, "llmpq", time_limit=1e-3)
    check_invariants(p, problem)
    assert p.solver.status == "feasible" and p.solver.gap is None
    assert any("time limit reached before the first plan" in note for note in p.solver.notes)


def test_a_search_cut_by_its_time_limit_without_a_plan_says_so_not_that_memory_is_short(cases, monkeypatch):
    """The memory suffices; a search stopped before any plan must not send the user to add devices."""
    from llmpq_serve.planner import search

    monkeypatch.setattr(search, "arrange", lambda problem, relaxed: [])  # no layout, so no plan in time
    with pytest.raises(InfeasibleError) as error:
        plan(_problem(cases["4"]), "llmpq", time_limit=1e-3)
    message = str(error.value)
    assert "stopped at its time limit of 0.001 s before it found a plan" in message
    assert "fits within memory" not in message and "GiB missing" not in message


def test_the_search_bounds_each_micro_batch_size_once_and_the_fast_heuristic_stops_after_its_layouts(cases,
                                                                                                   monkeypatch):
    """The ranking's LPs are most of a large cluster's solve time (32 devices: 24 s of 30 s before): each prefill
    and each decode size is bounded once per endpoint pair, not once per pair of sizes. The fast heuristic proves
    nothing, so it bounds no combo after its last layout."""
    from llmpq_serve.planner import search
    from llmpq_serve.planner.relaxation import Relaxation

    problem = _problem(cases["4"], budget=0.25)  # where the heuristic lays out all of its combos
    events = []
    bound, realise = Relaxation.lp_bound, search._realise
    monkeypatch.setattr(Relaxation, "lp_bound", lambda self: events.append("bound") or bound(self))
    monkeypatch.setattr(search, "_realise", lambda *a: events.append("layout") or realise(*a))
    sizes, ends = len(problem.micro_batch_candidates()), len(search.endpoint_pairs(problem))
    search._ranked_combos(problem, problem.bits, METHODS["llmpq"], search.SearchState(), math.inf)
    assert events == ["bound"] * (2 * sizes * ends)
    events.clear()
    plan(problem, "llmpq_fast")
    assert events.count("layout") == search.FAST_COMBOS and events[-1] == "layout"


def test_the_ranking_keeps_the_time_limit(cases, monkeypatch):
    """Ranking 32 devices takes seconds: past the time limit it stops once it has a combo to lay out."""
    import time

    from llmpq_serve.planner.relaxation import Relaxation

    problem = _problem(cases["4"], budget=0.25)
    calls = []
    bound = Relaxation.lp_bound

    def slow(self):
        calls.append(1)
        time.sleep(0.05)
        return bound(self)

    monkeypatch.setattr(Relaxation, "lp_bound", slow)
    p = plan(problem, "llmpq", time_limit=0.2)
    from llmpq_serve.planner.search import endpoint_pairs

    assert len(calls) < 2 * len(problem.micro_batch_candidates()) * len(endpoint_pairs(problem)) / 2
    assert p.solver.gap is None and any("while ranking" in note for note in p.solver.notes)
    check_invariants(p, problem)


def test_bad_inputs():
    opt = ModelSpec.from_catalog("opt-13b")
    one = ClusterSpec.from_dict({"devices": [{"type": "A100-SXM4-80GB", "count": 1}]})
    with pytest.raises(ValueError, match="exceed the model's context"):
        roofline_problem(opt, one, Workload(prompt_len=2000, gen_len=100))
    with pytest.raises(ValueError, match="bit-widths must be among"):
        roofline_problem(opt, one, Workload(), bits=(16, 2))
    from llmpq_serve.indicator import Indicator

    no_int8 = Indicator(source="x", omega=[{16: 0.0, 4: 0.2, 3: 1.0}] * opt.layers)
    with pytest.raises(ValueError, match=r"no ω at \[8\] bits"):
        roofline_problem(opt, one, Workload(), indicator=no_int8)
    with pytest.raises(ValueError, match="unknown method"):
        plan(roofline_problem(opt, one, Workload()), "magic")
    many = ClusterSpec.from_dict({"devices": [{"type": "A100-SXM4-80GB", "count": 41}]})
    with pytest.raises(InfeasibleError, match="41 devices but only 40 layers"):
        plan(roofline_problem(opt, many, Workload()), "llmpq")


def test_theta_trades_quality_for_speed(cases):
    case = cases["6"]
    fast = plan(_problem(case, theta=0.0), "llmpq")
    careful = plan(_problem(case, theta=100.0), "llmpq")
    assert careful.predicted.quality < fast.predicted.quality
    assert careful.predicted.tokens_per_s <= fast.predicted.tokens_per_s
    assert math.isfinite(careful.solver.objective)


@pytest.mark.parametrize(("batch", "mb_prefill", "mb_decode", "steps"), [
    (16, 16, 4, 0),   # one prefill micro-batch: nothing decodes before the batch's last prefill
    (16, 4, 16, 3),   # one decode group: it steps once after each of the first three prefills
    (16, 8, 4, 2),    # the first prefill fills two groups, each steps once before the second prefill
    (16, 2, 8, 10),   # groups fill up over eight prefills: 1, 1, 1, 1, 2, 2, 2
    (8, 2, 2, 6),     # 1 + 2 + 3
])
def test_early_decode_steps_count_the_groups_decoding_before_each_later_prefill(batch, mb_prefill, mb_decode, steps):
    from llmpq_serve.planner.problem import early_decode_steps

    assert early_decode_steps(batch, mb_prefill, mb_decode) == steps


def test_decode_time_holds_the_slowest_stage_once_per_early_decode_step(cases):
    """The batch's early decode steps (requests decode while later prefills still wait) add the slowest stage's
    decode time each, on top of the gen_len - 1 steps."""
    problem = _problem(cases["3"], theta=1.0)
    n = problem.workload.batch_size
    prefill, decode = problem.pipeline_latency([1.0, 2.0], [0.1, 0.3], n // 4, n)
    _, decode_alone = problem.pipeline_latency([1.0, 2.0], [0.1, 0.3], n, n)
    assert prefill == pytest.approx(1.0 + 2.0 + 3 * 2.0)
    assert decode_alone == pytest.approx((problem.workload.gen_len - 1) * 0.4)
    assert decode - decode_alone == pytest.approx(3 * 0.3)


def test_every_stage_of_a_gpu_that_dequantizes_holds_its_largest_blocks_workspace():
    """Charged whatever bits a stage's layers get (see Problem.stage_workspace), and only where some bit-width the
    problem allows is dequantized on that GPU."""
    model = ModelSpec.from_catalog("opt-30b").model_copy(update={"layers": 5})
    cluster = ClusterSpec.from_dict({"devices": [{"type": "T4", "count": 1}, {"type": "A100-SXM4-40GB", "count": 1}]})
    block = max(min(o, (1 << 26) // i) * i for o, i in model.linear_shapes())  # 64 Mi weights at once
    assert block < max(o * i for o, i in model.linear_shapes())
    for bits, workspace in (((16, 8, 4, 3), [6 * block, 6 * block]), ((16, 4), [3 * block, 0]), ((16,), [0, 0])):
        problem = roofline_problem(model, cluster, Workload(batch_size=4), bits=bits)
        stages = [[16, 16, 16], [16, 16]]
        pred, _ = problem.evaluate(cluster.devices, stages, 1, 1)
        without = [sum(problem.layer_memory(b, 1) for b in stage) + problem.stage_fixed_memory(1, 1, j == 0, j == 1)
                   for j, stage in enumerate(stages)]
        assert [s.memory_bytes - w for s, w in zip(pred.stages, without)] == workspace, bits

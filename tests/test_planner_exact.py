"""The planner's optimum equals exhaustive search over every plan on small instances."""

import itertools
import math

import pytest

from llmpq_serve.bench.planning import roofline_problem
from llmpq_serve.planner import Problem, QualityTarget, plan
from llmpq_serve.planner.ilp import solve_order
from llmpq_serve.planner.search import device_orders
from llmpq_serve.spec import Workload

WORKLOAD = Workload(batch_size=4, prompt_len=128, gen_len=16)


def compositions(total: int, parts: int):
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def exhaustive(problem: Problem, orders=None, phase_aware: bool = True, pairs=None) -> float:
    """Smallest objective over every order, split, bit assignment and micro-batch pair that fits."""
    L = problem.model.layers
    sizes = problem.micro_batch_candidates()
    if pairs is None:
        pairs = [(p, d) for p in sizes for d in sizes] if phase_aware else [(m, m) for m in sizes]
    best = math.inf
    for devices in orders or device_orders(problem)[0]:
        for split in compositions(L, len(devices)):
            for bits in itertools.product(problem.bits, repeat=L):
                stages, at = [], 0
                for n in split:
                    stages.append(list(bits[at:at + n]))
                    at += n
                for mb_p, mb_d in pairs:
                    pred, over = problem.evaluate(devices, stages, mb_p, mb_d)
                    if over or (problem.quality.budget is not None and pred.quality > problem.quality.budget + 1e-9):
                        continue
                    best = min(best, problem.objective(pred.latency_s, pred.quality))
    return best


# budgets that bind: all-4-bit quality is 0.25, and the best the two devices' memory allows 0.117
TARGETS = [QualityTarget(theta=1.0), QualityTarget(budget=0.12), QualityTarget(theta=0.5, budget=0.2)]


@pytest.mark.parametrize("target", TARGETS, ids=["theta", "budget", "both"])
def test_llmpq_matches_exhaustive_two_devices(bloom_like, two_node, target):
    problem = roofline_problem(bloom_like, two_node, WORKLOAD, quality=target, bits=(16, 8, 4))
    result = plan(problem, "llmpq", gap=1e-9, time_limit=60)
    assert result.solver.objective == pytest.approx(exhaustive(problem), rel=1e-6)
    assert result.solver.status == "optimal"


@pytest.mark.parametrize("target", TARGETS[:2], ids=["theta", "budget"])
def test_llmpq_matches_exhaustive_three_devices(bloom_like, three_dev, target):
    model = bloom_like.model_copy(update={"layers": 4})
    problem = roofline_problem(model, three_dev, WORKLOAD, quality=target, bits=(16, 8, 4))
    result = plan(problem, "llmpq", gap=1e-9, time_limit=60)
    assert result.solver.objective == pytest.approx(exhaustive(problem), rel=1e-6)


def test_order_ilp_matches_exhaustive_for_its_order(bloom_like, two_node):
    problem = roofline_problem(bloom_like, two_node, WORKLOAD, quality=QualityTarget(theta=1.0), bits=(16, 8, 4))
    devices = list(reversed(two_node.devices))
    for pair in [(1, 4), (2, 2), (4, 1)]:
        sol = solve_order(problem, devices, problem.bits, *pair, time_limit=30, gap=1e-9)
        assert sol.result.status == "optimal"
        pred, over = problem.evaluate(devices, sol.bits, *pair)
        assert not over  # the ILP's memory model is the evaluator's
        assert problem.objective(pred.latency_s, pred.quality) == pytest.approx(sol.result.objective, rel=1e-6)
        assert sol.result.objective == pytest.approx(exhaustive(problem, orders=[devices], pairs=[pair]), rel=1e-6)


def test_pipeedge_matches_exhaustive_within_its_rules(bloom_like, two_node):
    """PipeEdge: one bit-width (the highest that fits) and one micro-batch for both phases; exact within those."""
    problem = roofline_problem(bloom_like, two_node, WORKLOAD, bits=(16, 8, 4))
    result = plan(problem, "pipeedge", gap=1e-9)
    (bits,) = set(result.bits)
    uniform = roofline_problem(bloom_like, two_node, WORKLOAD, bits=(bits,))
    assert result.solver.objective == pytest.approx(exhaustive(uniform, phase_aware=False), rel=1e-6)
    higher = [b for b in (16, 8, 4) if b > bits]
    for b in higher:  # nothing at a higher bit-width fits
        assert exhaustive(roofline_problem(bloom_like, two_node, WORKLOAD, bits=(b,)), phase_aware=False) == math.inf

"""The count relaxation: a small MILP whose optimum bounds every plan with a given first and last device and
micro-batch pair from below.

Decoder layers are identical in cost, so a stage's time and memory depend only on how many of its layers run at
each bit-width; only the quality cost ω differs between layers. Dropping which layer sits on which stage (quality
is charged as if the chosen bit counts could go to the best layers of the whole model) and the device order between
first and last (sends get each device's fastest possible link) leaves S x |bits| integers and an LP over layers.
Its solution is also the start of a real plan (see search.arrange)."""

from __future__ import annotations

import math

import pulp

from llmpq_serve.planner.milp import MilpResult, StageSlot, add_pipeline, chain_slots, solve
from llmpq_serve.planner.problem import Problem
from llmpq_serve.spec import DeviceSpec


def slots_for(problem: Problem, first: DeviceSpec, last: DeviceSpec, mb_prefill: int | None,
              mb_decode: int | None) -> list[StageSlot]:
    middle = [d for d in problem.cluster.devices if d.id not in (first.id, last.id)]
    middle.sort(key=lambda d: (d.node, d.gpu))  # same-class slots adjacent, for symmetry breaking
    order = [first] + middle + ([last] if last.id != first.id else [])
    return chain_slots(problem, order, mb_prefill, mb_decode, exact_links=False)


class Relaxation:
    """The count relaxation for one (bit set, first device, last device, micro-batch pair). `lp_bound` is its LP
    relaxation (fast, weaker); `solve` the MILP, whose per-stage counts seed a real plan. With one micro-batch None,
    it bounds only the other phase's part of the objective (see milp.add_pipeline)."""

    def __init__(self, problem: Problem, bits: tuple[int, ...], first: DeviceSpec, last: DeviceSpec,
                 mb_prefill: int | None, mb_decode: int | None):
        self.mb_prefill, self.mb_decode = mb_prefill, mb_decode
        L = problem.model.layers
        self.slots = slots = slots_for(problem, first, last, mb_prefill, mb_decode)
        self.lp = lp = pulp.LpProblem("llmpq_relaxation", pulp.LpMinimize)
        self.n = n = [{b: lp.add_variable(f"n_{j}_{b}", 0, L, cat="Integer") for b in bits}
                      for j in range(len(slots))]
        for j, row in enumerate(n):
            lp += pulp.lpSum(row.values()) >= 1, f"nonempty_{j}"
        lp += pulp.lpSum(v for row in n for v in row.values()) == L, "all_layers"
        for j in range(1, len(slots) - 2):  # interchangeable middle devices: larger stages first
            a, b = slots[j].device, slots[j + 1].device
            if (a.node, a.gpu) == (b.node, b.gpu):
                lp += pulp.lpSum(n[j].values()) >= pulp.lpSum(n[j + 1].values()), f"symmetry_{j}"
        quality = _quality_relaxation(lp, problem, bits, n)
        add_pipeline(lp, problem, slots, n, quality, mb_prefill, mb_decode)
        self.counts: list[dict[int, int]] = []

    def lp_bound(self) -> float:
        """Optimum of the LP relaxation (inf when even that is infeasible); keeps its counts, rounded."""
        result = solve(self.lp, time_limit=5.0, mip=False)
        if result.objective is None:
            return math.inf
        self.counts = _round([{b: v.varValue or 0.0 for b, v in row.items()} for row in self.n])
        return result.objective

    def solve(self, time_limit: float, gap: float = 1e-4) -> MilpResult:
        result = solve(self.lp, time_limit, gap)
        if result.objective is not None:
            self.counts = [{b: round(v.varValue or 0) for b, v in row.items()} for row in self.n]
        return result


def _quality_relaxation(lp: pulp.LpProblem, problem: Problem, bits: tuple[int, ...],
                        n: list[dict[int, pulp.LpVariable]]) -> pulp.LpAffineExpression | float:
    """A lower bound on Σω̂ given only how many layers take each bit-width.

    Telescoping over the bit-widths from low to high, ω̂[l][b_l] = Σ_k Δ_k(l) over the thresholds b_k >= b_l, with
    Δ_k(l) = ω̂[l][b_k] - ω̂[l][b_k+1]. The layers at <= b_k bits are M_k of them, so their Δ_k sum to at least the
    M_k smallest Δ_k: a convex piecewise-linear G_k(M_k), stated by its tangents (exact at integers). The bound is
    exact when the layers rank the same at every threshold (as with the analytic default)."""
    if len(bits) == 1:
        return sum(row[bits[0]] for row in problem.omega)
    if problem.quality.theta == 0 and problem.quality.budget is None:
        return 0.0
    total = []
    ascending = sorted(bits)
    for k, b in enumerate(ascending):
        above = ascending[k + 1] if k + 1 < len(ascending) else None
        deltas = sorted(row[b] - (row[above] if above is not None else 0.0) for row in problem.omega)
        if not any(deltas):
            continue
        m = lp.add_variable(f"at_most_{b}_bits", 0, len(problem.omega))
        lp += m == pulp.lpSum(row[x] for row in n for x in ascending[: k + 1]), f"count_at_most_{b}"
        g = lp.add_variable(f"quality_{b}", lowBound=None)
        prefix = 0.0
        for count, slope in enumerate(deltas):
            lp += g >= prefix + slope * (m - count), f"quality_{b}_{count}"
            prefix += slope
        total.append(g)
    return pulp.lpSum(total)


def _round(fractional: list[dict[int, float]]) -> list[dict[int, int]]:
    """Integer counts summing to the same total: floors, then the largest remainders, every stage non-empty."""
    total = round(sum(sum(row.values()) for row in fractional))
    counts = [{b: math.floor(v + 1e-9) for b, v in row.items()} for row in fractional]
    remainders = sorted(((v - counts[j][b], j, b) for j, row in enumerate(fractional) for b, v in row.items()),
                        reverse=True)
    for j, row in enumerate(counts):
        if not sum(row.values()):
            best = max(row, key=lambda b: fractional[j][b])
            row[best] += 1
    missing = total - sum(sum(row.values()) for row in counts)
    for _, j, b in remainders[:max(0, missing)]:
        counts[j][b] += 1
    for _, j, b in reversed(remainders):  # too many after filling empty stages: take from the least-wanted
        if missing >= 0:
            break
        if counts[j][b] and sum(counts[j].values()) > 1:
            counts[j][b] -= 1
            missing += 1
    return counts

"""The LLM-PQ ILP for one device order and micro-batch pair: which layers go to which stage and at which bits.

Binaries w[l, j, b] (layer l on stage j at b bits). Contiguity is stated on cumulative sums (layer l sits on a stage
<= j implies layer l-1 does too), which is tight in the LP relaxation, unlike pairwise constraints; stage j can only
hold layers in [j, L - S + j] because every stage is non-empty, which removes most variables."""

from __future__ import annotations

from dataclasses import dataclass

import pulp

from llmpq_serve.planner.milp import MilpResult, add_pipeline, chain_slots, solve
from llmpq_serve.planner.problem import Problem
from llmpq_serve.spec import DeviceSpec


@dataclass
class IlpSolution:
    result: MilpResult
    bits: list[list[int]]  # per stage, per layer


def solve_order(problem: Problem, devices: list[DeviceSpec], bits: tuple[int, ...], mb_prefill: int,
                mb_decode: int, warm: list[list[int]] | None = None, time_limit: float = 10.0,
                gap: float = 1e-4, lower: float | None = None, cutoff: float | None = None) -> IlpSolution:
    """`lower`: a known lower bound on the objective (from the relaxation); stated as a cut so that HiGHS stops as
    soon as it finds a plan within `gap` of it instead of proving what the relaxation already proved. `cutoff`: the
    best objective known elsewhere; plans of this order that cannot beat it are pruned."""
    L, S = problem.model.layers, len(devices)
    slots = chain_slots(problem, devices, mb_prefill, mb_decode)
    lp = pulp.LpProblem("llmpq_ilp", pulp.LpMinimize)
    span = [range(j, L - S + j + 1) for j in range(S)]
    w = {(l, j, b): lp.add_variable(f"w_{l}_{j}_{b}", cat="Binary") for j in range(S) for l in span[j] for b in bits}
    on = [[pulp.lpSum(w[l, j, b] for b in bits) if l in span[j] else 0 for j in range(S)] for l in range(L)]
    for l in range(L):
        lp += pulp.lpSum(on[l]) == 1, f"assigned_{l}"
    for j in range(S - 1):
        for l in range(1, L):
            lp += pulp.lpSum(on[l - 1][: j + 1]) >= pulp.lpSum(on[l][: j + 1]), f"contiguous_{l}_{j}"
    for j in range(S):
        lp += pulp.lpSum(on[l][j] for l in span[j]) >= 1, f"nonempty_{j}"
    counts = [{b: pulp.lpSum(w[l, j, b] for l in span[j]) for b in bits} for j in range(S)]
    omega = problem.omega
    quality = pulp.lpSum(omega[l][b] * v for (l, _, b), v in w.items())
    add_pipeline(lp, problem, slots, counts, quality, mb_prefill, mb_decode)
    if lower is not None:
        lp += lp.objective >= lower, "known_lower_bound"
    if warm is not None:
        _set_warm_start(lp, w, warm)
    result = solve(lp, time_limit, gap, cutoff=cutoff)
    if result.objective is None:
        return IlpSolution(result, [])
    stages: list[list[int]] = [[] for _ in range(S)]
    for (l, j, b), v in sorted(w.items()):
        if (v.varValue or 0) > 0.5:
            stages[j].append(b)
    return IlpSolution(result, stages)


def _set_warm_start(lp: pulp.LpProblem, w: dict, warm: list[list[int]]) -> None:
    """Initial values for every variable: the binaries from `warm`, the continuous ones at the tightest values the
    constraints allow (an LP with the binaries fixed; it shares the variables, so solving it sets their values)."""
    chosen = set()
    layer = 0
    for j, stage_bits in enumerate(warm):
        for b in stage_bits:
            chosen.add((layer, j, b))
            layer += 1
    fixed = lp.copy()
    for (l, j, b), v in w.items():
        fixed += v == (1 if (l, j, b) in chosen else 0), f"fix_{l}_{j}_{b}"
    fixed.solve(pulp.HiGHS(msg=False, mip=False))
    if pulp.LpStatus[fixed.status] != "Optimal":
        for v in lp.variables():
            v.varValue = None

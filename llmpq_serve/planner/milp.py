"""Shared pieces of the planner's MILPs: the pipeline-time model over per-stage bit counts, and HiGHS through PuLP
with warm start and the dual bound read back."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import highspy
import pulp

from llmpq_serve.planner.problem import Problem, early_decode_steps
from llmpq_serve.spec import DeviceSpec

GiB = 1024**3


def _swallow_banner() -> None:
    """HiGHS prints a banner to fd 1 when the process creates its first solver; that would corrupt `--json` output,
    so the first one is created with fd 1 pointed at /dev/null."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


_swallow_banner()


@dataclass(frozen=True)
class StageSlot:
    device: DeviceSpec
    first: bool
    last: bool
    send_prefill: float
    send_decode: float


def chain_slots(problem: Problem, devices: list[DeviceSpec], mb_prefill: int | None, mb_decode: int | None,
                exact_links: bool = True) -> list[StageSlot]:
    """Slots for `devices` in pipeline order. With exact_links each stage sends to the next device; without, over
    the fastest link the device has (a lower bound while the order between first and last is still open)."""
    last = len(devices) - 1

    def send(j: int, phase: str, mb: int | None) -> float:
        if j == last or mb is None:
            return 0.0
        if exact_links:
            return problem.send_time(devices[j], devices[j + 1], phase, mb)
        return problem.best_send_time(devices[j], phase, mb)

    return [StageSlot(d, j == 0, j == last, send(j, "prefill", mb_prefill), send(j, "decode", mb_decode))
            for j, d in enumerate(devices)]


@dataclass
class MilpResult:
    status: str  # optimal | feasible | infeasible | no-solution
    objective: float | None
    bound: float | None


class WarmHiGHS(pulp.HiGHS):
    """PuLP's HiGHS, plus: variables with an initial value (setInitialValue) are handed to HiGHS as a starting
    solution, and the MIP dual bound is kept after the solve."""

    def callSolver(self, lp):
        variables = lp.variables()
        values = [v.varValue for v in variables]
        integral = all(v.cat != pulp.LpInteger or abs(x - round(x)) < 1e-6
                       for v, x in zip(variables, values) if x is not None)
        if self.mip and integral and all(x is not None for x in values):
            sol = highspy.HighsSolution()
            sol.col_value = [float(v) for v in values]
            lp.solverModel.setSolution(sol)
        lp.solverModel.run()
        info = lp.solverModel.getInfo()
        self.dual_bound = info.mip_dual_bound if self.mip and lp.isMIP() else info.objective_function_value


def solve(lp: pulp.LpProblem, time_limit: float, gap: float = 1e-4, mip: bool = True,
          cutoff: float | None = None) -> MilpResult:
    """`cutoff`: only solutions below it are of interest (HiGHS prunes the rest); 'infeasible' then means none is."""
    extra = {"objective_bound": float(cutoff)} if cutoff is not None and math.isfinite(cutoff) else {}
    solver = WarmHiGHS(mip=mip, msg=False, timeLimit=max(time_limit, 0.05), gapRel=gap, threads=1, **extra)
    lp.solve(solver)
    status = pulp.LpStatus[lp.status]
    has_solution = lp.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    if status == "Infeasible":
        return MilpResult("infeasible", None, None)
    if not has_solution:
        return MilpResult("no-solution", None, _finite(getattr(solver, "dual_bound", None)))
    kind = "optimal" if lp.sol_status == pulp.LpSolutionOptimal else "feasible"
    bound = _finite(getattr(solver, "dual_bound", None))
    return MilpResult(kind, pulp.value(lp.objective), bound)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) and abs(x) < 1e29 else None


def add_pipeline(lp: pulp.LpProblem, problem: Problem, slots: list[StageSlot],
                 counts: list[dict[int, pulp.LpAffineExpression]], quality: pulp.LpAffineExpression | float,
                 mb_prefill: int | None, mb_decode: int | None) -> None:
    """Adds stage times, memory limits, the quality budget and the objective
    latency / reference latency + θ·quality, mirroring Problem.evaluate / pipeline_latency term by term.

    A phase whose micro-batch is None is left out (its time, and its activations at more than one sequence): the
    model then bounds the full objective's other part from below, which is how the search ranks micro-batch pairs
    cheaply. θ·quality goes with the prefill part."""
    w, ref = problem.workload, problem.reference_latency
    phases = [(ph, mb) for ph, mb in (("prefill", mb_prefill), ("decode", mb_decode)) if mb is not None]
    times: dict[str, list[pulp.LpVariable]] = {ph: [] for ph, _ in phases}
    for j, (slot, count) in enumerate(zip(slots, counts)):
        gpu = slot.device.gpu
        for phase, mb in phases:
            send = slot.send_prefill if phase == "prefill" else slot.send_decode
            t = lp.add_variable(f"t_{phase}_{j}", lowBound=send / ref)
            compute = pulp.lpSum(problem.layer_time(gpu, b, phase, mb) / ref * c for b, c in count.items())
            lp += t >= compute + problem.stage_fixed_time(gpu, phase, mb, slot.first, slot.last) / ref
            times[phase].append(t)
        mem = pulp.lpSum(problem.layer_memory(b, mb_decode) / GiB * c for b, c in count.items())
        fixed = problem.stage_fixed_memory(mb_prefill or 1, mb_decode or 1, slot.first, slot.last) / GiB
        fixed += problem.stage_workspace(gpu) / GiB
        lp += mem <= problem.usable_memory(gpu) / GiB - fixed, f"memory_{j}"
    if problem.quality.budget is not None and not isinstance(quality, (int, float)):
        lp += quality <= problem.quality.budget + 1e-9, "quality_budget"
    objective = []
    if mb_prefill is not None:
        slowest = lp.add_variable("slowest_prefill", lowBound=0)
        for t in times["prefill"]:
            lp += slowest >= t
        k_p = math.ceil(w.batch_size / mb_prefill)
        objective += [pulp.lpSum(times["prefill"]), (k_p - 1) * slowest, problem.quality.theta * quality]
    if mb_decode is not None:
        slowest = lp.add_variable("slowest_decode", lowBound=0)
        step = lp.add_variable("decode_step", lowBound=0)
        for t in times["decode"]:
            lp += slowest >= t
        lp += step >= pulp.lpSum(times["decode"])
        lp += step >= math.ceil(w.batch_size / mb_decode) * slowest
        objective.append((w.gen_len - 1) * step)
        if mb_prefill is not None:
            objective.append(early_decode_steps(w.batch_size, mb_prefill, mb_decode) * slowest)
    lp += pulp.lpSum(objective)

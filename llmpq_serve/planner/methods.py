"""The planning methods: LLM-PQ, the baselines it is compared against, and its ablations. Each is the same search
under different rules, so every method is fully optimised within what it may choose."""

from __future__ import annotations

from llmpq_serve.config import BASELINE_METHODS as BASELINES
from llmpq_serve.planner.plan import Plan, QualityTarget
from llmpq_serve.planner.problem import Problem
from llmpq_serve.planner.search import Rules, search

METHODS: dict[str, Rules] = {
    # Everything chosen jointly: order, partition, bits per layer, prefill and decode micro-batch.
    "llmpq": Rules("llmpq"),
    # Even layer split, one bit-width for the whole model (the highest that fits), one micro-batch for both phases;
    # device order and micro-batch size still optimised.
    "uniform": Rules("uniform", uniform_bits=True, highest_bits_that_fit=True, phase_aware=False, even_split=True),
    # PipeEdge: optimal heterogeneous partition for one bit-width (the highest that fits), one micro-batch size for
    # both phases, best order.
    "pipeedge": Rules("pipeedge", uniform_bits=True, highest_bits_that_fit=True, phase_aware=False),
    # Ablations of LLM-PQ.
    "llmpq_no_adabits": Rules("llmpq_no_adabits", uniform_bits=True),
    "llmpq_no_phase": Rules("llmpq_no_phase", phase_aware=False),
    # The fast heuristic for large clusters (its gap to "llmpq" is measured by `llmpq bench plan`).
    "llmpq_fast": Rules("llmpq_fast", fast=True),
}


def plan(problem: Problem, method: str = "llmpq", time_limit: float = 10.0, gap: float = 0.01,
         seeds: tuple[Plan, ...] = ()) -> Plan:
    """Solve `problem` with `method`. Baselines pick bits by their own rule and ignore the quality target."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method in BASELINES:
        problem = problem.with_quality(QualityTarget(label="baseline: highest bits that fit"))
    return search(problem, METHODS[method], time_limit=time_limit, gap=gap, seeds=seeds)

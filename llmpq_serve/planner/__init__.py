"""config -> Problem -> Plan: the LLM-PQ planner, its baselines and ablations."""

from llmpq_serve.planner.methods import BASELINES, METHODS, plan
from llmpq_serve.planner.plan import Plan, QualityTarget, StagePlan
from llmpq_serve.planner.problem import InfeasibleError, Problem

__all__ = ["BASELINES", "METHODS", "InfeasibleError", "Plan", "Problem", "QualityTarget", "StagePlan", "plan"]

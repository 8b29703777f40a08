"""The benchmarks' own arithmetic: what they predict and how they pair their measurements."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmpq_serve.spec import Workload

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_local_stages_taking_turns_pipeline_as_planned_when_the_gil_costs_nothing():
    """The first micro-batch passes every stage, then each further one takes a step of the slowest; the held share
    of the other stages' calls is added to those steps only. The fill had been billed as full steps of the slowest
    (24 ms for stages of 10 and 2 ms and two micro-batches, where the pipeline takes 22)."""
    fidelity = _script("costmodel_fidelity")
    stages = [SimpleNamespace(prefill_s=0.010, decode_s=0.001), SimpleNamespace(prefill_s=0.002, decode_s=0.001)]
    workload = Workload(batch_size=8, prompt_len=32, gen_len=16)
    prefill, _ = fidelity.taking_turns(stages, workload, pmb=4, dmb=8, held=0.0)
    assert prefill == pytest.approx(0.012 + 0.010)
    prefill, _ = fidelity.taking_turns(stages, workload, pmb=4, dmb=8, held=0.5)
    assert prefill == pytest.approx(0.012 + 0.010 + 0.5 * 0.002)
    prefill, _ = fidelity.taking_turns(stages, workload, pmb=4, dmb=8, held=1.0)
    assert prefill == pytest.approx(2 * 0.012)  # never more than every call one after the other


def test_the_proxy_runs_are_compared_with_their_own_rounds_baselines():
    throughput = _script("serve_throughput")

    def run(tokens_per_s: float) -> dict:
        return {"tokens": tokens_per_s, "wall_s": 1.0, "ttft": [], "tpot": [], "errors": 0}

    bases = [run(100), run(100), run(200)]  # the machine got twice as fast before round 2's baseline
    doc = throughput.report(16, 64, bases, pipes=[run(50), run(75)], proxied=[run(50), run(150)])
    assert [r["ratio"] for r in doc["rounds"]] == [0.5, 0.5]
    assert doc["via_proxy_ratio"] == 0.75  # 0.5 and 1.0; against the median of every round's baseline it read 0.8

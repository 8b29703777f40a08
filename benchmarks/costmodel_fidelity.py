"""Cost-model fidelity: for several plans of the demo models (stage counts, bit mixes, micro-batch sizes), run the
real pipeline on a fixed workload and compare measured against predicted prefill time, decode time per token and
end-to-end latency.

    python benchmarks/costmodel_fidelity.py --json

Stages are CPU devices of one thread each (the catalog's CPU entry; latencies from profiles/CPU.json, measured with
`llmpq profile --device cpu --threads 1`), so that a 2-stage pipeline really runs its stages side by side on this
2-core machine. The prediction is the planner's own (Problem.evaluate). Prints {"cases": [...],
"median_abs_rel_error", "max_abs_rel_error"}."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmpq_serve.costmodel import CostConfig, CostModel
from llmpq_serve.planner import Problem
from llmpq_serve.runtime.local import local_engine
from llmpq_serve.runtime.sampling import SamplingParams
from llmpq_serve.runtime.shard import QuantOptions, StageSpec
from llmpq_serve.spec import ClusterSpec, ModelSpec, Workload

WORKLOAD = Workload(batch_size=8, prompt_len=32, gen_len=16)
# (demo model, [(first layer, end layer, bits per layer)], prefill micro-batch, decode micro-batch)
CASES = [
    ("llama", [(0, 8, [16] * 8)], 4, 8),
    ("llama", [(0, 4, [16] * 4), (4, 8, [16] * 4)], 2, 4),
    ("llama", [(0, 4, [16, 16, 8, 8]), (4, 8, [8, 8, 16, 16])], 4, 4),
    ("opt", [(0, 8, [16] * 8)], 2, 2),
    ("opt", [(0, 3, [16, 3, 3]), (3, 8, [16] * 5)], 4, 8),
    ("opt", [(0, 4, [4, 4, 16, 16]), (4, 8, [16, 16, 4, 4])], 8, 8),
]


def predict(path: Path, stages: list, pmb: int, dmb: int, profiles: Path) -> dict:
    model = ModelSpec.from_checkpoint(path)
    cluster = ClusterSpec.from_dict({"name": "cpu", "devices": [{"type": "CPU", "count": len(stages)}]})
    cost = CostModel(model, CostConfig(profiles_dir=profiles, act_bytes=4, float_bytes=4, kv_bytes=4))
    problem = Problem(model, cluster, WORKLOAD, cost=cost)
    pred, _ = problem.evaluate(list(cluster.devices), [bits for _, _, bits in stages], pmb, dmb)
    return {"prefill_s": pred.prefill_s, "decode_per_token_s": pred.decode_s / (WORKLOAD.gen_len - 1),
            "latency_s": pred.latency_s, "source": cost.latency_source(cluster.devices[0].spec)}


async def timed(engine, prompts: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def one(i: int, p: list[int]) -> None:
        async for _ in engine.generate(p, params, f"r{i}"):
            pass

    start = time.perf_counter()
    await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    return time.perf_counter() - start


def measure(path: Path, stages: list, pmb: int, dmb: int, repeats: int) -> dict:
    from transformers import AutoTokenizer

    from llmpq_serve.demo_model import held_out_tokens

    data = held_out_tokens(AutoTokenizer.from_pretrained(str(path)), max_chars=50_000)
    p = WORKLOAD.prompt_len
    prompts = [data[i * p:(i + 1) * p].tolist() for i in range(WORKLOAD.batch_size)]
    engine = local_engine(path, StageSpec.chain(stages), pmb, dmb, WORKLOAD.batch_size, WORKLOAD.max_len, quant=QuantOptions())

    async def run() -> tuple[list[float], list[float]]:
        await timed(engine, prompts, 2)  # warm-up
        prefill, total = [], []
        for _ in range(repeats):
            prefill.append(await timed(engine, prompts, 1))
            total.append(await timed(engine, prompts, WORKLOAD.gen_len))
        await engine.scheduler.stop()
        return prefill, total

    prefill, total = asyncio.run(run())
    pre, tot = statistics.median(prefill), statistics.median(total)
    return {"prefill_s": pre, "decode_per_token_s": (tot - pre) / (WORKLOAD.gen_len - 1), "latency_s": tot}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", type=Path, default=ROOT / "profiles")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from llmpq_serve import demo_model

    torch.set_num_threads(1)  # one core per stage, as profiled
    cases, errors = [], []
    for arch, stages, pmb, dmb in CASES:
        path = demo_model.build(arch)
        pred = predict(path, stages, pmb, dmb, args.profiles)
        meas = measure(path, stages, pmb, dmb, args.repeats)
        rel = {k: (pred[k] - meas[k]) / meas[k] for k in meas}
        errors += [abs(v) for v in rel.values()]
        cases.append({"model": f"demo-{arch}", "transport": "local",
                      "stages": [{"layers": [a, b], "bits": bits} for a, b, bits in stages],
                      "prefill_micro_batch": pmb, "decode_micro_batch": dmb, "latency_source": pred.pop("source"),
                      "predicted": {k: round(v, 5) for k, v in pred.items()},
                      "measured": {k: round(v, 5) for k, v in meas.items()},
                      "rel_error": {k: round(v, 3) for k, v in rel.items()}})
        if not args.json:
            print(json.dumps(cases[-1]), flush=True)
    doc = {"workload": WORKLOAD.model_dump(), "cases": cases,
           "median_abs_rel_error": round(statistics.median(errors), 3), "max_abs_rel_error": round(max(errors), 3)}
    print(json.dumps(doc) if args.json else json.dumps({k: v for k, v in doc.items() if k != "cases"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

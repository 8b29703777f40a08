"""`llmpq bench plan`: every method on the LLM-PQ paper's 11 clusters, side by side under one cost model."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llmpq_serve.costmodel import CostConfig, CostModel
from llmpq_serve.planner import BASELINES, InfeasibleError, Plan, Problem, QualityTarget, plan
from llmpq_serve.spec import ClusterSpec, ModelSpec, Workload
from llmpq_serve.validation import yaml_mapping


def roofline_problem(model: ModelSpec, cluster: ClusterSpec, workload: Workload, **options: Any) -> Problem:
    """A Problem under the catalog roofline alone, whatever profiles/ holds: the benchmark compares methods under
    the paper's kind of cost model, and its numbers do not move when a measured table is added."""
    return Problem(model, cluster, workload, cost=CostModel(model, CostConfig(profiles_dir=None)), **options)

METHODS = ("uniform", "pipeedge", "llmpq_no_adabits", "llmpq_no_phase", "llmpq_matched", "llmpq_awq4", "llmpq_fast")
LARGE_MODEL = "llama-2-70b"
LARGE_TIME_LIMIT = 60.0
# Quality-first objective used to find the best quality that fits where AWQ-4 quality does not.
QUALITY_FIRST_THETA = 1000.0
GAP = 0.001


@dataclass
class Case:
    id: str
    model: ModelSpec
    cluster: ClusterSpec
    workload: Workload


def load_cases(path: str | Path) -> list[Case]:
    """The clusters of a paper_clusters.yaml-style file (defaults + clusters, each type on its own node)."""
    data = yaml_mapping(path, "clusters file")
    if "clusters" not in data:
        raise ValueError(f"clusters file {path} has no `clusters:` list (see ../shared/paper_clusters.yaml)")
    defaults = data.get("defaults", {})
    cases = []
    for c in data["clusters"]:
        spec = {**defaults, **c}
        cluster = ClusterSpec.from_dict({"name": f"cluster-{c['id']}", "devices": c["devices"],
                                         "inter_node_gbs": spec.get("inter_node_gbs", 3.0)})
        workload = Workload(batch_size=spec["batch_size"], prompt_len=spec["prompt_len"], gen_len=spec["gen_len"])
        cases.append(Case(str(c["id"]), ModelSpec.from_catalog(c["model"]), cluster, workload))
    return cases


def _entry(p: Plan | None, seconds: float, note: str = "") -> dict[str, Any]:
    if p is None:
        return {"feasible": False, "tokens_per_s": 0.0, "quality": None, "solve_s": round(seconds, 3), "note": note}
    bits = Counter(p.bits)
    return {"feasible": True, "tokens_per_s": round(p.predicted.tokens_per_s, 3),
            "quality": round(p.predicted.quality, 6), "solve_s": round(seconds, 3), "status": p.solver.status,
            "gap": None if p.solver.gap is None else round(p.solver.gap, 5),
            "bits": {str(b): bits[b] for b in sorted(bits, reverse=True)},
            "micro_batch": [p.prefill_micro_batch, p.decode_micro_batch],
            "stages": [f"{s.device.gpu}:{s.layers[1] - s.layers[0]}" for s in p.stages], "note": note}


def _timed(problem: Problem, method: str, time_limit: float, seeds: tuple[Plan, ...] = ()) -> tuple[Plan | None,
                                                                                                     float, str]:
    start = time.perf_counter()
    try:
        return plan(problem, method, time_limit=time_limit, seeds=seeds, gap=GAP), time.perf_counter() - start, ""
    except InfeasibleError as e:
        return None, time.perf_counter() - start, str(e)


def run_case(case: Case, time_limit: float = 10.0) -> dict[str, Any]:
    problem = roofline_problem(case.model, case.cluster, case.workload)
    out: dict[str, Any] = {}
    plans: dict[str, Plan] = {}
    for m in BASELINES:
        p, s, note = _timed(problem, m, time_limit)
        out[m] = _entry(p, s, note)
        if p is not None:
            plans[m] = p
    fastest = max(plans.values(), key=lambda p: p.predicted.tokens_per_s, default=None)

    if fastest is not None:
        q = fastest.predicted.quality
        matched = problem.with_quality(QualityTarget(budget=q, label="matched: no worse than the fastest baseline"))
        seeds = tuple(p for p in plans.values() if p.predicted.quality <= q)
        p, s, note = _timed(matched, "llmpq", time_limit, seeds)
        out["llmpq_matched"] = _entry(p, s, note)
    else:
        out["llmpq_matched"] = _entry(None, 0.0, "no feasible baseline to match")

    target, p, s, note = _awq4(problem, time_limit)
    out["llmpq_awq4"] = _entry(p, s, note)
    for m in ("llmpq_no_adabits", "llmpq_no_phase", "llmpq_fast"):
        p, s, why = _timed(target, m, time_limit)
        out[m] = _entry(p, s, why or note)
    return {"id": case.id, "model": case.model.name, "devices": case.cluster.summary(),
            "fastest_baseline": None if fastest is None else fastest.solver.method,
            "methods": {m: out[m] for m in METHODS}}


def _awq4(problem: Problem, time_limit: float) -> tuple[Problem, Plan | None, float, str]:
    """LLM-PQ at 'no worse than the whole model at AWQ-4'; where no plan reaches that, at the best quality that fits
    (flagged). Returns the target it used, the plan, the solve time and the flag."""
    budget = problem.indicator.uniform_quality(4)
    target = problem.with_quality(QualityTarget(budget=budget, label="awq4: no worse than the whole model at 4 bits"))
    p, s, note = _timed(target, "llmpq", time_limit)
    if p is not None:
        return target, p, s, ""
    best, s2, note = _timed(problem.with_quality(QualityTarget(theta=QUALITY_FIRST_THETA)), "llmpq", time_limit)
    if best is None:
        return target, None, s + s2, note
    q = best.predicted.quality
    target = problem.with_quality(QualityTarget(budget=q * (1 + 1e-9), label="best quality that fits"))
    p, s3, note = _timed(target, "llmpq", time_limit, seeds=(best,))
    flag = f"all-4-bit quality ({budget:.4f}) does not fit; target relaxed to the best that fits ({q:.4f})"
    return target, p, s + s2 + s3, flag


def summarise(clusters: list[dict[str, Any]]) -> dict[str, Any]:
    def speedup(c: dict[str, Any], m: str) -> float | None:
        base = c["methods"].get(c["fastest_baseline"] or "", {}).get("tokens_per_s", 0.0)
        mine = c["methods"][m]["tokens_per_s"]
        return mine / base if base and c["methods"][m]["feasible"] else None

    summary: dict[str, Any] = {}
    for m in ("llmpq_matched", "llmpq_awq4", "llmpq_no_adabits", "llmpq_no_phase"):
        ups = [speedup(c, m) for c in clusters]
        ok = [u for u in ups if u is not None]
        # a cluster where the method (or every baseline) is infeasible has no ratio: the geomean and min leave it
        # out, and say over how many clusters they are
        summary[m] = {"speedup_vs_fastest_baseline": [None if u is None else round(u, 3) for u in ups],
                      "geomean": round(math.exp(sum(map(math.log, ok)) / len(ok)), 3) if ok else None,
                      "min": round(min(ok), 3) if ok else None,
                      "clusters_counted": len(ok)}
    fast = []
    for c in clusters:
        exact, heur = c["methods"]["llmpq_awq4"], c["methods"]["llmpq_fast"]
        fast.append(round(exact["tokens_per_s"] / heur["tokens_per_s"] - 1, 5)
                    if exact["feasible"] and heur["feasible"] else None)
    summary["llmpq_fast_gap_vs_exact"] = fast  # latency of the heuristic's plan over the exact one's, minus 1
    solve = [e["solve_s"] for c in clusters for e in c["methods"].values()]
    gaps = [e.get("gap") for c in clusters for e in c["methods"].values() if e.get("gap") is not None]
    summary["max_solve_s"] = max(solve) if solve else None
    summary["max_gap"] = max(gaps) if gaps else None
    summary["all_llmpq_feasible"] = all(c["methods"]["llmpq_awq4"]["feasible"] for c in clusters)
    return summary


def run_large(path: str | Path) -> dict[str, Any]:
    """The scaling check: a 32-device, 4-type cluster and an 80-layer model, LLM-PQ exact and fast at the AWQ-4
    target beside PipeEdge, each with a 60 s limit."""
    cluster = ClusterSpec.from_yaml(path)
    problem = roofline_problem(ModelSpec.from_catalog(LARGE_MODEL), cluster, Workload())
    target = problem.with_quality(QualityTarget(budget=problem.indicator.uniform_quality(4), label="awq4"))
    out = {}
    for name, prob, method in (("pipeedge", problem, "pipeedge"), ("llmpq_awq4", target, "llmpq"),
                               ("llmpq_fast", target, "llmpq_fast")):
        p, s, note = _timed(prob, method, LARGE_TIME_LIMIT)
        out[name] = _entry(p, s, note)
    return {"id": Path(path).stem, "model": LARGE_MODEL, "devices": cluster.summary(),
            "layers": problem.model.layers, "n_devices": len(cluster.devices), "methods": out}


def run(path: str | Path, time_limit: float = 10.0, only: list[str] | None = None,
        large: str | Path | None = None) -> dict[str, Any]:
    cases = load_cases(path)
    unknown = sorted(set(only or ()) - {c.id for c in cases})
    if unknown:  # found before minutes of planning, and before an empty result could replace the last one
        raise ValueError(f"no cluster {', '.join(unknown)} in {path}; its ids: {', '.join(c.id for c in cases)}")
    cases = [c for c in cases if not only or c.id in only]
    clusters = [run_case(c, time_limit) for c in tqdm(cases, desc="planning clusters", unit="cluster")]
    doc: dict[str, Any] = {"clusters": clusters, "summary": summarise(clusters)}
    if large is not None:
        doc["large"] = run_large(large)
    return doc


def markdown(doc: dict[str, Any]) -> str:
    lines = ["Predicted by the cost model (catalog roofline), not measured: tokens/s, quality Σω̂, solve time.", "",
             "| cluster | model | devices | " + " | ".join(METHODS) + " |",
             "|---|---|---|" + "---|" * len(METHODS)]
    for c in doc["clusters"]:
        cells = []
        for m in METHODS:
            e = c["methods"][m]
            cells.append("infeasible" if not e["feasible"] else
                         f"{e['tokens_per_s']:.1f} tok/s, q {e['quality']:.4f}, {e['solve_s']:.1f} s")
        lines.append(f"| {c['id']} | {c['model']} | {c['devices']} | " + " | ".join(cells) + " |")
    s = doc["summary"]
    lines += ["", "Speed-up over the fastest baseline (uniform or pipeedge) on each cluster:", "",
              "| method | per cluster | geomean | min |", "|---|---|---|---|"]
    for m in ("llmpq_matched", "llmpq_awq4", "llmpq_no_adabits", "llmpq_no_phase"):
        e = s[m]
        per = ", ".join("-" if u is None else f"{u:.2f}" for u in e["speedup_vs_fastest_baseline"])
        n = len(doc["clusters"])
        counted = "" if e["clusters_counted"] == n else f" ({e['clusters_counted']} of {n} clusters)"
        lines.append(f"| {m} | {per} | {e['geomean']}{counted} | {e['min']}{counted} |")
    lines += ["", f"Slowest solve: {s['max_solve_s']} s; largest reported gap: {s['max_gap']}.",
              ("Fast heuristic (llmpq_fast) latency over the exact llmpq_awq4 plan's, minus 1, per cluster: "
               + ", ".join("-" if g is None else f"{g:+.2%}" for g in s["llmpq_fast_gap_vs_exact"]) + ".")]
    if "large" in doc:
        big = doc["large"]
        title = f"Scaling: {big['model']} ({big['layers']} layers) on {big['devices']} ({big['n_devices']} devices):"
        lines += ["", title, "", "| method | predicted tokens/s | solve s | status | gap |",
                  "|---|---|---|---|---|"]
        for m, e in big["methods"].items():
            lines.append(f"| {m} | {e['tokens_per_s']:.1f} | {e['solve_s']:.1f} | {e.get('status')} | "
                         f"{e.get('gap')} |")
    return "\n".join(lines) + "\n"

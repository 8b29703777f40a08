"""`llmpq`: plan a deployment, benchmark the planner."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from llmpq_serve.config import NAMED_TARGETS, PLAN_METHODS
from llmpq_serve.costmodel import CostConfig, CostModel
from llmpq_serve.spec import ClusterSpec, ModelSpec, Workload
from llmpq_serve.validation import describe


def _number(kind: type, least: float, strict: bool):
    """An argparse type: a number of `kind` above `least` (or at least it, unless `strict`), refused by argparse
    with the argument's name rather than by a model's validation further on."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < least or (strict and value == least):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {least:g}, not {text}")
        return value
    return parse


POSITIVE_INT, POSITIVE, NON_NEGATIVE = _number(int, 0, True), _number(float, 0, True), _number(float, 0, False)


def cmd_plan(args: argparse.Namespace) -> int:
    from llmpq_serve.indicator import Indicator
    from llmpq_serve.planner import InfeasibleError, Problem, plan

    if not args.profiles.is_dir():  # the cost model would fall back to the roofline for every device
        raise ValueError(f"--profiles {args.profiles}: no such folder")
    model = ModelSpec.resolve(args.model)
    cluster = ClusterSpec.from_yaml(args.cluster)
    workload = Workload(batch_size=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len)
    cost = CostModel(model, CostConfig(profiles_dir=args.profiles))
    indicator = Indicator.from_json(args.indicator) if args.indicator else None
    problem = Problem(model, cluster, workload, cost=cost, indicator=indicator)
    problem = problem.with_target(args.theta, args.budget, args.quality)
    try:
        result = plan(problem, args.method, time_limit=args.time_limit, gap=args.gap)
    except InfeasibleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        result.save(args.out)
    print(result.to_json() if args.json else result.table())
    return 0


def cmd_bench_plan(args: argparse.Namespace) -> int:
    from llmpq_serve.bench import planning

    doc = planning.run(args.clusters, time_limit=args.time_limit, only=args.only,
                       large=None if args.no_large else args.large)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_clusters.json").write_text(json.dumps(doc, indent=1))
    (out / "plan_clusters.md").write_text(planning.markdown(doc))
    print(json.dumps(doc) if args.json else planning.markdown(doc))
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from llmpq_serve import demo_model

    for arch in args.arch:
        path = demo_model.build(arch, force=args.force)
        meta = demo_model.load_meta(path)
        print(f"{arch}: {path}  held-out perplexity {meta['held_out_ppl']:.1f} (random init "
              f"{meta['random_init_ppl']:.1f}), {meta['params'] / 1e6:.1f} M parameters, {meta['seconds']:.0f} s")
    return 0


def cmd_bench_quant(args: argparse.Namespace) -> int:
    from llmpq_serve.bench import quantization

    doc = quantization.run()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc) if args.json else json.dumps(doc, indent=1))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from llmpq_serve import profiler
    from llmpq_serve.profile_table import Profile

    grid = None
    if args.quick:
        grid = profiler.Grid((1, 4), (16, 64), (1, 8), (16, 128))
    # the type's file is known before the run (the detected type unless given), so each finished shape goes into it
    if args.threads:  # a CPU's device name says its threads
        torch.set_num_threads(args.threads)
    detected, name = profiler.detect_device_type(profiler.local_device(args.device))
    device_type = args.type or detected
    # a quick grid's tables would replace the full ones of the cost model's file: they go beside it unless told
    default_name = f"{device_type}.quick.json" if args.quick else f"{device_type}.json"
    out = Path(args.out) if args.out else Path(args.profiles) / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    older = Profile.load(out) if out.is_file() and not args.replace else None
    if older is not None and older.device_type != device_type:  # found now, not after the first shape's minutes
        raise ValueError(f"{out} holds a {older.device_type} profile, not {device_type}: give another --out, or "
                         "--replace to overwrite it")
    if older is not None and older.device_name != name:
        raise ValueError(f"{out} holds tables measured on {older.device_name}, not on this {name}; the cost model "
                         "reads a file's tables as timed on its device: give another --out, or --replace to "
                         "overwrite it")
    finished: list[int] = []

    def save(profile: Profile) -> None:
        (profile.keeping(older) if older else profile).save(out)
        finished.append(len(profile.tables))

    try:
        result = profiler.run(args.model, device=args.device, device_type=device_type, grid=grid,
                              threads=args.threads, samples=args.samples, on_progress=save)
    except KeyboardInterrupt:
        if finished:
            print(f"\ninterrupted: {out} holds the {finished[-1]} shape table(s) this run finished, without its "
                  f"head, hop and step measurements, which come last")
        else:
            print(f"\ninterrupted before a shape finished: {out} " + ("is as it was" if older else "was not written"))
        return 130
    print(f"wrote {out}: {sum(len(t.points) for t in result.tables)} points on {result.device_name}")
    print(profiler.summary(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="solve a deployment plan and print it")
    p.add_argument("--model", required=True, help="catalog name (e.g. opt-30b) or checkpoint directory")
    p.add_argument("--cluster", required=True, help="cluster YAML (see deployments/clusters/)")
    p.add_argument("--prompt-len", type=POSITIVE_INT, default=512)
    p.add_argument("--gen-len", type=POSITIVE_INT, default=100)
    p.add_argument("--batch", type=POSITIVE_INT, default=32)
    p.add_argument("--theta", type=NON_NEGATIVE, default=None,
                   help="weight of normalised quality against normalised latency (default 1 when no target)")
    budget = p.add_mutually_exclusive_group()  # --quality is a budget too: one would silently replace the other
    budget.add_argument("--budget", type=NON_NEGATIVE, default=None,
                        help="upper bound on normalised Σω (1.0 = whole model at 3 bits)")
    budget.add_argument("--quality", choices=sorted(NAMED_TARGETS), default=None,
                        help="budget: no worse than the whole model at this format")
    p.add_argument("--method", choices=list(PLAN_METHODS), default="llmpq")
    p.add_argument("--indicator", default=None, help="indicator JSON (default: the analytic one from shapes)")
    p.add_argument("--profiles", type=Path, default=CostConfig().profiles_dir, help="latency profiles folder")
    p.add_argument("--time-limit", type=POSITIVE, default=10.0, help="seconds for the whole search")
    p.add_argument("--gap", type=NON_NEGATIVE, default=0.001, help="relative optimality gap at which to stop")
    p.add_argument("--out", default=None, help="also write the plan JSON here")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.set_defaults(func=cmd_plan)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    b = bench.add_parser("plan", help="every method on the paper's clusters")
    b.add_argument("--clusters", default="../shared/paper_clusters.yaml")
    b.add_argument("--large", default=str(Path(__file__).resolve().parent.parent / "benchmarks" / "clusters"
                                          / "large-32.yaml"), help="the 32-device scaling instance")
    b.add_argument("--no-large", action="store_true", help="skip the 32-device instance")
    b.add_argument("--only", nargs="*", default=None, help="cluster ids to run")
    b.add_argument("--time-limit", type=POSITIVE, default=10.0)
    b.add_argument("--out-dir", default="benchmarks/results")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench_plan)
    q = bench.add_parser("quant", help="quality, bytes and speed of every weight format on the demo models")
    q.add_argument("--out-dir", default="benchmarks/results")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_bench_quant)

    pr = sub.add_parser("profile", help="measure per-layer latency on this machine's device -> profiles/<TYPE>.json")
    pr.add_argument("--model", nargs="+", required=True, help="catalog names or checkpoint directories")
    pr.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    pr.add_argument("--type", default=None, help="Ray accelerator_type to file it under (default: detected)")
    pr.add_argument("--profiles", default=str(CostConfig().profiles_dir))
    pr.add_argument("--out", default=None, help="output file (default: <profiles>/<TYPE>.json)")
    pr.add_argument("--quick", action="store_true",
                    help="a small grid, for a smoke test (default output <profiles>/<TYPE>.quick.json, which the "
                         "cost model does not read)")
    pr.add_argument("--replace", action="store_true",
                    help="overwrite the output file (default: keep its tables of shapes not measured now)")
    pr.add_argument("--threads", type=POSITIVE_INT, default=None,
                    help="CPU threads (a CPU stage sharing a machine with others runs with fewer than all cores)")
    pr.add_argument("--samples", type=POSITIVE_INT, default=None,
                    help="samples per grid point (default 7), taken round-robin over a shape's points: more spread "
                         "the profile over more time, for a machine whose speed drifts")
    pr.set_defaults(func=cmd_profile)

    d = sub.add_parser("demo-model", help="train (or reuse) the demo models under $LLMPQ_CACHE")
    d.add_argument("--arch", nargs="*", default=["llama", "opt"], choices=["llama", "opt"])
    d.add_argument("--force", action="store_true", help="retrain even when a matching model exists")
    d.set_defaults(func=cmd_demo_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as e:  # a ValueError too, whose own text spans lines and links pydantic's docs
        print(f"error: {e.title}: {describe(e)}", file=sys.stderr)
        return 2
    except (ValueError, OSError, yaml.YAMLError) as e:  # a user's mistake: a bad value, a missing or wrong file
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Cost-model fidelity: for several plans of the demo models (stage counts, bit mixes, micro-batch sizes), run the
real pipeline on a fixed workload and compare measured against predicted prefill time, decode time per token and
end-to-end latency.

    python benchmarks/costmodel_fidelity.py --json

Stages are CPU devices of one thread each (the catalog's CPU entry), so that a 2-stage pipeline really runs its
stages side by side on this 2-core machine. Latencies come from a table that the benchmark profiles as `llmpq profile
--device cpu --threads 1` does, with each case's model's layers timed again right before and right after the case
and averaged (`bracketed`: this VM's speed drifts within minutes; `layers_after_over_before` in a case shows how
much), or from `--profiles` as given. The prediction is the planner's
own (Problem.evaluate); for the "local" transport (the runtime in this process, stages in threads, which take turns
on the GIL for part of each call) its stage times are combined as `taking_turns` says, with the GIL-held share of a
prefill call measured here first (`gil_held_share`). Transports: "local" and "ray" (the Serve app on a local Ray
cluster whose node declares logical GPUs of type CPU: stage deployments, the stage ring, the router, timed over HTTP
on its own server). A Ray case's prefill and latency also pay the requests' way in and out (client, HTTP, Serve's
ingress, the router's event loop), which no layer profile holds: the benchmark measures it on the same app as the
time of the batch's requests at once to /healthz (no model runs there; ~15 ms for 8 requests here, against ~50 ms
of predicted prefill) and adds it to the planner's prediction (`ingress_s` in the case). Prints {"cases": [...],
"median_abs_rel_error", "max_abs_rel_error"}.

    python benchmarks/costmodel_fidelity.py --stack llama-3-8b --device cuda --json

runs the same comparison on one real-size layer stack instead: a checkpoint of the named model's layer shape, vocabulary
and `--stack-layers` decoder layers with random weights (latency does not depend on their values), saved and loaded by
path like any other, on one stage of the local device (int8/int4 layers round-to-nearest quantized through the
runtime's own quantization cache). The prediction uses the device's table in `--profiles`, so profile that shape on
the same device first (`llmpq profile --model llama-3-8b`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmpq_serve.costmodel import CostConfig, CostModel, gpu_named
from llmpq_serve.planner import Problem
from llmpq_serve.planner.problem import early_decode_steps
from llmpq_serve.profile_table import LayerShape, Profile, ProfilePoint, ShapeTable
from llmpq_serve.profiler import detect_device_type
from llmpq_serve.profiler.layers import hf_config
from llmpq_serve.runtime.local import local_engine
from llmpq_serve.runtime.ring import free_port
from llmpq_serve.runtime.sampling import SamplingParams
from llmpq_serve.runtime.shard import QuantOptions, StageSpec, runtime_dtype
from llmpq_serve.spec import ClusterSpec, ModelSpec, Workload

WORKLOAD = Workload(batch_size=8, prompt_len=32, gen_len=16)
STACK_WORKLOAD = Workload(batch_size=16, prompt_len=256, gen_len=32)
# (demo model, [(first layer, end layer, bits per layer)], prefill micro-batch, decode micro-batch)
CASES = [
    ("llama", [(0, 8, [16] * 8)], 4, 8),
    ("llama", [(0, 4, [16] * 4), (4, 8, [16] * 4)], 2, 4),
    ("llama", [(0, 4, [16, 16, 8, 8]), (4, 8, [8, 8, 16, 16])], 4, 4),
    ("opt", [(0, 8, [16] * 8)], 2, 2),
    ("opt", [(0, 3, [16, 3, 3]), (3, 8, [16] * 5)], 4, 8),
    ("opt", [(0, 4, [4, 4, 16, 16]), (4, 8, [16, 16, 4, 4])], 8, 8),
]
RAY_CASES = [
    ("llama", [(0, 4, [16] * 4), (4, 8, [16] * 4)], 2, 4),
    ("opt", [(0, 3, [16, 3, 3]), (3, 8, [16] * 5)], 4, 8),
]
INGRESS_REPEATS = 20
# (bits of the stack's first half, of its second half, prefill micro-batch, decode micro-batch), all on one stage:
# a second stage on the same GPU would not run beside the first, as the cost model assumes of stages
STACK_CASES = [(16, 16, 4, 16), (16, 16, 8, 4), (16, 8, 4, 16), (16, 4, 2, 8), (8, 4, 8, 16)]


def predict(path: Path, stages: list, pmb: int, dmb: int, profiles: Path, workload: Workload = WORKLOAD,
            device: str = "cpu", held: float | None = None) -> dict:
    """The planner's prediction (Problem.evaluate); with `held` (the GIL-held share of a prefill call, see
    `gil_held_share`), for stages that are threads of this process (see `taking_turns`)."""
    model = ModelSpec.from_checkpoint(path)
    dev = torch.device(device)
    elem = runtime_dtype(dev).itemsize
    ray_type, name = detect_device_type(dev)
    # the catalog's variant of this very device (a table measured on it is then not scaled as another variant's)
    spec = gpu_named(ray_type, name)
    gpu = spec.name if spec is not None else ray_type
    cluster = ClusterSpec.from_dict({"name": "local", "devices": [{"type": gpu, "count": len(stages)}]})
    cost = CostModel(model, CostConfig(profiles_dir=profiles, act_bytes=elem, float_bytes=elem, kv_bytes=elem))
    problem = Problem(model, cluster, workload, cost=cost)
    pred, _ = problem.evaluate(list(cluster.devices), [bits for _, _, bits in stages], pmb, dmb)
    prefill, decode = (pred.prefill_s, pred.decode_s) if held is None else taking_turns(pred.stages, workload, pmb,
                                                                                          dmb, held)
    return {"prefill_s": prefill, "decode_per_token_s": decode / (workload.gen_len - 1), "latency_s": prefill + decode,
            "source": cost.latency_source(cluster.devices[0].spec)}


def taking_turns(stages: list, workload: Workload, pmb: int, dmb: int, held: float) -> tuple[float, float]:
    """(prefill s, decode s) of stages that are threads of one Python process (the local transport), which take turns
    on the GIL for the part of a call that holds it (Python, op dispatch) and overlap in the rest (the kernels).

    Prefill: the k micro-batches are queued at once and flow through the stages with nothing between them, so they
    pipeline as the planner says (the first micro-batch through every stage, then k - 1 steps of the slowest), except
    that while stages run at once, the held share `held` of all but the longest one's call is added to each of
    those steps (never more than all calls one after the other).
    Decode: every step goes back to the router on the same interpreter (sampling, the next step's rows) before it
    can go on, and the 2-stage local decode step measured the sum of its stages' times, so the calls are added up;
    the early decode steps count as the planner counts them."""
    k_p, k_d = math.ceil(workload.batch_size / pmb), math.ceil(workload.batch_size / dmb)
    times = [s.prefill_s for s in stages]
    step = max(times) + held * (sum(times) - max(times))
    decode = [s.decode_s for s in stages]
    early = early_decode_steps(workload.batch_size, pmb, dmb)
    prefill = min(sum(times) + (k_p - 1) * step, k_p * sum(times))
    return prefill, (workload.gen_len - 1) * k_d * sum(decode) + early * max(decode)


def gil_held_share(path: Path, workload: Workload = WORKLOAD, repeats: int = 30) -> float:
    """The share of a prefill call that holds the GIL, measured here on the model's two halves as stages: (two calls
    at once in two threads − the longer one alone) / the shorter one alone. 0: threads overlap fully; 1: one after
    the other."""
    import threading

    from llmpq_serve.runtime.local import StageRunner
    from llmpq_serve.runtime.scheduler import RowsSpec

    half = ModelSpec.from_checkpoint(path).layers // 2
    # stage runners, as the local chain's: each sets its thread count in the thread that runs it
    runners = [StageRunner(path, spec, 2, workload.max_len) for spec in StageSpec.chain([(0, half, [16] * half),
                                                                                         (half, 2 * half, [16] * half)])]
    n = 2 * workload.prompt_len
    spec = runners[0].shard.spec
    inputs = [torch.randint(0, spec.vocab, (n,)), torch.randn(n, spec.hidden)]
    rows = RowsSpec([0, 1], [0, 0], [workload.prompt_len] * 2)

    def calls(k: int) -> None:
        for _ in range(repeats):
            runners[k].run(rows, inputs[k])

    def timed_s(*ks: int) -> float:
        threads = [threading.Thread(target=calls, args=(k,)) for k in ks]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return (time.perf_counter() - start) / repeats

    timed_s(0, 1)  # warm-up
    alone = [timed_s(0), timed_s(1)]
    both = timed_s(0, 1)
    return min(1.0, max(0.0, (both - max(alone)) / min(alone)))


async def timed(engine, prompts: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def one(i: int, p: list[int]) -> None:
        async for _ in engine.generate(p, params, f"r{i}"):
            pass

    start = time.perf_counter()
    await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    return time.perf_counter() - start


async def timed_http(http, url: str, prompts: list[list[int]], max_tokens: int) -> float:
    """The batch's requests at once over `http`, whose connections the warm-up opened: a serving client keeps its
    connections, and opening them is no part of the pipeline."""
    body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    answers = await asyncio.gather(*[http.post(f"{url}/v1/completions", json={**body, "prompt": p}) for p in prompts])
    elapsed = time.perf_counter() - start
    bad = [a.text for a in answers if a.status_code != 200]
    if bad:
        raise RuntimeError(f"the app refused a request: {bad[0]}")
    return elapsed


def prompts_for(path: Path, workload: Workload = WORKLOAD) -> list[list[int]]:
    from transformers import AutoTokenizer

    from llmpq_serve.demo_model import held_out_tokens

    p, n = workload.prompt_len, workload.batch_size
    data = held_out_tokens(AutoTokenizer.from_pretrained(str(path)), max_chars=p * n * 12)
    return [data[i * p:(i + 1) * p].tolist() for i in range(n)]


async def repeat(run: Callable[[list[list[int]], int], Awaitable[float]], prompts: list[list[int]],
                 repeats: int, gen_len: int = WORKLOAD.gen_len) -> dict:
    """Median prefill time (one token each), end-to-end time (gen_len tokens each) and decode time per token."""
    await run(prompts, 2)  # warm-up
    prefill, total = [], []
    for _ in range(repeats):
        prefill.append(await run(prompts, 1))
        total.append(await run(prompts, gen_len))
    pre, tot = statistics.median(prefill), statistics.median(total)
    return {"prefill_s": pre, "decode_per_token_s": (tot - pre) / (gen_len - 1), "latency_s": tot}


def measure_local(path: Path, stages: list, pmb: int, dmb: int, repeats: int, workload: Workload = WORKLOAD,
                  device: str = "cpu", quant: QuantOptions | None = None) -> dict:
    engine = local_engine(path, StageSpec.chain(stages), pmb, dmb, workload.batch_size, workload.max_len,
                          device=device, quant=quant or QuantOptions())

    async def run() -> dict:
        try:
            return await repeat(lambda prompts, n: timed(engine, prompts, n), prompts_for(path, workload), repeats,
                                workload.gen_len)
        finally:
            await engine.scheduler.stop()

    return asyncio.run(run())


def build_stack(shape_of: str, layers: int, out: Path, device: str) -> Path:
    """A checkpoint of `layers` decoder layers of the model's shape, its vocabulary, random weights and a small
    tokenizer (greedy ids outside it decode to nothing, which costs the same)."""
    from transformers import AutoModelForCausalLM

    from llmpq_serve.demo_model import read_texts, stdlib_files, train_tokenizer

    spec = ModelSpec.resolve(shape_of)
    _, config = hf_config(LayerShape.of(spec), vocab=spec.vocab)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=runtime_dtype(torch.device(device)))
    model.save_pretrained(out)
    train_tokenizer(read_texts(stdlib_files()[0], 300_000), 512).save_pretrained(out)
    return out


def run_stack(args: argparse.Namespace) -> tuple[list[dict], list[float]]:
    """The stack suite: (cases, absolute relative errors)."""
    import tempfile

    from llmpq_serve.quant.apply import QuantCache, model_id
    from llmpq_serve.runtime.quantized import ensure_quantized

    cases, errors = [], []
    with tempfile.TemporaryDirectory(prefix="llmpq-stack-") as tmp:
        path = build_stack(args.stack, args.stack_layers, Path(tmp) / "stack", args.device)
        quant = QuantOptions(method="rtn", cache_dir=Path(tmp) / "quantized")
        n, half = args.stack_layers, args.stack_layers // 2
        plans = [([(0, n, [first] * half + [second] * (n - half))], pmb, dmb)
                 for first, second, pmb, dmb in STACK_CASES]
        # one pass over the full model for every quantized layer of every case, not one per case
        todo = sorted({(i, b) for stages, _, _ in plans for _, _, bits in stages for i, b in enumerate(bits) if b != 16})
        ensure_quantized(path, ModelSpec.from_checkpoint(path).arch, todo, quant, QuantCache(quant.cache_dir),
                         model_id(path))
        for stages, pmb, dmb in plans:
            pred = predict(path, stages, pmb, dmb, args.profiles, STACK_WORKLOAD, args.device)
            meas = measure_local(path, stages, pmb, dmb, args.repeats, STACK_WORKLOAD, args.device, quant)
            cases.append(case_record(f"{args.stack} x{args.stack_layers} layers", "local", stages, pmb, dmb, pred,
                                     meas, errors))
            if not args.json:
                print(json.dumps(cases[-1]), flush=True)
    return cases, errors


def case_record(model: str, transport: str, stages: list, pmb: int, dmb: int, pred: dict, meas: dict,
                errors: list[float]) -> dict:
    rel = {k: (pred[k] - meas[k]) / meas[k] for k in meas}  # pred may carry more (the Ray cases' ingress_s)
    errors += [abs(v) for v in rel.values()]
    return {"model": model, "transport": transport, "stages": [{"layers": [a, b], "bits": bits} for a, b, bits in stages],
            "prefill_micro_batch": pmb, "decode_micro_batch": dmb, "latency_source": pred.pop("source"),
            "predicted": {k: round(v, 5) for k, v in pred.items()},
            "measured": {k: round(v, 5) for k, v in meas.items()},
            "rel_error": {k: round(v, 3) for k, v in rel.items()}}


class RayApp:
    """A local Ray cluster whose node has one logical GPU of type CPU per stage, and Serve on a free port, in the
    throughput-optimized mode `make serve` uses: requests go to the router replica's own HTTP server (direct
    ingress), not through the proxy actor, whose extra hop per request (~10 ms here) no cost model of the pipeline
    contains."""

    DIRECT_PORTS = 50

    def __init__(self) -> None:
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster

        from deployments.simulated_cluster import throughput_optimized_env

        self.direct_port = free_port()
        os.environ.update(throughput_optimized_env(self.direct_port, self.DIRECT_PORTS))  # as `make serve` runs
        # no dashboard: its processes (~5% of a core here) serve no request, and would only take the stages' cores
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        self.cluster.add_node(num_cpus=2, num_gpus=2, resources={"accelerator_type:CPU": 2})
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        self.cluster.shutdown()

    def measure(self, path: Path, stages: list, pmb: int, dmb: int, repeats: int) -> dict:
        from ray import serve

        from deployments.app import build_app

        args = {"model": str(path), "prefill_micro_batch": pmb, "decode_micro_batch": dmb,
                "stages": [{"accelerator_type": "CPU", "layers": [a, b], "bits": bits} for a, b, bits in stages],
                "workload": WORKLOAD.model_dump(), "max_context": WORKLOAD.max_len}
        serve.run(build_app(args), name="fidelity", route_prefix="/")
        try:
            url = self.router_url()
            return asyncio.run(self._repeat_http(url, prompts_for(path), repeats))
        finally:
            serve.delete("fidelity")

    @staticmethod
    async def _repeat_http(url: str, prompts: list[list[int]], repeats: int) -> dict:
        """As `repeat`, plus `ingress_s`: the median time of the batch's requests at once to /healthz, which runs no
        model: what the serving stack (the client, HTTP, Serve's ingress, the router's event loop) costs them."""
        import httpx

        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_keepalive_connections=len(prompts))) as http:
            measured = await repeat(lambda ps, n: timed_http(http, url, ps, n), prompts, repeats)
            times = []
            for _ in range(INGRESS_REPEATS):
                start = time.perf_counter()
                await asyncio.gather(*[http.get(f"{url}/healthz") for _ in prompts])
                times.append(time.perf_counter() - start)
        return {**measured, "ingress_s": statistics.median(times)}

    def router_url(self, timeout_s: float = 300) -> str:
        """The router replica's own server once its stages are up: the port of the range that answers ready (a
        redeployed replica may take the next one while the last one's port is still closing). Ready means the
        router's own answer: a Ray process's metrics exporter took a port of the range in one run, and it answers
        every GET, /healthz too, with 200."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for port in range(self.direct_port, self.direct_port + self.DIRECT_PORTS + 1):
                try:
                    answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                    if answer.status_code == 200 and answer.json().get("ready") is True:
                        return f"http://127.0.0.1:{port}"
                except (httpx.HTTPError, ValueError, AttributeError):  # nothing there, or not the router
                    continue
            time.sleep(0.5)
        raise RuntimeError(f"no router got ready on ports {self.direct_port}-{self.direct_port + self.DIRECT_PORTS} "
                           f"in {timeout_s:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", type=Path, default=None,
                        help="latency tables to predict from (default: for the demo suite, the demo models' layers "
                             "profiled on this CPU first, ~30 s, so that the table and the runs share this machine "
                             "and its current speed; for --stack, the repository's profiles/)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case; the medians are compared")

    parser.add_argument("--no-ray", action="store_true", help="only the local-transport cases")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--stack", default=None, metavar="MODEL",
                        help="run the real-size layer stack of this catalog model (or checkpoint) instead")
    parser.add_argument("--stack-layers", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="the stack's device")
    args = parser.parse_args()
    with stdout_to_stderr() if args.json else contextlib.nullcontext():
        if args.stack:
            args.profiles = args.profiles or ROOT / "profiles"
            cases, errors = run_stack(args)
            workload = STACK_WORKLOAD
        else:
            cases, errors = run_demo(args)
            workload = WORKLOAD
    doc = {"workload": workload.model_dump(), "cases": cases,
           "median_abs_rel_error": round(statistics.median(errors), 3), "max_abs_rel_error": round(max(errors), 3)}
    print(json.dumps(doc) if args.json else json.dumps({k: v for k, v in doc.items() if k != "cases"}, indent=1))
    return 0


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Ray's driver prints its processes' errors on stdout (a "(raylet) Task ServeController.graceful_shutdown
    failed" line as Serve went down once broke a --json document): with --json, stdout holds the document only."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_demo(args: argparse.Namespace) -> tuple[list[dict], list[float]]:
    """The demo-model suite on this machine's CPU cores: (cases, absolute relative errors)."""
    from llmpq_serve import demo_model

    torch.set_num_threads(1)  # one core per stage, as profiled
    bracket = args.profiles is None
    if bracket:
        import tempfile

        from llmpq_serve import profiler

        base = profiler.run([str(demo_model.build(arch)) for arch in ("llama", "opt")], device="cpu", threads=1)
        args.profiles = Path(tempfile.mkdtemp(prefix="llmpq-profiles-"))
        # a model's layers timed since the last case ran (nothing ran after them): the next case's "before"
        since_last_case = {LayerShape.of(ModelSpec.from_checkpoint(demo_model.build(arch))): base
                           for arch in ("llama", "opt")}
    cases, errors = [], []
    held: dict[str, float] = {}  # per demo model, see gil_held_share
    runs = [("local", case) for case in CASES] + ([] if args.no_ray else [("ray", case) for case in RAY_CASES])
    ray_app = None
    try:
        for transport, (arch, stages, pmb, dmb) in runs:
            path = demo_model.build(arch)
            if transport == "local" and arch not in held:
                held[arch] = gil_held_share(path)
            if transport == "ray" and ray_app is None:
                ray_app = RayApp()
                if bracket:  # a Ray case's layers are timed before and after it with the cluster up, both
                    since_last_case.clear()
            if bracket:
                model = ModelSpec.from_checkpoint(path)
                shape = LayerShape.of(model)
                before = since_last_case.pop(shape, None) or time_layers(path)
                since_last_case.clear()
            if transport == "local":
                meas = measure_local(path, stages, pmb, dmb, args.repeats)
            else:
                meas = ray_app.measure(path, stages, pmb, dmb, args.repeats)
            drift = None
            if bracket:
                after = since_last_case[shape] = time_layers(path)
                table, drift = bracketed(before.table_for(model), after.tables[0])
                base.model_copy(update={"tables": [table]}).save(args.profiles / f"{base.device_type}.json")
            pred = predict(path, stages, pmb, dmb, args.profiles, held=held.get(arch) if transport == "local" else None)
            if transport == "ray":
                # a request's way in and out is no stage's work: measured on the app, added once per batch
                pred["ingress_s"] = meas.pop("ingress_s")
                pred["prefill_s"] += pred["ingress_s"]
                pred["latency_s"] += pred["ingress_s"]
            cases.append(case_record(f"demo-{arch}", transport, stages, pmb, dmb, pred, meas, errors))
            if drift is not None:
                cases[-1]["layers_after_over_before"] = round(drift, 3)
            if not args.json:
                print(json.dumps(cases[-1]), flush=True)
    finally:
        if ray_app is not None:
            ray_app.stop()
    return cases, errors


def time_layers(path: Path) -> Profile:
    """The layer table of a demo model's shape on this CPU, timed now (~10 s)."""
    from llmpq_serve import profiler

    return profiler.run([str(path)], device="cpu", threads=1, extras=False)


def bracketed(before: ShapeTable, after: ShapeTable) -> tuple[ShapeTable, float]:
    """(the table of the mean of two timings of the same grid, the median ratio after / before over its points).
    This VM's speed for the same work drifts by up to 1.5x within minutes: a case is predicted from its layers timed
    right before and right after it, as the serving benchmark sets each pipeline run between two baseline runs."""
    if [(p.bits, p.phase, p.micro_batch, p.seq) for p in before.points] != \
            [(p.bits, p.phase, p.micro_batch, p.seq) for p in after.points]:
        raise ValueError("the two timings of the layers cover different grids")
    points = [ProfilePoint(bits=a.bits, phase=a.phase, micro_batch=a.micro_batch, seq=a.seq,
                           median_s=(a.median_s + b.median_s) / 2, p10_s=min(a.p10_s, b.p10_s),
                           p90_s=max(a.p90_s, b.p90_s)) for a, b in zip(before.points, after.points)]
    drift = statistics.median(b.median_s / a.median_s for a, b in zip(before.points, after.points))
    return ShapeTable(shape=after.shape, points=points, kernels=after.kernels), drift


if __name__ == "__main__":
    sys.exit(main())

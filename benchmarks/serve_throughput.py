"""Serving throughput: the Ray pipeline over HTTP (continuous batching) against plain HF `generate` in one process,
batched statically, on the same model, prompts and machine, in one run.

    python benchmarks/serve_throughput.py --json                 # starts the 2-stage demo app itself
    python benchmarks/serve_throughput.py --url http://host:8000 --json

Closed loop: `--concurrency` clients each send their next request when the last one finished. Prompts are windows
of held-out standard-library source of varied length; output lengths vary too (temperature 0, no early stop, so
both sides produce exactly the asked tokens). Prints output tokens/s of both, their ratio, time to first token and
time per output token (p50/p99) of the pipeline, and the number of failed requests.

This machine's speed drifts by ±10% within minutes (the same baseline run measured 643 and 716 tok/s a minute
apart), so one pipeline run against one baseline run says little. The benchmark runs `--rounds` pipeline runs, each
between two baseline runs (baseline, pipeline, baseline, pipeline, baseline), compares each pipeline run with the
mean of the two beside it, and reports the median over rounds. The demo app is started for each pipeline run and
stopped after it, so the baseline never shares the cores with its idle Ray processes.

The started demo runs Serve's throughput-optimized mode, where the router replica serves HTTP itself (direct
ingress; what Serve's HAProxy mode or a load balancer forwards to) besides Serve's proxy actor on the app's port.
The headline numbers are measured on the router's own server; `via_proxy_*` repeats the run through the proxy."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmpq_serve.runtime.ring import free_port


def workload(tokenizer, requests: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) per request: prompts of 16-96 tokens, outputs of 16-64."""
    from llmpq_serve.demo_model import held_out_tokens

    data = held_out_tokens(tokenizer, max_chars=200_000).tolist()
    rng = random.Random(seed)
    out = []
    for _ in range(requests):
        n = rng.randint(16, 96)
        start = rng.randrange(0, len(data) - n)
        out.append((data[start:start + n], rng.randint(16, 64)))
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


async def one_request(http: httpx.AsyncClient, url: str, body: dict, stream: bool) -> tuple[int, float, float]:
    """(completion tokens, time of the first token, time of the last); tokens -1 on an error answer."""
    if not stream:
        r = await http.post(f"{url}/v1/completions", json=body)
        now = time.perf_counter()
        return (r.json()["usage"]["completion_tokens"] if r.status_code == 200 else -1), now, now
    first = last = 0.0
    got = -1
    async with http.stream("POST", f"{url}/v1/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        if r.status_code != 200:
            await r.aread()
            return -1, 0.0, 0.0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                got = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices"):
                last = time.perf_counter()
                first = first or last
    return got, first, last


async def pipeline_run(url: str, model: str, reqs: list[tuple[list[int], int]], concurrency: int,
                       stream: bool = True) -> dict:
    queue = list(reqs)
    ttft, tpot, tokens, errors = [], [], 0, 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        while queue:
            prompt, max_tokens = queue.pop(0)
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            start = time.perf_counter()
            try:
                got, first, last = await one_request(http, url, body, stream)
            except httpx.HTTPError:
                got = -1
            if got != max_tokens:
                errors += 1
                continue
            tokens += got
            if stream:  # without a stream the first token's time is the whole answer's: no TTFT to report
                ttft.append(first - start)
                if got > 1:
                    tpot.append((last - first) / (got - 1))

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=300) as http:
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "ttft": ttft, "tpot": tpot, "errors": errors}


@torch.inference_mode()
def baseline_run(path: Path, reqs: list[tuple[list[int], int]], batch: int) -> dict:
    """HF generate, static batches of `batch` requests in arrival order, left-padded; a batch runs until its
    longest request is done (that is what static batching costs)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    pad = model.config.pad_token_id or 0
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(reqs), batch):
        group = reqs[i:i + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.full((len(group), width), pad)
        mask = torch.zeros_like(ids)
        for j, (p, _) in enumerate(group):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        new = max(m for _, m in group)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=pad)
        tokens += sum(m for _, m in group)
    return {"tokens": tokens, "wall_s": time.perf_counter() - start}


def start_demo(port: int, direct_port: int, prefill_micro_batch: int, decode_micro_batch: int,
               overrides: dict) -> subprocess.Popen:
    """The demo app with a fixed even 2-stage split (the stages share this machine's CPU, so a split planned for
    the simulated GPU types would not be balanced here), and `overrides` of the demo config's other args."""
    config = yaml.safe_load((ROOT / "deployments" / "demo.yaml").read_text())
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args.update({"stages": [{"accelerator_type": "T4", "layers": [0, 4]}, {"accelerator_type": "V100",
                                                                          "layers": [4, 8]}],
                 "prefill_micro_batch": prefill_micro_batch, "decode_micro_batch": decode_micro_batch, **overrides})
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    return subprocess.Popen([sys.executable, "-m", "deployments.simulated_cluster", f.name, "--gpus", "T4", "V100",
                             "--direct-port", str(direct_port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_ready(url: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} did not become ready in {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running app (default: start the demo app)")
    parser.add_argument("--model", default="demo-llama")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2,
                        help="pipeline runs, each between two baseline runs (this machine's speed drifts)")
    parser.add_argument("--prefill-micro-batch", type=int, default=4, help="of the started demo app")
    parser.add_argument("--decode-micro-batch", type=int, default=16, help="of the started demo app")
    parser.add_argument("--mixed-steps", action="store_true", help="of the started demo app: prefills ride along "
                        "with decode steps")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="of the started demo app: prompt tokens "
                        "per prefill micro-batch (0: whole prompts; default: the demo config's)")
    parser.add_argument("--prefill-wait-ms", type=float, default=None, help="of the started demo app: how long a "
                        "partial prefill micro-batch may wait for more requests (default: the demo config's)")
    parser.add_argument("--no-stream", action="store_true",
                        help="non-streaming requests (no TTFT/TPOT): shows what per-token streaming costs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # a plain SIGTERM would skip the `finally` below and leave the started demo cluster running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from transformers import AutoTokenizer

    from llmpq_serve.config import ServeConfig

    path = ServeConfig(model=args.model).checkpoint()
    reqs = workload(AutoTokenizer.from_pretrained(str(path)), args.requests)
    stream = not args.no_stream
    bases = [baseline_run(path, reqs, args.concurrency)]
    pipes, proxied = [], []
    for _ in range(args.rounds):
        pipe, via_proxy = serve_round(args, reqs, stream)
        pipes.append(pipe)
        if via_proxy:
            proxied.append(via_proxy)
        # the demo is down again: the baseline never shares the cores with its idle Ray processes (~0.1 core)
        bases.append(baseline_run(path, reqs, args.concurrency))
    print(json.dumps(report(args.concurrency, len(reqs), bases, pipes, proxied),
                         indent=None if args.json else 1))
    return 0


def serve_round(args: argparse.Namespace, reqs: list[tuple[list[int], int]], stream: bool) -> tuple[dict, dict | None]:
    """One pipeline run (and one through the proxy when it starts the demo itself): the demo app is started for it
    and stopped after, so that the baseline runs beside it have the machine to themselves."""
    server, url, proxy_url = None, args.url, None
    if url is None:
        # the router's own HTTP server (Serve's direct ingress) is the headline; the proxy actor's port is measured too
        direct_port, proxy_port = free_port(), free_port()
        url, proxy_url = f"http://127.0.0.1:{direct_port}", f"http://127.0.0.1:{proxy_port}"
        overrides = {"mixed_steps": args.mixed_steps}
        if args.prefill_chunk is not None:  # else the config's own
            overrides["prefill_chunk_tokens"] = args.prefill_chunk or None
        if args.prefill_wait_ms is not None:
            overrides["prefill_wait_ms"] = args.prefill_wait_ms
        server = start_demo(proxy_port, direct_port, args.prefill_micro_batch, args.decode_micro_batch, overrides)
    try:
        wait_ready(url)
        asyncio.run(pipeline_run(url, args.model, reqs[:args.concurrency], args.concurrency))  # warm-up
        pipe = asyncio.run(pipeline_run(url, args.model, reqs, args.concurrency, stream=stream))
        via_proxy = proxy_url and asyncio.run(pipeline_run(proxy_url, args.model, reqs, args.concurrency,
                                                           stream=stream))
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
    return pipe, via_proxy


def tokens_per_s(run: dict) -> float:
    return run["tokens"] / run["wall_s"]


def report(concurrency: int, requests: int, bases: list[dict], pipes: list[dict], proxied: list[dict]) -> dict:
    """Round k's ratio is its pipeline's tokens/s over the mean of the baseline runs just before and after it; the
    headline numbers are the medians over rounds, latencies pooled over every round."""
    rate = [tokens_per_s(r) for r in pipes]
    base = [(tokens_per_s(bases[k]) + tokens_per_s(bases[k + 1])) / 2 for k in range(len(pipes))]
    ratios = [p / b for p, b in zip(rate, base)]
    ttft = [t for r in pipes for t in r["ttft"]]
    tpot = [t for r in pipes for t in r["tpot"]]
    doc = {"concurrency": concurrency, "requests": requests,
           "pipeline_tokens_per_s": round(statistics.median(rate), 2),
           "baseline_tokens_per_s": round(statistics.median(base), 2),
           "ratio": round(statistics.median(ratios), 3),
           "ttft_p50_s": round(statistics.median(ttft), 4) if ttft else None,
           "ttft_p99_s": round(percentile(ttft, 0.99), 4) if ttft else None,
           "tpot_p50_s": round(statistics.median(tpot), 4) if tpot else None,
           "tpot_p99_s": round(percentile(tpot, 0.99), 4) if tpot else None,
           "errors": sum(r["errors"] for r in pipes + proxied),
           "rounds": [{"pipeline_tokens_per_s": round(p, 2), "baseline_tokens_per_s": round(b, 2),
                       "ratio": round(p / b, 3)} for p, b in zip(rate, base)],
           "baseline_runs_tokens_per_s": [round(tokens_per_s(r), 2) for r in bases]}
    if proxied:
        via = statistics.median(tokens_per_s(r) for r in proxied)
        doc["via_proxy_tokens_per_s"] = round(via, 2)
        # each round's proxy run against the same baselines as its direct run (proxied: one per round or none)
        doc["via_proxy_ratio"] = round(statistics.median(tokens_per_s(r) / b for r, b in zip(proxied, base)), 3)
    return doc


if __name__ == "__main__":
    sys.exit(main())

"""A stage's decode call after an idle wait against the same call back to back, which is how `llmpq profile` times
layers.

    python benchmarks/idle_gap.py --json                                    # demo Llama stage on this CPU
    python benchmarks/idle_gap.py --model llama-3-8b --layers 8 --rows 16 --context 256 --device cuda --json

A pipeline stage's thread sleeps between calls while the rest of the ring works (1-16 ms per decode step on the CPU
demo). On this VM a call after such a wait was up to 1.5x slower than back to back (see benchmarks/FIDELITY.md),
which the table does not hold. The stage is `--layers` decoder layers of the model's shape with random weights at
`--bits`, built as the profiler builds them, called one after the other on `--rows` rows at `--context` tokens.
The waits are taken in turn within every round, so that the machine's drift falls on all of them alike. Prints
{"per_wait_ms": {wait: [median call ms per round]}, "ratio": {wait: median of the rounds' ratios to no wait}}."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmpq_serve.profile_table import LayerShape
from llmpq_serve.profiler import detect_device_type, local_device
from llmpq_serve.profiler.layers import build_layer, point_inputs, profile_dtype
from llmpq_serve.profiler.timing import synchronize
from llmpq_serve.runtime.kvcache import KVCache
from llmpq_serve.runtime.layers import attention_kernels, layer_forward, rotary
from llmpq_serve.spec import ModelSpec


def stage_call(model: str, layers: int, bits: int, rows: int, context: int, device: torch.device):
    """One decode call of a stage of `layers` distinct layers, as a function of no arguments."""
    shape = LayerShape.of(ModelSpec.resolve(model))
    dtype = profile_dtype(device)
    built = [build_layer(shape, bits, device, dtype) for _ in range(layers)]
    arch, config = built[0][0], built[0][1]
    forward = layer_forward(arch, config)
    cache = KVCache(layers, rows, context + 2, shape.kv_heads, shape.hidden // shape.heads, dtype, device)
    batch, x, rope = point_inputs(rotary(arch, config, device), shape.hidden, "decode", rows, context, device, dtype)

    @torch.inference_mode()
    def call() -> None:
        with attention_kernels(device):  # the stage's own kernels, as its runner enters them around its layers
            for i, (_, _, layer) in enumerate(built):
                forward(layer, x, rope, cache, i, batch)
        synchronize(device)

    return call


def timed(call, wait_s: float, calls: int) -> float:
    """Median seconds of `calls` calls, each after sleeping `wait_s`."""
    times = []
    for _ in range(calls):
        if wait_s:
            time.sleep(wait_s)
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="catalog name or checkpoint (default: the demo Llama)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--bits", type=int, default=16, choices=(16, 8, 4, 3))
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads, one per stage as the demo runs them")
    parser.add_argument("--waits-ms", default="0,1,3,10")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=40, help="calls per wait and round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    device = local_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.model is None:
        from llmpq_serve import demo_model

        args.model = str(demo_model.build("llama"))
    call = stage_call(args.model, args.layers, args.bits, args.rows, args.context, device)
    for _ in range(10):
        call()
    waits = [float(w) for w in args.waits_ms.split(",")]
    if 0.0 not in waits:
        waits.insert(0, 0.0)
    per_wait: dict[float, list[float]] = {w: [] for w in waits}
    for _ in range(args.rounds):
        for w in waits:
            per_wait[w].append(timed(call, w / 1e3, args.calls))
    ratios = {w: statistics.median(t / b for t, b in zip(per_wait[w], per_wait[0.0])) for w in waits}
    result = {"device": detect_device_type(device)[1], "model": args.model, "layers": args.layers, "bits": args.bits,
              "rows": args.rows, "context": args.context,
              "per_wait_ms": {f"{w:g}": [round(t * 1e3, 3) for t in per_wait[w]] for w in waits},
              "ratio": {f"{w:g}": round(r, 3) for w, r in ratios.items()}}
    if args.json:
        print(json.dumps(result))
    else:
        for w in waits:
            print(f"wait {w:>5g} ms: call {statistics.median(per_wait[w]) * 1e3:8.3f} ms, {ratios[w]:.2f}x back to back")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The router's sampler (`llmpq_serve.runtime.sampling.sample`) against the textbook one, per decode micro-batch.

    python benchmarks/sampler_speed.py --json

The router draws every sampled token of a micro-batch on its own CPU, one thread of it, between pipeline steps: what
it costs there is time no stage computes. The textbook sampler, which this one replaced, sorts the whole vocabulary
of each row for top-k/top-p and draws with `torch.multinomial`; this one takes `topk` of a doubling size for the
nucleus only when top-k or top-p cut something, and draws by inverse CDF. Both take the same logits: rows of a
language-model-like spread (normal, standard deviation `--spread`, the order of what Llama-style models emit; the
wider, the smaller a nucleus), for the demo models' vocabulary (512) and the usual large ones (32k, 128k), at
OpenAI's defaults (temperature 1, nothing cut) and two common cuts. The two run in turn within each round. Prints
{"cases": [{"vocab", "rows", "params", "textbook_ms", "sampler_ms", "speedup"}], "median_speedup": x}."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmpq_serve.runtime.sampling import SamplingParams, make_generator, sample

PARAMS = {"defaults": {}, "top_p 0.9 at 0.7": {"temperature": 0.7, "top_p": 0.9}, "top_k 50": {"top_k": 50}}


def textbook(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """Temperature, a full sort of each row, the top-k and top-p masks over it, then torch.multinomial."""
    x = logits.float()
    vocab = x.shape[-1]
    temp = torch.tensor([p.temperature for p in params])
    top_k = torch.tensor([min(p.top_k or vocab, vocab) for p in params])
    top_p = torch.tensor([p.top_p for p in params])
    scaled, order = ((x - x.amax(-1, keepdim=True)) / temp[:, None]).sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab)
    probs = scaled.masked_fill(rank >= top_k[:, None], float("-inf")).softmax(-1)
    keep = (probs.cumsum(-1) - probs < top_p[:, None]) | (top_p[:, None] >= 1) | (rank == 0)
    probs = probs.masked_fill(~keep, 0.0)
    return [int(order[j, torch.multinomial(probs[j], 1, generator=g)]) for j, g in enumerate(generators)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[512, 32000, 128256])
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 16], help="decode micro-batch sizes")
    parser.add_argument("--spread", type=float, default=3.0, help="standard deviation of the logits")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the router's event loop runs it
    cases = []
    for vocab in args.vocabs:
        for rows in args.rows:
            logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * args.spread
            for label, kw in PARAMS.items():
                params = [SamplingParams(seed=i, **kw) for i in range(rows)]
                times: dict[str, list[float]] = {"textbook": [], "sampler": []}
                for _ in range(args.rounds):
                    for name, fn in (("textbook", textbook), ("sampler", sample)):
                        generators = [make_generator(p) for p in params]
                        calls = max(1, int(2e5 // (rows * vocab)))
                        start = time.perf_counter()
                        for _ in range(calls):
                            fn(logits, params, generators)
                        times[name].append((time.perf_counter() - start) / calls)
                old, new = statistics.median(times["textbook"]), statistics.median(times["sampler"])
                cases.append({"vocab": vocab, "rows": rows, "params": label, "textbook_ms": round(old * 1e3, 3),
                              "sampler_ms": round(new * 1e3, 3), "speedup": round(old / new, 2)})
                if not args.json:
                    print(f"vocab {vocab:>6} rows {rows:>3} {label:<18} textbook {old * 1e3:8.2f} ms, "
                          f"sampler {new * 1e3:7.2f} ms: {old / new:6.1f}x")
    result = {"cases": cases, "median_speedup": statistics.median(c["speedup"] for c in cases)}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"median speed-up {result['median_speedup']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

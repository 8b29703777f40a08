"""`llmpq bench quant`: quality, memory and speed of every weight format on the demo models.

Quality is the KL divergence of the next-token distribution from the unquantized model's on held-out text (mean
nats per token), with perplexity beside it: a briefly trained model's perplexity hardly moves at 3-4 bits, its KL
does."""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llmpq_serve import demo_model
from llmpq_serve.costmodel import CostConfig, CostModel
from llmpq_serve.indicator import Indicator
from llmpq_serve.quant.apply import quantize_shard
from llmpq_serve.quant.calibration import collect_inputs, decoder_layers
from llmpq_serve.quant.linear import QuantLinear
from llmpq_serve.spec import ModelSpec

FORMATS = {"fp32": (16, "rtn"), "int8": (8, "rtn"), "awq4": (4, "awq"), "awq3": (3, "awq"), "rtn4": (4, "rtn"),
           "rtn3": (3, "rtn")}
GROUP = 128
# torch's CPU int4 kernel is built for small batches: evaluation windows are kept few
CALIB_WINDOWS, EVAL_WINDOWS, SEQ = 32, 24, 128


def windows(data: torch.Tensor, n: int, seq: int = SEQ) -> torch.Tensor:
    return torch.stack([data[i * seq: (i + 1) * seq] for i in range(n)])


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(input_ids=chunk).logits.float() for chunk in ids.split(8)])


def kl_and_ppl(ref_logits: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    ref = F.log_softmax(ref_logits[:, :-1], -1)
    mine = F.log_softmax(logits[:, :-1], -1)
    kl = (ref.exp() * (ref - mine)).sum(-1).mean().item()
    nll = F.nll_loss(mine.reshape(-1, mine.shape[-1]), ids[:, 1:].reshape(-1)).item()
    return {"kl": kl, "ppl": math.exp(nll)}


def quantized_copy(model, arch: str, bits: list[int], method: str, calibration) -> torch.nn.Module:
    twin = copy.deepcopy(model)
    quantize_shard(twin, arch, list(range(len(bits))), bits, calibration, method=method, group_size=GROUP)
    return twin


def layer_bytes(layer: torch.nn.Module) -> int:
    """What a decoder layer holds: parameters and buffers, quantized or not."""
    tensors = list(layer.parameters()) + list(layer.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_model(arch: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo_model.build(arch)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    spec = ModelSpec.from_checkpoint(path)
    held = demo_model.held_out_tokens(tokenizer)
    train = demo_model.encode(tokenizer, demo_model.read_texts(demo_model.stdlib_files()[0], 200_000))
    calib = collect_inputs(model, spec.arch, list(windows(train, CALIB_WINDOWS).split(8)))
    ids = windows(held, EVAL_WINDOWS)
    ref = logits_of(model, ids)
    L = spec.layers

    quality, bytes_ = {}, {}
    cost = CostModel(spec, CostConfig(float_bytes=4))  # this runtime keeps floats in fp32 on the CPU
    for name, (bits, method) in tqdm(FORMATS.items(), desc=f"{arch}: formats", unit="format"):
        twin = quantized_copy(model, spec.arch, [bits] * L, method, calib)
        quality[name] = kl_and_ppl(ref, logits_of(twin, ids), ids)
        bytes_[str(bits)] = {"measured": layer_bytes(decoder_layers(twin, spec.arch)[0]),
                             "predicted": cost.layer_weight_bytes(bits)}

    indicator = Indicator.calibrated(model, spec.arch, calib)
    single = []
    for layer in range(L):
        bits = [16] * L
        bits[layer] = 3
        single.append(kl_and_ppl(ref, logits_of(quantized_copy(model, spec.arch, bits, "awq", calib), ids), ids)["kl"])
    omega3 = [row[3] for row in indicator.omega]

    # one mixed plan: the indicator's least sensitive quarter of layers at 3 bits, its most sensitive quarter at 8
    order = sorted(range(L), key=lambda i: omega3[i])
    mixed = [4] * L
    for i in order[: L // 4]:
        mixed[i] = 3
    for i in order[-(L // 4):]:
        mixed[i] = 8
    quality["mixed"] = {**kl_and_ppl(ref, logits_of(quantized_copy(model, spec.arch, mixed, "awq", calib), ids), ids),
                        "bits": mixed}
    meta = demo_model.load_meta(path)
    return {"quality": quality, "bytes": bytes_, "single_layer_kl3": single, "omega3": omega3,
            "spearman": spearman(omega3, single), "held_out_ppl": meta["held_out_ppl"],
            "random_init_ppl": meta["random_init_ppl"]}


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


@torch.no_grad()
def latency_ratios(size: int = 4096, batches: tuple[int, ...] = (1, 16), repeats: int = 20) -> dict[str, Any]:
    """Median time of one size x size linear per format relative to fp32, at each batch."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(size, size, bias=False)
    layers = {"fp32": linear, **{f: QuantLinear.from_linear(linear, b, GROUP) for f, b in
                                 (("int8", 8), ("int4", 4), ("int3", 3))}}
    out: dict[str, Any] = {}
    for batch in batches:
        x = torch.randn(batch, size)
        times = {}
        for name, layer in layers.items():
            layer(x)
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                layer(x)
                samples.append(time.perf_counter() - start)
            times[name] = sorted(samples)[len(samples) // 2]
        out[f"batch{batch}"] = {name: t / times["fp32"] for name, t in times.items() if name != "fp32"}
        out[f"batch{batch}_ms"] = {name: t * 1e3 for name, t in times.items()}
    return out


def run() -> dict[str, Any]:
    models = {arch: bench_model(arch) for arch in ("llama", "opt")}
    lat = latency_ratios()
    ratios = lat["batch1"]
    doc = {"quality": {a: m["quality"] for a, m in models.items()},
           "bytes": {f: models["llama"]["bytes"][str(b)] for f, b in (("fp32", 16), ("int8", 8), ("awq4", 4),
                                                                       ("awq3", 3))},
           "indicator_spearman": min(m["spearman"] for m in models.values()),
           "latency_ratio": {"int8": ratios["int8"], "awq4": ratios["int4"], "awq3": ratios["int3"]},
           "details": {"latency": lat, **{a: {k: v for k, v in m.items() if k not in ("quality",)}
                                          for a, m in models.items()}}}
    return doc

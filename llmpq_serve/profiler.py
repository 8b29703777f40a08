"""`llmpq profile`: measures one decoder layer of given model shapes on the local device, at every bit-width the
runtime supports, for prefill and decode over a grid of micro-batch sizes and lengths, plus the LM head and the
stage-to-stage transfer and the scheduler's own work per micro-batch step; writes `profiles/<TYPE>.json`.

Weights are random (latency does not depend on their values) but of the real dimensions and in the runtime's own
form: the same HF layer modules, QuantLinear kernels, KV cache and forward that a stage runs."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from llmpq_serve import catalog
from llmpq_serve.costmodel import matrix_bytes
from llmpq_serve.profile_table import (
    HeadPoint,
    LayerShape,
    Profile,
    ProfilePoint,
    ShapeTable,
    StepPoint,
    TransferFit,
)
from llmpq_serve.quant.groupwise import GroupQuant
from llmpq_serve.quant.layout import linear_names
from llmpq_serve.quant.linear import QuantLinear
from llmpq_serve.runtime.kvcache import KVCache
from llmpq_serve.runtime.layers import Rows, attention_kernels, layer_forward, rope_of, rotary
from llmpq_serve.runtime.transfer import to_host
from llmpq_serve.spec import ModelSpec

BITS = (16, 8, 4, 3)
SAMPLES = 7  # per grid point, unless told


@dataclass(frozen=True)
class Grid:
    prefill_batches: tuple[int, ...]
    prompt_lens: tuple[int, ...]
    decode_batches: tuple[int, ...]
    context_lens: tuple[int, ...]


GPU_GRID = Grid((1, 2, 4, 8), (128, 512, 1024, 2048), (1, 4, 16, 32, 64), (128, 512, 1024, 2048))
CPU_GRID = Grid((1, 2, 4, 8), (16, 32, 64), (1, 2, 4, 8), (16, 32, 64, 128))


def detect_device_type(device: torch.device) -> tuple[str, str]:
    """(Ray accelerator_type name, device name) of the local device: the catalog's Ray type whose name appears in
    the CUDA device name (e.g. "NVIDIA H100 80GB HBM3" -> H100), else the name's last word."""
    if device.type != "cuda":
        return "CPU", f"CPU ({torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name(device)
    words = name.replace("-", " ").split()
    types = sorted({g["ray_type"] for g in catalog.gpu_table().values() if g.get("ray_type")}, key=len, reverse=True)
    return next((t for t in types if t in words), words[-1]), name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, samples: int = SAMPLES,
            sample_s: float = 0.01) -> tuple[float, float, float]:
    """(median, p10, p90) seconds per call of `fn`; see `measure_round_robin`."""
    return measure_round_robin([fn], device, samples, sample_s)[0]


def measure_round_robin(calls: list[Callable[[], object]], device: torch.device, samples: int = SAMPLES,
                        sample_s: float = 0.01, bar: tqdm | None = None) -> list[tuple[float, float, float]]:
    """(median, p10, p90) seconds per call of each of `calls`. A sample runs one call back to back enough times to
    last `sample_s`, so that timer and synchronisation overheads do not swamp microsecond-scale decode steps.

    The samples are taken round-robin (each round, one sample of every call) rather than all of one call's at once:
    a shared machine's speed drifts over seconds, and with back-to-back samples a slow spell fell on all samples of
    a run of neighbouring points. Two CPU profiles of the demo shapes taken one after the other then disagreed by
    more than 25% on a fifth of their points, in runs of neighbours, which bent the table's shape; round-robin, a
    spell costs each point one sample, and the medians come from moments spread over the whole profile.
    `bar` advances by one per sample."""
    rounds, inners = [], []
    for fn in calls:
        fn()  # warm-up
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        once = max(time.perf_counter() - start, 1e-7)
        inners.append(max(1, min(1000, int(sample_s / once))))
        # slow points (3-bit prefill on a CPU core): fewer samples, their spread is small anyway
        rounds.append(min(samples, 3) if once > 0.1 else samples)
        if bar is not None:
            bar.update(samples - rounds[-1])
    times: list[list[float]] = [[] for _ in calls]
    for r in range(samples):
        for fn, inner, n, out in zip(calls, inners, rounds, times):
            if r >= n:
                continue
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            out.append((time.perf_counter() - start) / inner)
            if bar is not None:
                bar.update()
    return [_spread(t) for t in times]


def _spread(times: list[float]) -> tuple[float, float, float]:
    times = sorted(times)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return statistics.median(times), q[0], q[-1]


def hf_config(shape: LayerShape, vocab: int = 32000):
    if shape.arch == "gated":
        from transformers import LlamaConfig

        return "llama", LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.ffn,
                                    num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                                    num_hidden_layers=1, vocab_size=vocab, max_position_embeddings=8192)
    from transformers import OPTConfig

    return "opt", OPTConfig(hidden_size=shape.hidden, ffn_dim=shape.ffn, num_attention_heads=shape.heads,
                            num_hidden_layers=1, vocab_size=vocab, word_embed_proj_dim=shape.hidden,
                            max_position_embeddings=8192)


def random_linear(linear: nn.Linear, bits: int, group_size: int, dtype: torch.dtype) -> nn.Module:
    out_f, in_f = linear.weight.shape
    dev = linear.weight.device
    bias = None if linear.bias is None else linear.bias.detach().to(dtype)
    if bits == 16:
        return linear.to(dtype)
    if bits == 8:
        q = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8, device=dev)
        return QuantLinear.from_int8(q, torch.rand(out_f, device=dev) * 1e-2, bias)
    g = min(group_size, in_f)
    levels = 2**bits
    gq = GroupQuant(torch.randint(0, levels, (out_f, in_f), dtype=torch.uint8, device=dev),
                    torch.rand(out_f, in_f // g, device=dev) * 1e-2,
                    torch.randint(0, levels, (out_f, in_f // g), dtype=torch.uint8, device=dev), bits, g)
    return QuantLinear.from_group_quant(gq, bias)


def build_layer(shape: LayerShape, bits: int, device: torch.device, dtype: torch.dtype, group_size: int = 128):
    arch, config = hf_config(shape)
    with torch.device(device):
        if arch == "llama":
            from transformers.models.llama.modeling_llama import LlamaDecoderLayer as Layer
        else:
            from transformers.models.opt.modeling_opt import OPTDecoderLayer as Layer
        layer = Layer(config, layer_idx=0).to(dtype).eval()
    for name in linear_names(arch):
        head, _, attr = name.rpartition(".")
        parent = layer.get_submodule(head) if head else layer
        setattr(parent, attr, random_linear(getattr(parent, attr), bits, group_size, dtype))
    return arch, config, layer


def last_level_cache_bytes(device: torch.device) -> int:
    """The cache a stage's weights stream through: the GPU's L2, or the CPU's last-level cache."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        text = (index / "size").read_text().strip() if (index / "size").is_file() else ""
        if text[:-1].isdigit():
            sizes.append(int(text[:-1]) * {"K": 1024, "M": 1024**2}.get(text[-1], 1))
    return max(sizes, default=32 * 1024**2)


@torch.inference_mode()
def profile_shape(shape: LayerShape, bits: tuple[int, ...], grid: Grid, device: torch.device, dtype: torch.dtype,
                  samples: int, bar: tqdm) -> list[ProfilePoint]:
    """Every grid point of one layer shape at each of `bits`, sampled round-robin (`measure_round_robin`), so the
    layers of every bit-width are held at once, and the points share one KV cache of the grid's largest micro-batch
    and length (a point's rows use its first slots and positions, as a stage's rows use part of its cache).

    Calls cycle through enough copies of the layer that their weights overflow the last-level cache, as a stage's
    consecutive layers do: one layer timed alone would find its weights in cache and look faster than it runs in a
    stage (small layers on a CPU by about 2x)."""
    arch, config = hf_config(shape)
    forward = layer_forward(arch, config)
    rope_module = rotary(arch, config, device)
    head_dim = shape.hidden // shape.heads
    stacks = {b: layer_copies(shape, b, device, dtype) for b in bits}
    copies = max(len(layers) for layers in stacks.values())
    cache = KVCache(copies, max(grid.prefill_batches + grid.decode_batches),
                    max(grid.prompt_lens + grid.context_lens) + 1, shape.kv_heads, head_dim, dtype, device)
    keys, calls = [], []
    for b, layers in stacks.items():
        for phase, batches, lens in (("prefill", grid.prefill_batches, grid.prompt_lens),
                                     ("decode", grid.decode_batches, grid.context_lens)):
            for mb, n in itertools.product(batches, lens):
                if phase == "prefill":
                    rows = Rows(list(range(mb)), [0] * mb, [n] * mb).to(device)
                else:
                    rows = Rows(list(range(mb)), [n] * mb, [1] * mb).to(device)
                x = torch.randn(rows.tokens, shape.hidden, device=device, dtype=dtype)
                rope = rope_of(rope_module, x, rows)
                turn = itertools.cycle(range(len(layers)))

                def call(x=x, rope=rope, rows=rows, turn=turn, layers=layers, cache=cache):
                    i = next(turn)
                    return forward(layers[i], x, rope, cache, i, rows)

                keys.append((b, phase, mb, n))
                calls.append(call)
    with attention_kernels(device):
        measured = measure_round_robin(calls, device, samples, bar=bar)
    return [ProfilePoint(bits=b, phase=phase, micro_batch=mb, seq=n, median_s=median, p10_s=p10, p90_s=p90)
            for (b, phase, mb, n), (median, p10, p90) in zip(keys, measured)]


def layer_copies(shape: LayerShape, bits: int, device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
    """Enough copies of the layer that their weights overflow the last-level cache twice (at most 16)."""
    layer = build_layer(shape, bits, device, dtype)[2]
    layer_bytes = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
    copies = max(1, min(16, math.ceil(2 * last_level_cache_bytes(device) / max(layer_bytes, 1))))
    return [layer] + [build_layer(shape, bits, device, dtype)[2] for _ in range(copies - 1)]


@torch.inference_mode()
def profile_head(hidden: int, vocab: int, batches: tuple[int, ...], device: torch.device,
                 dtype: torch.dtype) -> list[HeadPoint]:
    """Final norm + LM head on the last position of each sequence, and the logits' copy to the host."""
    norm = nn.LayerNorm(hidden, device=device, dtype=dtype)
    head = nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)
    out = []
    for mb in batches:
        x = torch.randn(mb, hidden, device=device, dtype=dtype)
        median, _, _ = measure(lambda x=x: to_host(head(norm(x))), device)
        out.append(HeadPoint(hidden=hidden, vocab=vocab, micro_batch=mb, median_s=median))
    return out


def profile_transfer(device: torch.device, dtype: torch.dtype, hidden: int = 4096) -> TransferFit:
    """A stage-to-stage hop as the ring makes it: off the device, through the runtime's own link (a loopback TCP
    socket, `ring.loopback_pair`) and onto the device again, timed as half a round trip between two threads for
    activations of 1 to 4096 tokens. The fit's latency is the smallest message's hop less its bytes at the fitted
    bandwidth, which comes from the largest and smallest messages: a least-squares line over sizes this far apart
    would set the latency by the largest message's noise."""
    from llmpq_serve.runtime.ring import loopback_pair

    near, far = loopback_pair()

    def echo() -> None:
        try:
            while True:
                meta, x = far.recv()
                far.send(meta, x.to(device))
        except (ConnectionError, OSError):  # the pair closed: profiling is over
            pass

    def round_trip(x: torch.Tensor) -> torch.Tensor:
        near.send({}, x)
        return near.recv()[1].to(device)

    echoing = threading.Thread(target=echo, name="profile-hop-echo", daemon=True)
    echoing.start()
    sizes, times = [], []
    try:
        for tokens in (1, 16, 256, 4096):
            x = torch.randn(tokens, hidden, device=device, dtype=dtype)
            sizes.append(x.numel() * x.element_size())
            times.append(measure(partial(round_trip, x), device)[0] / 2)
    finally:
        near.close()
        far.close()
        echoing.join()
    bytes_per_s = (sizes[-1] - sizes[0]) / max(times[-1] - times[0], 1e-12)
    return TransferFit(latency_s=max(times[0] - sizes[0] / bytes_per_s, 0.0), bytes_per_s=bytes_per_s, sizes=sizes,
                       seconds=times)


def answer_with(rows: int, vocab: int, dtype: str, host: str, port: int) -> None:
    """A ring stage that answers every micro-batch at once with its first rows of a [rows, vocab] logits tensor in
    `dtype`, each row's greedy token an ordinary one of the stand-in tokenizer: with it, a step's time is the
    router's work and the step's way around the ring. Run in a process of its own (`stage_process`)."""
    import logging

    from llmpq_serve.runtime.ring import StageLoop

    logging.getLogger("llmpq_serve.runtime.ring").setLevel(logging.ERROR)  # its ring closing is the normal end
    torch.set_num_threads(1)
    logits = torch.zeros(rows, vocab, dtype=getattr(torch, dtype))
    tokens = torch.randint(1, min(STAND_IN_VOCAB, vocab), (rows,), generator=torch.Generator().manual_seed(0))
    logits[torch.arange(rows), tokens] = 1.0
    loop = StageLoop(lambda mb, x: logits[:len(mb.slots)], 0, 1)
    loop.start(host, port)
    loop.thread.join()
    # The ring is closed and nothing is left to clean up. The interpreter's teardown aborted this process in half the
    # runs here ("terminate called without an active exception": a C++ thread still joinable), printing that
    # into `llmpq profile`'s output, so it is skipped.
    os._exit(0)


def stage_process(rows: int, vocab: int, dtype: torch.dtype, host: str, port: int) -> subprocess.Popen:
    """`answer_with` in a new interpreter. Not a multiprocessing child: a spawned one imports the caller's main
    module again, which in a script without a `__main__` guard runs the profiling again, in the child, and hangs
    both; a fork would copy this process's threads' locks mid-use."""
    root = str(Path(__file__).resolve().parent.parent)  # the package as this process imports it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    code = (f"from llmpq_serve.profiler import answer_with; "
            f"answer_with({rows}, {vocab}, {str(dtype).removeprefix('torch.')!r}, {host!r}, {port})")
    return subprocess.Popen([sys.executable, "-c", code], env=env)


STAND_IN_VOCAB = 512


def stand_in_tokenizer():
    """A byte-level BPE tokenizer like the demo models' (the profiler has no checkpoint's own): detokenizing is part
    of the router's work per step."""
    from llmpq_serve.demo_model import read_texts, stdlib_files, train_tokenizer

    return train_tokenizer(read_texts(stdlib_files()[0], 200_000), STAND_IN_VOCAB)


def profile_step_overhead(batches: tuple[int, ...], vocab: int = 32000, steps: int = 64,
                          dtype: torch.dtype = torch.float32) -> list[StepPoint]:
    """Seconds per micro-batch step outside the stages' layers: the router's own work (scheduling, sampling,
    detokenizing, handing out events to the requests' streams) and the step's way over the stage ring, out to the
    first stage and back from the last (pickling, sockets, the wake-ups of both processes). Measured on a real ring
    whose one stage, a process of its own, answers at once (`answer_with`), for one decode micro-batch of each
    size: `steps` greedy tokens of a full group, each row repeating one ordinary token of the stand-in tokenizer.
    The logits come in `dtype`, the stages' runtime dtype, as the sampler gets them. On the 2-core CPU machine:
    0.60 ms for 4 rows (profiles/CPU.json; 0.42-0.60 ms over nine profiles of one afternoon), against 0.15 ms for
    the router's work alone."""
    from llmpq_serve.runtime.engine import PipelineEngine
    from llmpq_serve.runtime.ring import RingChain
    from llmpq_serve.runtime.sampling import SamplingParams
    from llmpq_serve.runtime.scheduler import Scheduler

    tokenizer = stand_in_tokenizer()
    stages: list[subprocess.Popen] = []

    async def join(host: str, port: int) -> None:
        stages.append(stage_process(max(batches), vocab, dtype, host, port))

    async def one_run(chain: RingChain, mb: int) -> float:
        engine = PipelineEngine(Scheduler(chain, tokenizer, mb, mb, 1, steps + 16), tokenizer, "step", dict)
        params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)

        async def consume(i: int) -> None:
            async for _ in engine.generate([1] * 8, params, f"r{i}"):
                pass

        start = time.perf_counter()
        await asyncio.gather(*[consume(i) for i in range(mb)])
        elapsed = time.perf_counter() - start
        await engine.scheduler.stop()
        return elapsed / steps

    async def all_runs() -> list[StepPoint]:
        chain = RingChain(1, "127.0.0.1", join)
        try:
            out = []
            for mb in batches:
                await one_run(chain, mb)  # warm-up
                out.append(StepPoint(micro_batch=mb, median_s=statistics.median([await one_run(chain, mb)
                                                                                 for _ in range(5)])))
            return out
        finally:
            chain.close()

    try:
        return asyncio.run(all_runs())
    finally:
        for stage in stages:
            try:
                stage.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stage.kill()
                stage.wait()


def run(models: list[str], device: str | None = None, device_type: str | None = None, grid: Grid | None = None,
        bits: tuple[int, ...] = BITS, threads: int | None = None, samples: int | None = None) -> Profile:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads:
        torch.set_num_threads(threads)
    detected, name = detect_device_type(dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    grid = grid or (GPU_GRID if dev.type == "cuda" else CPU_GRID)
    samples = samples or SAMPLES
    specs = [ModelSpec.resolve(m) for m in models]
    shapes = list(dict.fromkeys(LayerShape.of(s) for s in specs))
    per_layer = len(grid.prefill_batches) * len(grid.prompt_lens) + len(grid.decode_batches) * len(grid.context_lens)
    tables, heads = [], []
    with tqdm(total=len(shapes) * len(bits) * per_layer * samples, desc=f"profiling on {name}",
              unit="sample") as bar:
        for shape in shapes:
            tables.append(ShapeTable(shape=shape, points=profile_shape(shape, bits, grid, dev, dtype, samples, bar)))
            if dev.type == "cuda":  # the shape's layers and cache go back before the next shape's come
                torch.cuda.empty_cache()
    for spec in specs:
        if not any(h.hidden == spec.hidden and h.vocab == spec.vocab for h in heads):
            heads += profile_head(spec.hidden, spec.vocab, grid.decode_batches, dev, dtype)
    return Profile(device_type=device_type or detected, device_name=name, torch=torch.__version__,
                   measured_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   method=(f"llmpq profile: one decoder layer with random weights of each shape, runtime forward "
                           f"(QuantLinear kernels, slot KV cache, SDPA) in {str(dtype).removeprefix('torch.')}; "
                           f"calls cycle through copies of the layer overflowing the last-level cache; "
                           f"per point the median of {samples} samples (3 where one call takes > 0.1 s), taken "
                           f"round-robin over the shape's points, each sample >= 10 ms of back-to-back calls after a "
                           f"warm-up; {torch.get_num_threads()} CPU threads; "
                           f"models: {', '.join(models)}"),
                   tables=tables, heads=heads, transfer=profile_transfer(dev, dtype),
                   step_overhead=profile_step_overhead(grid.decode_batches, max(s.vocab for s in specs),
                                                       dtype=dtype))


def decode_speedups(profile: Profile, batches: tuple[int, ...] = (1, 16)) -> list[dict]:
    """Per shape and decode micro-batch, at the shortest profiled context: each format's layer time against 16-bit,
    beside the memory-bandwidth bound (the ratio of weight bytes, what a purely weight-bound step would gain)."""
    rows = []
    for table in profile.tables:
        s = table.shape
        shapes = [(3 * s.hidden if s.kv_heads == s.heads else s.hidden + 2 * s.kv_heads * (s.hidden // s.heads),
                   s.hidden), (s.hidden, s.hidden)]
        shapes += ([(2 * s.ffn, s.hidden), (s.hidden, s.ffn)] if s.arch == "gated" else
                   [(s.ffn, s.hidden), (s.hidden, s.ffn)])
        decode = [p for p in table.points if p.phase == "decode"]
        if not decode or not table.has(16, "decode"):
            continue
        ctx = min(p.seq for p in decode)
        for mb in sorted({p.micro_batch for p in decode} & set(batches)):
            base = table.interpolate(16, "decode", mb, ctx)
            row = {"shape": f"{s.arch} h{s.hidden} ffn{s.ffn}", "micro_batch": mb, "context": ctx,
                   "fp16_ms": round(base * 1e3, 4)}
            for bits in (8, 4, 3):
                if table.has(bits, "decode"):
                    bound = (sum(matrix_bytes(o, i, 16, 128) for o, i in shapes)
                             / sum(matrix_bytes(o, i, bits, 128) for o, i in shapes))
                    row[f"int{bits}_speedup"] = round(base / table.interpolate(bits, "decode", mb, ctx), 3)
                    row[f"int{bits}_bound"] = round(bound, 3)
            rows.append(row)
    return rows


def summary(profile: Profile) -> str:
    lines = [f"{profile.device_name} ({profile.device_type}), torch {profile.torch}",
             "decode step of one layer, speed-up over 16-bit (memory-bandwidth bound in brackets):"]
    for r in decode_speedups(profile):
        parts = [f"int{b} {r[f'int{b}_speedup']:.2f}x ({r[f'int{b}_bound']:.2f}x)" for b in (8, 4, 3)
                 if f"int{b}_speedup" in r]
        lines.append(f"  {r['shape']:<24} mb {r['micro_batch']:>3} ctx {r['context']}: fp16 {r['fp16_ms']:.3f} ms, "
                     + ", ".join(parts))
    if profile.transfer:
        t = profile.transfer
        lines.append(f"stage hand-off: {t.latency_s * 1e6:.0f} us + {t.bytes_per_s / 1e9:.2f} GB/s")
    if profile.step_overhead:
        lines.append("router work and ring round trip per micro-batch step: " + ", ".join(
            f"mb {p.micro_batch} {p.median_s * 1e3:.2f} ms" for p in profile.step_overhead))
    return "\n".join(lines)

"""`llmpq profile`: measures one decoder layer of given model shapes on the local device, at every bit-width the
runtime supports, for prefill and decode over a grid of micro-batch sizes and lengths (`layers`), plus the LM head,
the stage-to-stage transfer and the scheduler's own work per micro-batch step (`ring_costs`); writes
`profiles/<TYPE>.json`.

Weights are random (latency does not depend on their values) but of the real dimensions and in the runtime's own
form: the same HF layer modules, QuantLinear kernels, KV cache and forward that a stage runs."""

from __future__ import annotations

import datetime
from collections.abc import Callable

import torch
from tqdm import tqdm

from llmpq_serve import catalog
from llmpq_serve.costmodel import float_bytes_on, matrix_bytes
from llmpq_serve.profile_table import LayerShape, Profile, ShapeTable
from llmpq_serve.profiler.layers import (
    BITS,
    CPU_GRID,
    GPU_GRID,
    Grid,
    profile_dtype,
    profile_head,
    profile_shape,
)
from llmpq_serve.profiler.ring_costs import profile_step_overhead, profile_transfer
from llmpq_serve.profiler.timing import SAMPLES
from llmpq_serve.runtime.kernel_revisions import KERNEL_REVISIONS
from llmpq_serve.spec import ModelSpec


def detect_device_type(device: torch.device) -> tuple[str, str]:
    """(Ray accelerator_type name, device name) of the local device."""
    if device.type != "cuda":
        return "CPU", f"CPU ({torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name(device)
    return ray_type_of(name), name


def ray_type_of(cuda_name: str) -> str:
    """The catalog's Ray type whose name is a word of the CUDA device name ("NVIDIA H100 80GB HBM3" -> H100), else
    the type Ray itself gives a node with that GPU, where Ray is installed ("NVIDIA RTX A6000" -> RTX-A6000), else the
    name's last word. The file must be named as Ray names the type: that is what the planner looks up."""
    words = cuda_name.replace("-", " ").split()
    types = sorted({g["ray_type"] for g in catalog.gpu_table().values() if g.get("ray_type")}, key=len, reverse=True)
    known = next((t for t in types if t in words), None)
    if known:
        return known
    try:  # a GPU profiler's machine may lack Ray (the lent GPUs' image does)
        from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

        return NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(cuda_name) or words[-1]
    except (ImportError, AttributeError):
        return words[-1]


def local_device(device: str | None = None) -> torch.device:
    """`device`, else this machine's GPU if it has one, else its CPU; a device this machine lacks is a ValueError
    that says so (torch's own errors, asserts among them, say it less plainly)."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"device {device!r}: {e}; give cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: this machine has no CUDA device that torch {torch.__version__} "
                             f"can use")
        if (dev.index or 0) >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: the profiler runs on cpu or cuda")
    return dev


def run(models: list[str], device: str | None = None, device_type: str | None = None, grid: Grid | None = None,
        bits: tuple[int, ...] = BITS, threads: int | None = None, samples: int | None = None,
        on_progress: Callable[[Profile], None] | None = None, extras: bool = True) -> Profile:
    """The profile of `models`' layer shapes on `device`. `on_progress` gets the profile measured so far after each
    shape's table (without the heads, hop and step, which come last) and the whole one at the end: a large GPU shape
    takes minutes, and a run cut short then keeps the shapes it finished. `extras=False` times the layer tables only
    (no heads, hop or step: seconds on the CPU instead of a minute, to time the layers again as a machine's speed
    moves)."""
    dev = local_device(device)
    if threads:
        torch.set_num_threads(threads)
    detected, name = detect_device_type(dev)
    dtype = profile_dtype(dev)
    grid = grid or (GPU_GRID if dev.type == "cuda" else CPU_GRID)
    samples = samples or SAMPLES
    specs = [ModelSpec.resolve(m) for m in models]
    shapes = list(dict.fromkeys(LayerShape.of(s) for s in specs))
    per_layer = len(grid.prefill_batches) * len(grid.prompt_lens) + len(grid.decode_batches) * len(grid.context_lens)
    method = (f"llmpq profile: one decoder layer with random weights of each shape, runtime forward "
              f"(QuantLinear kernels, slot KV cache, SDPA) in {str(dtype).removeprefix('torch.')}; "
              f"calls cycle through copies of the layer overflowing the last-level cache; "
              f"per point the median of {samples} samples (3 where one call takes > 0.1 s), taken "
              f"round-robin over the shape's points, each sample >= 10 ms of back-to-back calls after a "
              f"warm-up; {torch.get_num_threads()} CPU threads; models: {', '.join(models)}")
    profile = Profile(device_type=device_type or detected, device_name=name, torch=torch.__version__,
                      measured_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      method=method, tables=[])
    with tqdm(total=len(shapes) * len(bits) * per_layer * samples, desc=f"profiling on {name}",
              unit="sample") as bar:
        for k, shape in enumerate(shapes, 1):
            table = ShapeTable(shape=shape, points=profile_shape(shape, bits, grid, dev, dtype, samples, bar),
                               kernels={b: KERNEL_REVISIONS[b] for b in bits}, measured_at=profile.measured_at,
                               torch=profile.torch)
            profile = profile.model_copy(update={"tables": [*profile.tables, table]})
            if dev.type == "cuda":  # the shape's layers and cache go back before the next shape's come
                torch.cuda.empty_cache()
            if on_progress is not None:
                on_progress(profile.model_copy(update={
                    "method": f"{method}; partial: {k} of {len(shapes)} shapes, no head, hop or step yet"}))
    if not extras:
        return profile
    heads = []
    for spec in specs:
        if not any(h.hidden == spec.hidden and h.vocab == spec.vocab for h in heads):
            heads += profile_head(spec.hidden, spec.vocab, grid.decode_batches, dev, dtype)
    profile = profile.model_copy(update={
        "heads": heads, "transfer": profile_transfer(dev, dtype),
        "step_overhead": profile_step_overhead(grid.decode_batches, max(s.vocab for s in specs), dtype=dtype,
                                               device=dev)})
    if on_progress is not None:
        on_progress(profile)
    return profile


def decode_speedups(profile: Profile, batches: tuple[int, ...] = (1, 16)) -> list[dict]:
    """Per shape and decode micro-batch, at the shortest profiled context: each format's layer time against 16-bit,
    beside the memory-bandwidth bound (the ratio of weight bytes, what a purely weight-bound step would gain; a CPU's
    16-bit layers are timed in fp32, as its stages run them)."""
    float_bytes = float_bytes_on(profile.device_type)
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
                   "bits16_ms": round(base * 1e3, 4)}
            for bits in (8, 4, 3):
                if table.has(bits, "decode"):
                    bound = (sum(matrix_bytes(o, i, 16, 128, float_bytes) for o, i in shapes)
                             / sum(matrix_bytes(o, i, bits, 128, float_bytes) for o, i in shapes))
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
        lines.append(f"  {r['shape']:<24} mb {r['micro_batch']:>3} ctx {r['context']}: 16-bit {r['bits16_ms']:.3f} ms, "
                     + ", ".join(parts))
    if profile.transfer:
        t = profile.transfer
        lines.append(f"stage hand-off: {t.latency_s * 1e6:.0f} us + {t.bytes_per_s / 1e9:.2f} GB/s")
    if profile.step_overhead:
        waited = profile.step_overhead[0].stage_compute_s
        stage = f"a stage computing {waited * 1e3:.0f} ms" if waited else "a stage answering at once"
        lines.append(f"router work and ring round trip per micro-batch step, beside {stage}: "
                     + ", ".join(f"mb {p.micro_batch} {p.median_s * 1e3:.2f} ms" for p in profile.step_overhead))
    return "\n".join(lines)

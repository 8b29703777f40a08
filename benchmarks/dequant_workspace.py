"""The transient memory a GPU stage's dequantizing layers take, per weight of the block dequantized at once, against
the figures the cost model counts (catalog/kernels.yaml `dequant_workspace_bytes_per_weight`).

    python benchmarks/dequant_workspace.py --json

Runs on the CPU the ops a GPU runs per call where no kernel takes the weight as held (a layer loaded in half
precision, as a GPU stage loads it; the int4 kernel ruled out, as below compute capability 8.0), each bit-width in a
process of its own, and reads the process's peak resident memory (VmHWM) around them: the peak of the temporaries,
the dequantized block included. Prints {"bits": {b: {"measured", "catalog"}}, "max_ratio": measured / catalog}.

    python benchmarks/dequant_workspace.py --device cuda --json

On a GPU: a BLOOM-176B MLP matrix (822 Mi weights, 13 blocks), loaded as a stage loads it, one decode call after a
warm-up call; the allocator's peak beyond what was allocated before and the output, per weight of one block, and the
call's error against the float product of the weight it holds (so the half-precision scales are checked too)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHAPE = (8192, 4096)  # (out, in): a block the GPU path takes whole
GPU_SHAPE = (57344, 14336)  # BLOOM-176B's MLP up-projection


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def loaded(bits: int, shape: tuple[int, int], device: str):
    """A layer of `shape` at `bits` as a stage on `device` holds it (from its on-disk state, floats in half)."""
    import torch
    from torch import nn

    from llmpq_serve.quant import linear
    from llmpq_serve.quant.groupwise import quantize

    linear.has_int4_kernel = lambda device: False  # the path of the GPUs below the int4 kernel's compute capability
    out_f, in_f = shape
    if bits == 8:
        return linear.QuantLinear.from_linear(nn.Linear(in_f, out_f, bias=False, device=device), 8)
    gq = quantize(torch.randn(out_f, in_f, device=device), bits, 128)
    state = {k: v.half() if v.is_floating_point() else v
             for k, v in linear.QuantLinear.from_group_quant(gq, None).state(gq).items()}
    return linear.QuantLinear.from_state(state, bits, 128)


def measure(bits: int) -> float:
    """Peak bytes per weight of one call's dequantizing ops (this process's)."""
    import torch

    layer = loaded(bits, SHAPE, "cpu")
    out_f, in_f = SHAPE
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    base = _status("VmRSS")
    block = layer.qweight.to(torch.float16) if bits == 8 else layer._dequantize(0, out_f)
    assert block.dtype == torch.float16
    return (_status("VmHWM") - base) / (out_f * in_f)


def measure_gpu(bits: int, shape: tuple[int, int], device: str = "cuda") -> dict:
    """The workspace of one decode call of a `shape` layer at `bits` on a GPU, per weight of the block."""
    import torch

    from llmpq_serve.quant.linear import GPU_BLOCK_WEIGHTS

    layer = loaded(bits, shape, device)
    out_f, in_f = shape
    x = torch.randn(16, in_f, device=device, dtype=torch.float16)
    # the first call also allocates cuBLAS's workspace (32 MiB on a Hopper GPU): the process's, once, not the layer's
    layer(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y = layer(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before - y.numel() * y.element_size()
    block = min(out_f, GPU_BLOCK_WEIGHTS // in_f) * in_f
    reference = x.float() @ layer.dequantized_weight().T
    error = ((y.float() - reference).norm() / reference.norm()).item()
    return {"measured": round(peak / block, 2), "block_weights": block, "matrix_weights": out_f * in_f,
            "peak_mib": round(peak / 2**20, 1), "rel_error": round(error, 5),
            "scale_dtype": str(layer.scale.dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--bits", type=int, choices=(8, 4, 3), help=argparse.SUPPRESS)  # one, in this process
    args = parser.parse_args()
    if args.bits:
        print(measure(args.bits))
        return
    from llmpq_serve import catalog

    figures = catalog.kernel_assumptions()["dequant_workspace_bytes_per_weight"]
    result = {}
    for bits in (8, 4, 3):
        if args.device == "cuda":  # the caching allocator's own peak counts one process's tensors: no subprocess
            result[bits] = {**measure_gpu(bits, GPU_SHAPE), "catalog": figures[bits]}
            continue
        out = subprocess.run([sys.executable, __file__, "--bits", str(bits)], check=True, capture_output=True,
                             text=True, cwd=ROOT).stdout
        result[bits] = {"measured": round(float(out.split()[-1]), 2), "catalog": figures[bits]}
    report = {"shape": GPU_SHAPE if args.device == "cuda" else SHAPE, "device": args.device, "bits": result,
              "max_ratio": round(max(r["measured"] / r["catalog"] for r in result.values()), 3)}
    if args.json:
        print(json.dumps(report))
    else:
        for bits, r in result.items():
            print(f"{bits}-bit: {r['measured']:.2f} B/weight measured, {r['catalog']} counted")


if __name__ == "__main__":
    main()

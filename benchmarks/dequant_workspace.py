"""The transient memory a GPU stage's dequantizing layers take, per weight of the block dequantized at once, against
the figures the cost model counts (catalog/kernels.yaml `dequant_workspace_bytes_per_weight`).

    python benchmarks/dequant_workspace.py --json

Runs on the CPU the ops a GPU runs per call where no kernel takes the weight as held (a layer loaded in half
precision, as a GPU stage loads it; the int4 kernel ruled out, as below compute capability 8.0), each bit-width in a
process of its own, and reads the process's peak resident memory (VmHWM) around them: the peak of the temporaries,
the dequantized block included. Prints {"bits": {b: {"measured", "catalog"}}, "max_ratio": measured / catalog}."""

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


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure(bits: int) -> float:
    """Peak bytes per weight of one call's dequantizing ops (this process's)."""
    import torch
    from torch import nn

    from llmpq_serve.quant import linear
    from llmpq_serve.quant.groupwise import quantize

    linear.has_int4_kernel = lambda device: False
    out_f, in_f = SHAPE
    if bits == 8:
        layer = linear.QuantLinear.from_linear(nn.Linear(in_f, out_f, bias=False), 8)
    else:
        gq = quantize(torch.randn(out_f, in_f), bits, 128)
        state = {k: v.half() if v.is_floating_point() else v
                 for k, v in linear.QuantLinear.from_group_quant(gq, None).state(gq).items()}
        layer = linear.QuantLinear.from_state(state, bits, 128)
        del gq, state
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    base = _status("VmRSS")
    block = layer.qweight.to(torch.float16) if bits == 8 else layer._dequantize(0, out_f)
    assert block.dtype == torch.float16
    return (_status("VmHWM") - base) / (out_f * in_f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--bits", type=int, choices=(8, 4, 3), help=argparse.SUPPRESS)  # one, in this process
    args = parser.parse_args()
    if args.bits:
        print(measure(args.bits))
        return
    from llmpq_serve import catalog

    figures = catalog.kernel_assumptions()["dequant_workspace_bytes_per_weight"]
    result = {}
    for bits in (8, 4, 3):
        out = subprocess.run([sys.executable, __file__, "--bits", str(bits)], check=True, capture_output=True,
                             text=True, cwd=ROOT).stdout
        result[bits] = {"measured": round(float(out.split()[-1]), 2), "catalog": figures[bits]}
    report = {"shape": SHAPE, "bits": result,
              "max_ratio": round(max(r["measured"] / r["catalog"] for r in result.values()), 3)}
    if args.json:
        print(json.dumps(report))
    else:
        for bits, r in result.items():
            print(f"{bits}-bit: {r['measured']:.2f} B/weight measured, {r['catalog']} counted")


if __name__ == "__main__":
    main()

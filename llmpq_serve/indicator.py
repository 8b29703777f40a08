"""Per-layer, per-bit quality cost ω[layer][bits] and its normalisation.

ω is normalised so that the whole model at 3 bits costs 1.0 (and fp16 costs 0): a quality weight θ or a budget then
means the same on every model. The planner takes any table; `analytic` gives a default for planning from shapes
alone, and the calibrated indicator (computed from a checkpoint) replaces it when one is available."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from pydantic import BaseModel, Field, model_validator

from llmpq_serve.spec import ModelSpec
from llmpq_serve.validation import json_model

REFERENCE_BITS = 3


class Indicator(BaseModel):
    source: str = Field(description="where ω came from: 'analytic-default', or a calibration / file description")
    omega: list[dict[int, float]] = Field(description="per layer: bits -> raw ω (any scale)")

    @model_validator(mode="after")
    def _check(self) -> Indicator:
        if not self.omega:
            raise ValueError("indicator has no layers")
        bits = set(self.omega[0])
        if any(set(row) != bits for row in self.omega):
            raise ValueError("every layer of the indicator must list the same bit-widths")
        if REFERENCE_BITS not in bits:
            raise ValueError(f"the indicator must give ω at {REFERENCE_BITS} bits (the normalisation reference)")
        if not all(math.isfinite(v) and v >= 0 for row in self.omega for v in row.values()):
            # a NaN would make every quality comparison false, and the planner keep whatever plan it saw first
            raise ValueError("ω must be finite and non-negative")
        totals = {b: sum(row[b] for row in self.omega) for b in sorted(bits)}
        if totals[REFERENCE_BITS] <= 0:
            raise ValueError(f"ω at {REFERENCE_BITS} bits sums to 0 over the layers: it is the unit every quality "
                             "budget is measured in")
        # per layer, calibration noise may order two close bit-widths either way; over the whole model it may not
        worse = next(((lo, hi) for lo, hi in itertools.pairwise(totals) if totals[hi] > totals[lo] * (1 + 1e-6)), None)
        if worse:
            lo, hi = worse
            raise ValueError(f"ω summed over the layers is larger at {hi} bits ({totals[hi]:.4g}) than at {lo} bits "
                             f"({totals[lo]:.4g}): more bits must not lose more quality (are the bit-width keys "
                             "swapped?)")
        return self

    @property
    def layers(self) -> int:
        return len(self.omega)

    @property
    def bits(self) -> list[int]:
        return sorted(self.omega[0], reverse=True)

    def normalised(self) -> list[dict[int, float]]:
        """ω scaled so that the whole model at 3 bits sums to 1."""
        ref = sum(row[REFERENCE_BITS] for row in self.omega) or 1.0
        return [{b: v / ref for b, v in row.items()} for row in self.omega]

    def quality(self, bits_per_layer: list[int]) -> float:
        """Normalised Σω of a bit assignment (0 = lossless, 1 = everything at 3 bits); lower is better."""
        if len(bits_per_layer) != self.layers:
            raise ValueError(f"{len(bits_per_layer)} bit-widths for {self.layers} layers")
        norm = self.normalised()
        return sum(norm[i][b] for i, b in enumerate(bits_per_layer))

    def uniform_quality(self, bits: int) -> float:
        return self.quality([bits] * self.layers)

    @classmethod
    def analytic(cls, model: ModelSpec) -> Indicator:
        """Default from shapes alone: quantisation noise power of a b-bit uniform quantiser falls as 2^(-2b), and the
        first and last layers are commonly the most sensitive (up to 2x, quadratically in the distance from the
        middle). A stand-in until a calibrated indicator exists; plans made with it say so."""
        n = model.layers
        rows = []
        for layer in range(n):
            pos = 2 * layer / (n - 1) - 1 if n > 1 else 0.0
            scale = model.linear_params * (1 + pos * pos)
            rows.append({b: (0.0 if b == 16 else scale * 2.0 ** (-2 * b)) for b in (16, 8, 4, 3)})
        return cls(source="analytic-default", omega=rows)

    @classmethod
    def calibrated(cls, model, arch: str, calibration: dict, group_size: int = 128,
                   method: str = "awq") -> Indicator:
        """The LLM-PQ idea, measured: ω[l][b] is the output perturbation that quantizing layer l to b bits causes,
        the mean squared change of the layer's output on its real calibration inputs, with the weights quantized
        the way the runtime quantizes them (`method`'s search included: AWQ protects some layers much better than
        others, and a ranking from round-to-nearest error misjudges those)."""
        import copy

        import torch
        from tqdm import tqdm

        from llmpq_serve.quant.apply import dequantized_weights
        from llmpq_serve.quant.calibration import decoder_layers

        rows = []
        layers = decoder_layers(model, arch)
        with torch.no_grad():
            for i, layer in enumerate(tqdm(layers, desc="quality indicator", unit="layer", disable=len(layers) < 2)):
                calib = calibration[i]
                reference = calib.block_output(layer)
                row = {16: 0.0}
                for bits in (8, 4, 3):
                    twin = copy.deepcopy(layer)  # AWQ folds its scales into the layer it searches
                    for name, w in dequantized_weights(twin, arch, bits, method, calib, group_size).items():
                        twin.get_submodule(name).weight.data = w
                    row[bits] = (calib.block_output(twin) - reference).pow(2).mean().item()
                rows.append(row)
        return cls(source=f"calibrated: {method} layer-output perturbation on calibration text", omega=rows)

    @classmethod
    def from_json(cls, path: str | Path) -> Indicator:
        """`{"source": ..., "omega": [{"16": 0, "8": ..., "4": ..., "3": ...}, ...]}` (one entry per layer)."""
        return json_model(cls, path, "indicator file", source=f"file:{path}")

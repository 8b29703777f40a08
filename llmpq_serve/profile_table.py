"""Measured per-layer latency tables (`profiles/<TYPE>.json`) and their interpolation.

A table holds, for one decoder-layer shape, the median time of one layer at each (bits, phase, micro-batch,
sequence length) grid point. Between grid points time is interpolated piecewise-linearly in micro-batch and in
sequence length (bilinear on the grid cell): exact at the points, monotone between them when the points are, and
extrapolated linearly from the outermost cell above the grid, since layer time grows about linearly in both. Below
the grid (a prompt shorter than the shortest one timed) a time stays at the grid's edge: small calls are bound by
fixed costs (a GPU's kernel launches), and a cell's slope carried down would reach zero."""

from __future__ import annotations

import bisect
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from llmpq_serve.runtime.kernel_revisions import KERNEL_REVISIONS
from llmpq_serve.spec import ModelSpec
from llmpq_serve.validation import json_model

Phase = Literal["prefill", "decode"]


class LayerShape(BaseModel, frozen=True):
    arch: str
    hidden: int
    heads: int
    kv_heads: int
    ffn: int

    @classmethod
    def of(cls, model: ModelSpec) -> LayerShape:
        return cls(arch="gated" if model.gated_mlp else "gelu", hidden=model.hidden, heads=model.heads,
                   kv_heads=model.kv_heads, ffn=model.ffn)


class ProfilePoint(BaseModel):
    bits: int
    phase: Phase
    micro_batch: int = Field(gt=0)
    seq: int = Field(gt=0, description="prompt length (prefill) or context length (decode)")
    median_s: float = Field(ge=0)
    p10_s: float | None = None
    p90_s: float | None = None


class ShapeTable(BaseModel):
    shape: LayerShape
    points: list[ProfilePoint]
    kernels: dict[int, int] = Field(default_factory=dict, description=(
        "bit-width -> revision of the runtime's kernels it was timed with (llmpq_serve.runtime.kernel_revisions); "
        "empty in tables measured before revisions were recorded"))
    measured_at: str | None = Field(None, description="when this table was measured; None in files written before "
                                                      "tables recorded it: then the file's (see Profile)")
    torch: str | None = Field(None, description="the torch version it was measured with; None as measured_at")

    def outdated_bits(self) -> list[int]:
        """The bit-widths of this table timed with older kernels than the runtime's (all of them in a table that
        recorded none)."""
        return sorted({p.bits for p in self.points if self.kernels.get(p.bits, 0) < KERNEL_REVISIONS[p.bits]},
                      reverse=True)

    @cached_property
    def _grids(self) -> dict[tuple[int, str], tuple[list[int], list[int], dict[tuple[int, int], float]]]:
        grids: dict[tuple[int, str], tuple[list[int], list[int], dict[tuple[int, int], float]]] = {}
        for p in self.points:
            mbs, seqs, values = grids.setdefault((p.bits, p.phase), ([], [], {}))
            values[(p.micro_batch, p.seq)] = p.median_s
        for key, (mbs, seqs, values) in grids.items():
            mbs[:] = sorted({m for m, _ in values})
            seqs[:] = sorted({s for _, s in values})
            missing = [(m, s) for m in mbs for s in seqs if (m, s) not in values]
            if missing:
                raise ValueError(f"profile grid {key} is not rectangular: missing {missing[:3]}")
        return grids

    def has(self, bits: int, phase: Phase) -> bool:
        return (bits, phase) in self._grids

    def interpolate(self, bits: int, phase: Phase, micro_batch: float, seq: float) -> float:
        mbs, seqs, values = self._grids[(bits, phase)]

        def bilinear(m: float, s: float) -> float:
            m0, m1, wm = _bracket(mbs, m)
            s0, s1, ws = _bracket(seqs, s)
            low = _lerp(values[(m0, s0)], values[(m0, s1)], ws)
            high = _lerp(values[(m1, s0)], values[(m1, s1)], ws)
            return max(0.0, _lerp(low, high, wm))

        value = bilinear(micro_batch, seq)
        # Above the grid each row (column) goes on with its own outer cell's slope, and those need not agree (a noisy
        # cell's is steeper), so a time there is held at least at what the row's shorter (column's smaller) grid
        # sizes give: it never falls as the other size grows.
        if micro_batch > mbs[-1]:
            value = max([value] + [bilinear(micro_batch, s) for s in seqs if s < seq])
        if seq > seqs[-1]:
            value = max([value] + [bilinear(m, seq) for m in mbs if m < micro_batch])
        return value


def _bracket(grid: list[int], x: float) -> tuple[int, int, float]:
    """Neighbouring grid values around x and x's weight on the upper one (outside the grid: the outer cell)."""
    if len(grid) == 1:
        return grid[0], grid[0], 0.0
    i = min(max(bisect.bisect_right(grid, x), 1), len(grid) - 1)
    lo, hi = grid[i - 1], grid[i]
    return lo, hi, (x - lo) / (hi - lo)


def _lerp(v0: float, v1: float, w: float) -> float:
    """v0 at w = 0, v1 at w = 1, linear between. Above, the cell's slope goes on, but never one that makes a time
    fall as the micro-batch or the length grows: an outer cell measured sloping down (noise) would extrapolate to
    zero at large sizes, and the planner would flock there. Below, v0 (see the module's docstring)."""
    if 0 <= w <= 1:
        return v0 * (1 - w) + v1 * w
    return v1 + max(0.0, v1 - v0) * (w - 1) if w > 1 else v0


def _piecewise(points: list[tuple[int, float]], x: float) -> float | None:
    """Piecewise-linear through (x, y) points (above them: the outer segment, never falling with x; below them: the
    first y); None if none."""
    if not points:
        return None
    points = sorted(points)
    lo, hi, w = _bracket([p for p, _ in points], x)
    values = dict(points)
    return max(0.0, _lerp(values[lo], values[hi], w))


class HeadPoint(BaseModel):
    """Final norm + LM head for the last position of `micro_batch` sequences."""

    hidden: int
    vocab: int
    micro_batch: int
    median_s: float


class StepPoint(BaseModel):
    """The router's own work per micro-batch step of `micro_batch` requests (scheduling, sampling, detokenizing) and
    the step's way around the ring, beyond the stages' own time."""

    micro_batch: int
    median_s: float
    stage_compute_s: float = Field(0.0, description="how long the stand-in stage computed per step before it "
                                                    "answered (0: at once, as profiles before 2026-11-27 measured)")


class TransferFit(BaseModel):
    """Handing an activation to the next stage: seconds = latency_s + bytes / bytes_per_s, fitted to the
    measured (sizes, seconds)."""

    latency_s: float
    bytes_per_s: float
    sizes: list[int]
    seconds: list[float]


class Profile(BaseModel):
    device_type: str = Field(description="Ray accelerator_type name, e.g. T4, A100, H100, or CPU")
    device_name: str
    torch: str
    measured_at: str
    method: str = ""
    tables: list[ShapeTable]
    heads: list[HeadPoint] = Field(default_factory=list)
    transfer: TransferFit | None = None
    step_overhead: list[StepPoint] = Field(default_factory=list)

    @model_validator(mode="after")
    def _tables_know_when(self) -> Profile:
        """A table without its own date and torch (one of a file written before tables recorded them) was measured
        with the file's."""
        for t in self.tables:
            t.measured_at = t.measured_at or self.measured_at
            t.torch = t.torch or self.torch
        return self

    def head_time(self, hidden: int, vocab: int, micro_batch: float) -> float | None:
        """Piecewise-linear in micro-batch over the measured points of this head shape; None if not measured."""
        return _piecewise([(h.micro_batch, h.median_s) for h in self.heads if (h.hidden, h.vocab) == (hidden, vocab)],
                          micro_batch)

    def step_time(self, micro_batch: float) -> float | None:
        """Piecewise-linear in micro-batch over the measured step overheads; None if not measured."""
        return _piecewise([(p.micro_batch, p.median_s) for p in self.step_overhead], micro_batch)

    def table_for(self, model: ModelSpec) -> ShapeTable | None:
        shape = LayerShape.of(model)
        return next((t for t in self.tables if t.shape == shape), None)

    def keeping(self, older: Profile) -> Profile:
        """This profile plus what `older` (an earlier profile of the same device) measured and this one did not: the
        tables of other layer shapes (each keeps its own date and torch), the heads of other (hidden, vocab), and the
        hop and the step where this one has none yet (a run's partial saves), so models can be profiled one at a
        time into one file. Everything measured now wins. Another device of the same type (an H100 PCIe's tables
        beside an SXM's) is refused: the cost model reads a file's tables as timed on its `device_name`."""
        if older.device_type != self.device_type:
            raise ValueError(f"cannot merge a {older.device_type} profile into a {self.device_type} one")
        if older.device_name != self.device_name:
            raise ValueError(f"cannot merge tables measured on {older.device_name} into a profile of "
                             f"{self.device_name}")
        shapes = {t.shape for t in self.tables}
        heads = {(h.hidden, h.vocab) for h in self.heads}
        return self.model_copy(update={
            "tables": self.tables + [t for t in older.tables if t.shape not in shapes],
            "heads": self.heads + [h for h in older.heads if (h.hidden, h.vocab) not in heads],
            "transfer": self.transfer or older.transfer,
            "step_overhead": self.step_overhead or older.step_overhead})

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        return json_model(cls, path, "profile file")

    def save(self, path: str | Path) -> None:
        """Written whole or not at all: a profile cut short mid-write leaves the file as it was."""
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(self.model_dump_json(indent=1))
        partial.replace(path)

"""The Plan: the only thing that passes from the planner to the runtime."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pydantic import BaseModel, Field, model_validator

from llmpq_serve.config import MAX_THETA
from llmpq_serve.costmodel import SUPPORTED_BITS
from llmpq_serve.spec import ClusterSpec, DeviceSpec, ModelSpec, Workload

GiB = 1024**3


class QualityTarget(BaseModel):
    """θ weighs normalised quality against normalised latency (objective = latency / reference latency + θ·Σω̂);
    `budget` bounds Σω̂ (1.0 = the whole model at 3 bits, 0.25 about the whole model at AWQ-4). Either or both."""

    theta: float = Field(default=0.0, ge=0, le=MAX_THETA, allow_inf_nan=False)
    budget: float | None = Field(default=None, ge=0)
    label: str = ""


class StagePlan(BaseModel):
    device: DeviceSpec
    layers: tuple[int, int] = Field(description="decoder layers [start, end)")
    bits: list[int] = Field(description="bit-width of each layer of the stage, in order")

    @model_validator(mode="after")
    def _bits_match(self) -> StagePlan:
        start, end = self.layers
        if not 0 <= start < end or len(self.bits) != end - start:
            raise ValueError(f"stage on {self.device.id}: layers {self.layers} and {len(self.bits)} bit-widths")
        if any(b not in SUPPORTED_BITS for b in self.bits):
            raise ValueError(f"stage on {self.device.id}: bit-widths must be among {SUPPORTED_BITS}, got "
                             f"{sorted(set(self.bits) - set(SUPPORTED_BITS))}")
        return self


class StagePrediction(BaseModel):
    prefill_s: float = Field(description="one prefill micro-batch through this stage (compute or send, larger)")
    decode_s: float = Field(description="one decode micro-batch step through this stage")
    memory_bytes: float
    memory_limit_bytes: float


class Predicted(BaseModel):
    stages: list[StagePrediction]
    prefill_s: float = Field(description="prefill of the whole batch through the pipeline")
    decode_s: float = Field(description="all decode steps of the whole batch")
    latency_s: float
    tokens_per_s: float
    quality: float = Field(description="normalised Σω of the plan's bits, lower is better")


class SolverStats(BaseModel):
    method: str
    status: str = Field(description="optimal (gap <= 0.01%) | near-optimal (gap within the tolerance asked) | gap "
                              "(time ran out first) | heuristic (no bound) | feasible")
    objective: float
    lower_bound: float | None = None
    gap: float | None = Field(default=None, description="(objective - lower bound) / objective")
    wall_s: float
    solver: str = ""
    notes: list[str] = []


class Plan(BaseModel):
    model: ModelSpec
    cluster: ClusterSpec
    workload: Workload
    quality: QualityTarget
    indicator: str
    latency_sources: dict[str, str] = Field(
        description="GPU type -> 'profile' (naming the bit-widths a table timed with older kernels than the "
                    "runtime's, if any), 'roofline' or 'roofline, efficiencies fitted on <types>' (naming the same of the "
                    "tables fitted on)")
    stages: list[StagePlan]
    prefill_micro_batch: int = Field(gt=0)
    decode_micro_batch: int = Field(gt=0)
    predicted: Predicted
    solver: SolverStats

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        """What the solvers guarantee, checked again for a plan read from a file."""
        ids = [s.device.id for s in self.stages]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a device holds several stages: {ids}")
        if unknown := set(ids) - {d.id for d in self.cluster.devices}:
            raise ValueError(f"stages on devices the cluster does not have: {sorted(unknown)}")
        if len(self.predicted.stages) != len(self.stages):
            raise ValueError(f"{len(self.stages)} stages but {len(self.predicted.stages)} stage predictions")
        expected = 0
        for stage in self.stages:
            if stage.layers[0] != expected:
                raise ValueError(f"stage on {stage.device.id} starts at layer {stage.layers[0]}, expected {expected}")
            expected = stage.layers[1]
        if expected != self.model.layers:
            raise ValueError(f"stages cover {expected} of {self.model.layers} layers")
        return self

    @property
    def bits(self) -> list[int]:
        return [b for s in self.stages for b in s.bits]

    def to_json(self, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.model_validate_json(text)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_json(Path(path).read_text())

    def table(self) -> str:
        p = self.predicted
        head = (f"model {self.model.name} ({self.model.layers} layers) on {self.cluster.summary()}  "
                f"workload batch {self.workload.batch_size} x prompt {self.workload.prompt_len} "
                f"+ {self.workload.gen_len} tokens\n"
                f"micro-batch: prefill {self.prefill_micro_batch}, decode {self.decode_micro_batch}   "
                f"indicator: {self.indicator}   latency: "
                + "; ".join(f"{g} {s}" for g, s in self.latency_sources.items()) + "\n")
        rows = [("stage", "device", "layers", "bits", "prefill ms", "decode ms", "memory GiB")]
        for i, (s, pred) in enumerate(zip(self.stages, p.stages)):
            hist = Counter(s.bits)
            bits = " ".join(f"{b}b:{hist[b]}" for b in sorted(hist, reverse=True))
            rows.append((str(i), s.device.id, f"{s.layers[0]}-{s.layers[1] - 1}", bits, f"{pred.prefill_s * 1e3:.1f}",
                         f"{pred.decode_s * 1e3:.2f}",
                         f"{pred.memory_bytes / GiB:.1f}/{pred.memory_limit_bytes / GiB:.1f}"))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
        sv = self.solver
        gap = f", gap {sv.gap:.2%}" if sv.gap is not None else ""
        tail = (f"\npredicted: prefill {p.prefill_s:.2f} s, decode {p.decode_s:.2f} s, latency {p.latency_s:.2f} s, "
                f"{p.tokens_per_s:.1f} tokens/s, quality {p.quality:.4f}\n"
                f"solver: {sv.method} {sv.status} ({sv.solver}) objective {sv.objective:.4f}{gap}, {sv.wall_s:.2f} s")
        # the time limit's notes say how far to trust the plan (one laid out when time ran out proves nothing)
        tail += "".join(f"\nnote: {n}" for n in dict.fromkeys(sv.notes))
        return head + "\n".join(lines) + tail

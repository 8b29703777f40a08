"""A planning problem and the exact evaluation of a candidate plan under the cost model.

Every solver (ILP, relaxation, baselines) optimises the same quantities that `Problem.evaluate` computes, and every
plan's reported prediction comes from `evaluate`, so methods are compared on one yardstick."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from llmpq_serve.config import NAMED_TARGETS
from llmpq_serve.costmodel import SUPPORTED_BITS, CostModel, Phase
from llmpq_serve.indicator import Indicator
from llmpq_serve.planner.plan import Predicted, QualityTarget, StagePrediction
from llmpq_serve.spec import ClusterSpec, DeviceSpec, ModelSpec, Workload, slot_count

GiB = 1024**3


class InfeasibleError(ValueError):
    """No plan fits; the message names the device and how much memory it lacks."""


@dataclass(frozen=True)
class DeviceClass:
    """Interchangeable devices: same GPU type on the same node."""

    node: str
    gpu: str
    devices: tuple[DeviceSpec, ...]

    @property
    def label(self) -> str:
        return f"{self.gpu}@{self.node}"


class Problem:
    def __init__(self, model: ModelSpec, cluster: ClusterSpec, workload: Workload, *,
                 cost: CostModel | None = None, indicator: Indicator | None = None,
                 quality: QualityTarget | None = None, bits: tuple[int, ...] = SUPPORTED_BITS,
                 context: int | None = None):
        """`context`: the tokens every request's KV-cache slot holds, as the runtime allocates them up front (a
        server's `max_context`); by default the workload's prompt + output."""
        if any(b not in SUPPORTED_BITS for b in bits):
            raise ValueError(f"bit-widths must be among {SUPPORTED_BITS}, got {bits}")
        self.model, self.cluster, self.workload = model, cluster, workload
        self.cost = cost or CostModel(model)
        self.indicator = indicator or Indicator.analytic(model)
        if self.indicator.layers != model.layers:
            raise ValueError(f"indicator has {self.indicator.layers} layers, model {model.layers}")
        if missing := sorted(set(bits) - set(self.indicator.bits), reverse=True):
            raise ValueError(f"the indicator gives no ω at {missing} bits; give them, or plan with bits "
                             f"{sorted(set(bits) & set(self.indicator.bits), reverse=True)}")
        self.quality = quality or QualityTarget()
        self.bits = tuple(sorted(bits, reverse=True))
        self.omega = self.indicator.normalised()
        self._times: dict[tuple[str, int, str, int], float] = {}
        self._best_sends: dict[tuple[str, str, int], float] = {}
        self._workspace: dict[str, float] = {}
        if workload.max_len > model.max_pos:
            raise ValueError(f"prompt {workload.prompt_len} + output {workload.gen_len} tokens exceed the model's "
                             f"context of {model.max_pos}")
        self.context = context or workload.max_len
        if not workload.max_len <= self.context <= model.max_pos:
            raise ValueError(f"a context of {self.context} tokens must hold the workload's prompt {workload.prompt_len} "
                             f"+ output {workload.gen_len} tokens and stay within the model's {model.max_pos}")

    def with_target(self, theta: float | None = None, budget: float | None = None,
                    named: str | None = None) -> Problem:
        """Under θ and/or a budget; `named` (fp16, int8, awq4, awq3) is the budget "no worse than the whole model
        in that format". With neither, θ = 1."""
        if named is not None:
            budget = self.indicator.uniform_quality(NAMED_TARGETS[named])
        label = f"no worse than the whole model at {named}" if named else ""
        if theta is None and budget is None:
            theta = 1.0
        return self.with_quality(QualityTarget(theta=theta or 0.0, budget=budget, label=label))

    def with_quality(self, quality: QualityTarget) -> Problem:
        """The same problem under another quality target (cost tables are shared, not recomputed)."""
        other = object.__new__(Problem)
        other.__dict__.update(self.__dict__)
        other.quality = quality
        other.__dict__.pop("reference_latency", None)
        return other

    # ---- structure -----------------------------------------------------------------------------------------------
    @cached_property
    def classes(self) -> list[DeviceClass]:
        groups: dict[tuple[str, str], list[DeviceSpec]] = {}
        for d in self.cluster.devices:
            groups.setdefault((d.node, d.gpu), []).append(d)
        return [DeviceClass(node, gpu, tuple(devs)) for (node, gpu), devs in groups.items()]

    @property
    def n_devices(self) -> int:
        return len(self.cluster.devices)

    @property
    def decode_context(self) -> int:
        """Decode is costed at the average context length over the generation (as LLM-PQ does)."""
        return self.workload.prompt_len + self.workload.gen_len // 2

    def micro_batch_candidates(self) -> list[int]:
        """Divisors of the batch, plus LLM-PQ's decode choice of one micro-batch per device."""
        b = self.workload.batch_size
        return sorted({m for m in range(1, b + 1) if b % m == 0} | {math.ceil(b / self.n_devices)})

    # ---- per-layer and per-stage costs (cached: the solvers ask for the same numbers many times) -----------------
    def layer_time(self, gpu: str, bits: int, phase: Phase, micro_batch: int) -> float:
        key = (gpu, bits, phase, micro_batch)
        if key not in self._times:
            seq = self.workload.prompt_len if phase == "prefill" else self.decode_context
            spec = self.cluster_gpu(gpu)
            self._times[key] = self.cost.layer_time(spec, bits, phase, micro_batch, seq)
        return self._times[key]

    def cluster_gpu(self, gpu: str):
        return next(d.spec for d in self.cluster.devices if d.gpu == gpu)

    def layer_memory(self, bits: int, mb_decode: int | None = None) -> float:
        """Weights and KV cache of one layer. The runtime holds the cache in whole groups of `mb_decode` slots, so a
        micro-batch that does not divide the batch holds more; without one, the batch's own slots (a lower bound)."""
        slots = self.workload.batch_size if mb_decode is None else slot_count(self.workload.batch_size, mb_decode)
        return self.cost.layer_weight_bytes(bits) + self.cost.layer_kv_bytes(slots, self.context)

    def stage_fixed_time(self, gpu: str, phase: Phase, micro_batch: int, first: bool, last: bool) -> float:
        spec, seq = self.cluster_gpu(gpu), self.workload.prompt_len
        t = self.cost.embedding_time(spec, phase, micro_batch, seq) if first else 0.0
        if last:
            t += self.cost.head_time(spec, micro_batch) + self.cost.step_overhead(spec, micro_batch)
        return t

    def stage_fixed_memory(self, mb_prefill: int, mb_decode: int, first: bool, last: bool) -> float:
        w = self.workload
        act = max(self.cost.activation_peak_bytes("prefill", mb_prefill, w.prompt_len, last),
                  self.cost.activation_peak_bytes("decode", mb_decode, self.context, last))
        return act + (self.cost.embedding_bytes() if first else 0) + (self.cost.head_bytes() if last else 0)

    def stage_workspace(self, gpu: str) -> float:
        """The dequantizing workspace of a stage on `gpu` (CostModel.dequant_workspace_bytes), the most of the
        problem's bit-widths, whatever bits the stage's layers get: a binary per stage that charged it only where
        some layer needed it made the MILP up to 30x slower on the paper's clusters, for at most ~400 MiB a stage
        (6 bytes a weight of a block of 64 Mi)."""
        if gpu not in self._workspace:
            spec = self.cluster_gpu(gpu)
            self._workspace[gpu] = max((self.cost.dequant_workspace_bytes(spec, b) for b in self.bits), default=0)
        return self._workspace[gpu]

    def usable_memory(self, gpu: str) -> float:
        return self.cost.usable_memory(self.cluster_gpu(gpu))

    def send_time(self, src: DeviceSpec, dst: DeviceSpec, phase: Phase, micro_batch: int) -> float:
        seq = self.workload.prompt_len
        return self.cost.transfer_time(src, dst, self.cluster.inter_node_gbs, phase, micro_batch, seq)

    def best_send_time(self, src: DeviceSpec, phase: Phase, micro_batch: int) -> float:
        """Lower bound on src's send time to whichever device follows it."""
        key = (src.id, phase, micro_batch)
        if key not in self._best_sends:
            others = [d for d in self.cluster.devices if d.id != src.id]
            self._best_sends[key] = min((self.send_time(src, d, phase, micro_batch) for d in others), default=0.0)
        return self._best_sends[key]

    # ---- pipeline timing -----------------------------------------------------------------------------------------
    def pipeline_latency(self, prefill_stage_s: list[float], decode_stage_s: list[float], mb_prefill: int,
                         mb_decode: int) -> tuple[float, float]:
        """(prefill s, decode s) of the batch. Prefill: the micro-batches flow through the chain once, paced by the
        slowest stage. Decode: each of the gen_len-1 steps needs every micro-batch to pass the whole chain; a step
        takes the longer of one micro-batch's round trip and the slowest stage's work on all micro-batches. The early
        decode steps (see `early_decode_steps`) each hold the slowest stage once more."""
        w = self.workload
        k_p = math.ceil(w.batch_size / mb_prefill)
        k_d = math.ceil(w.batch_size / mb_decode)
        prefill = sum(prefill_stage_s) + (k_p - 1) * max(prefill_stage_s)
        step = max(sum(decode_stage_s), k_d * max(decode_stage_s))
        early = early_decode_steps(w.batch_size, mb_prefill, mb_decode) * max(decode_stage_s)
        return prefill, (w.gen_len - 1) * step + early

    @cached_property
    def reference_latency(self) -> float:
        """Normalises latency in the objective: every device in cluster order, an even split, all fp16, prefill
        micro-batch 1, decode micro-batch batch/devices, memory ignored. Method-independent, so θ means the same
        for all methods on one problem."""
        devices = self.cluster.devices
        sizes = even_split(self.model.layers, len(devices))
        pred, _ = self.evaluate(devices, [[16] * n for n in sizes], 1,
                                math.ceil(self.workload.batch_size / len(devices)))
        return pred.latency_s

    def objective(self, latency_s: float, quality: float) -> float:
        return latency_s / self.reference_latency + self.quality.theta * quality

    def evaluate(self, devices: list[DeviceSpec], bits: list[list[int]], mb_prefill: int,
                 mb_decode: int) -> tuple[Predicted, list[tuple[DeviceSpec, float]]]:
        """Prediction for stages on `devices` (in order) holding `bits` (one list per stage, consecutive layers),
        and the devices whose memory it exceeds, with the bytes missing."""
        n = len(devices)
        stages: list[StagePrediction] = []
        over: list[tuple[DeviceSpec, float]] = []
        for j, (dev, stage_bits) in enumerate(zip(devices, bits)):
            first, last = j == 0, j == n - 1
            t = {}
            for phase, mb in (("prefill", mb_prefill), ("decode", mb_decode)):
                compute = sum(self.layer_time(dev.gpu, b, phase, mb) for b in stage_bits)
                compute += self.stage_fixed_time(dev.gpu, phase, mb, first, last)
                send = 0.0 if last else self.send_time(dev, devices[j + 1], phase, mb)
                t[phase] = max(compute, send)  # sends overlap compute of the next micro-batch
            mem = sum(self.layer_memory(b, mb_decode) for b in stage_bits)
            mem += self.stage_fixed_memory(mb_prefill, mb_decode, first, last)
            mem += self.stage_workspace(dev.gpu)
            limit = self.usable_memory(dev.gpu)
            if mem > limit:
                over.append((dev, mem - limit))
            stages.append(StagePrediction(prefill_s=t["prefill"], decode_s=t["decode"], memory_bytes=mem,
                                          memory_limit_bytes=limit))
        prefill, decode = self.pipeline_latency([s.prefill_s for s in stages], [s.decode_s for s in stages],
                                                mb_prefill, mb_decode)
        latency = prefill + decode
        w = self.workload
        quality = self.indicator.quality([b for stage_bits in bits for b in stage_bits])
        return Predicted(stages=stages, prefill_s=prefill, decode_s=decode, latency_s=latency,
                         tokens_per_s=w.batch_size * w.gen_len / latency, quality=quality), over


def early_decode_steps(batch: int, mb_prefill: int, mb_decode: int) -> int:
    """Decode micro-batches that run while the batch's later prefills still wait: the scheduler lets a request decode
    as soon as its own prefill is done, so after the i-th of k_p prefill micro-batches every decode group holding one
    of its first i * mb_prefill requests steps once before the next prefill gets through (exactly so on one stage).
    On the GPU stack of the fidelity benchmark 20 of 74 decode micro-batches were such steps."""
    k_p, k_d = math.ceil(batch / mb_prefill), math.ceil(batch / mb_decode)
    return sum(min(math.ceil(i * mb_prefill / mb_decode), k_d) for i in range(1, k_p))


def even_split(layers: int, parts: int) -> list[int]:
    """Layer counts of an even split, the first stages taking the remainder."""
    base, extra = divmod(layers, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]

"""Latency, memory and transfer cost of a pipeline stage: what the planner optimises.

Time of one decoder layer comes from a measured table (profiles/<TYPE>.json) when one exists for the device type and
the model's layer shape, and from a roofline over the GPU catalog otherwise, scaled, for a GPU, by how far the
measured GPU tables that do exist sit from the roofline at the same bits and phase (the median ratio over all their
points): measured kernels reach a different fraction of peak at each bit-width than any fixed assumption. Memory
counts weights at their bit-width (packed words, scales, zero points), the KV cache of every request of the batch at
full length, the peak activations of the largest micro-batch, and the runtime's fixed overhead."""

from __future__ import annotations

import math
import statistics
from functools import cache
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, Field

from llmpq_serve import catalog
from llmpq_serve.profile_table import Profile, ShapeTable
from llmpq_serve.spec import DeviceSpec, GPUSpec, ModelSpec

Phase = Literal["prefill", "decode"]
SUPPORTED_BITS = (16, 8, 4, 3)
GiB = 1024**3
MiB = 1024**2
DEFAULT_PROFILES = Path(__file__).resolve().parent.parent / "profiles"


class CostConfig(BaseModel):
    # The LLM-PQ authors' memory model: 0.95 of capacity minus 1930 MiB of CUDA context and framework temporaries.
    memory_fraction: float = Field(default=0.95, gt=0, le=1)
    runtime_overhead_mib: float = Field(default=1930, ge=0)
    kv_bytes: int = Field(default=2, gt=0, description="bytes per KV-cache element (fp16)")
    act_bytes: int = Field(default=2, gt=0, description="bytes per activation element (fp16)")
    float_bytes: int = Field(default=2, gt=0, description="bytes per float weight, scale and zero (fp16 on GPU; 4 for a "
                                                    "CPU runtime in fp32)")
    intra_node_latency_s: float = 10e-6
    inter_node_latency_s: float = 50e-6
    profiles_dir: Path | None = DEFAULT_PROFILES


@cache
def _load_profile(path: Path, mtime: float) -> Profile:
    return Profile.load(path)


def profile_gpu(profile: Profile) -> GPUSpec | None:
    """The catalog GPU a profile was measured on (see gpu_named)."""
    return gpu_named(profile.device_type, profile.device_name)


def gpu_named(ray_type: str, device_name: str) -> GPUSpec | None:
    """The catalog GPU of a device of `ray_type` called `device_name` (CUDA's name): of the type's variants, PCIe or
    not as the name says, the one whose name's parts it shares most ("NVIDIA A100-SXM4-40GB": A100, SXM4, 40GB);
    None for a CPU or a type the catalog lacks."""
    names = catalog.gpus_for_ray_type(ray_type)
    if not names or ray_type == "CPU":
        return None
    device = device_name.upper()
    pcie = [n for n in names if "PCIE" in n.upper()]
    other = [n for n in names if n not in pcie]
    pick = pcie if "PCIE" in device and pcie else other or pcie
    return GPUSpec.from_catalog(max(reversed(pick), key=lambda n: sum(part in device for part in n.upper().split("-"))))


def int4_kernel_on(gpu: GPUSpec) -> bool:
    """Whether torch's int4 kernel takes a 4-bit weight as held on `gpu` (the CPU, and GPUs from
    `int4_kernel_min_sm`, as quant/linear.py decides at run time); elsewhere it is dequantized at each call."""
    return gpu.ray_type == "CPU" or gpu.sm >= catalog.kernel_assumptions()["int4_kernel_min_sm"]


def float_bytes_on(ray_type: str | None, gpu_bytes: int = 2) -> int:
    """Bytes of a float as a stage on that device type computes in: fp32 on a CPU (runtime/shard.py's
    runtime_dtype), `gpu_bytes` (half precision) on a GPU."""
    return 4 if ray_type == "CPU" else gpu_bytes


def same_speed(a: GPUSpec, b: GPUSpec) -> bool:
    return (a.mem_bw_gbs, a.fp16_tflops, a.int8_tops) == (b.mem_bw_gbs, b.fp16_tflops, b.int8_tops)


class FittedScales(NamedTuple):
    """Roofline corrections fitted on the measured GPU tables of a folder."""

    scales: dict[tuple[int, str], float]  # (bits, phase) -> median of measured / roofline over every point
    fitted_on: tuple[str, ...]  # the GPU types of the tables
    outdated_bits: tuple[int, ...]  # bit-widths with points timed with older kernels than the runtime's


@cache
def _fitted_scales(profiles_dir: Path, stamp: tuple) -> FittedScales:
    """Points timed with older kernels are fitted on too, and named in the plan's latency source: for another GPU
    type, many shapes say more than one shape timed with the newest kernels (the revisions so far changed the
    attention kernel and the 3-bit layout, not the weight reads that bound a 16/8/4-bit layer there). `stamp` (file
    names and mtimes) makes an edited folder a new cache entry."""
    ratios: dict[tuple[int, str], list[float]] = {}
    fitted_on: list[str] = []
    outdated: set[int] = set()
    for path in sorted(profiles_dir.glob("*.json")):
        profile = _load_profile(path, path.stat().st_mtime)
        gpu = profile_gpu(profile)
        # only the files the cost model reads (<TYPE>.json): a quick grid's or a copy's tables are not the device's
        if gpu is None or path.stem != profile.device_type:
            continue
        fitted_on.append(profile.device_type)
        for table in profile.tables:
            shape = table.shape
            outdated.update(table.outdated_bits())
            spec = ModelSpec(name=f"profiled-{shape.hidden}", arch="llama" if shape.arch == "gated" else "opt",
                             layers=1, hidden=shape.hidden, heads=shape.heads, kv_heads=shape.kv_heads, ffn=shape.ffn,
                             vocab=32000, max_pos=4096)
            roofline = CostModel(spec, CostConfig(profiles_dir=None))
            for p in table.points:
                predicted = roofline.roofline_layer_time(gpu, p.bits, p.phase, p.micro_batch, p.seq)
                ratios.setdefault((p.bits, p.phase), []).append(p.median_s / predicted)
    return FittedScales({k: statistics.median(v) for k, v in ratios.items()}, tuple(fitted_on),
                        tuple(sorted(outdated, reverse=True)))


def _older_points(bits: list[int] | tuple[int, ...]) -> str:
    return f"{'/'.join(map(str, bits))}-bit points timed with older kernels than the runtime's"


def packed_words(n: int, bits: int) -> int:
    """32-bit words holding n values packed densely at `bits` (compressed-tensors' layout: values may straddle
    word boundaries, so 3-bit costs exactly 3 bits)."""
    return math.ceil(n * bits / 32)


def group_size_for(in_features: int, preferred: int) -> int:
    """The preferred group size, halved until it divides the input dimension (small demo models need it)."""
    g = preferred
    while g > 1 and in_features % g:
        g //= 2
    return g


def matrix_bytes(out_f: int, in_f: int, bits: int, group_size: int, float_bytes: int = 2) -> int:
    """Bytes one linear layer's weight holds in memory at `bits`, as the runtime keeps it: 16-bit weights as floats
    of `float_bytes` (fp16 on GPU, fp32 on CPU); int8 with one float scale per output row; 4/3-bit packed densely
    with a float scale and a float zero per group of each row (the layout the weight-only int4 kernels take)."""
    if bits == 16:
        return out_f * in_f * float_bytes
    if bits == 8:
        return out_f * in_f + out_f * float_bytes
    groups = in_f // group_size_for(in_f, group_size)
    return out_f * packed_words(in_f, bits) * 4 + out_f * groups * 2 * float_bytes


class CostModel:
    def __init__(self, model: ModelSpec, config: CostConfig | None = None):
        self.model = model
        self.config = config or CostConfig()
        self.kernels = catalog.kernel_assumptions()

    # ---- memory --------------------------------------------------------------------------------------------------
    def layer_weight_bytes(self, bits: int) -> int:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bit-width {bits}; supported: {SUPPORTED_BITS}")
        g = self.kernels["group_size"]
        fb = self.config.float_bytes
        linear = sum(matrix_bytes(o, i, bits, g, fb) for o, i in self.model.linear_shapes())
        return linear + self.model.layer_extra_params * fb

    def layer_kv_bytes(self, batch: int, max_len: int) -> int:
        """K and V of one layer for `batch` requests at `max_len` tokens each."""
        return 2 * batch * max_len * self.model.kv_dim * self.config.kv_bytes

    def activation_peak_bytes(self, phase: Phase, micro_batch: int, seq: int, last_stage: bool) -> int:
        """Largest live activation of a micro-batch: hidden states, the MLP intermediate, eager attention scores,
        and on the last stage the fp32 logits of the last position."""
        m, a = self.model, self.config.act_bytes
        tokens = micro_batch * (seq if phase == "prefill" else 1)
        scores = micro_batch * m.heads * (seq if phase == "prefill" else 1) * seq * a
        hidden = tokens * (4 * m.hidden + 2 * m.ffn) * a
        logits = micro_batch * m.vocab * 4 if last_stage else 0
        return hidden + scores + logits

    def dequant_workspace_bytes(self, gpu: GPUSpec, bits: int) -> int:
        """Transient memory of a stage that holds layers at `bits` on `gpu`: the largest block of a matrix's rows it
        dequantizes at once, where no kernel takes the weight as held (see kernels.yaml)."""
        k = self.kernels
        if gpu.ray_type == "CPU" or (bits == 4 and int4_kernel_on(gpu)):
            return 0
        block = max(min(o, max(1, k["gpu_dequant_block_weights"] // i)) * i for o, i in self.model.linear_shapes())
        return k["dequant_workspace_bytes_per_weight"].get(bits, 0) * block

    def embedding_bytes(self) -> int:
        return self.model.embedding_params * self.config.float_bytes

    def head_bytes(self) -> int:
        return self.model.head_params * self.config.float_bytes

    def usable_memory(self, gpu: GPUSpec) -> float:
        c = self.config
        return gpu.memory_gib * GiB * c.memory_fraction - c.runtime_overhead_mib * MiB

    # ---- latency -------------------------------------------------------------------------------------------------
    def profile(self, gpu: GPUSpec) -> Profile | None:
        if self.config.profiles_dir is None or gpu.ray_type is None:
            return None
        path = Path(self.config.profiles_dir) / f"{gpu.ray_type}.json"
        if not path.is_file():
            return None
        return _load_profile(path, path.stat().st_mtime)

    def other_variant(self, gpu: GPUSpec) -> GPUSpec | None:
        """The GPU that `gpu`'s profile was measured on, where it is another variant of its type at other speeds
        (an H100 PCIe, 2 TB/s, timed by a table taken on an SXM one, 3.35 TB/s): its times are then scaled by the
        two variants' rooflines at each point."""
        profile = self.profile(gpu)
        measured = profile_gpu(profile) if profile is not None else None
        return measured if measured is not None and not same_speed(measured, gpu) else None

    def profile_table(self, gpu: GPUSpec) -> ShapeTable | None:
        profile = self.profile(gpu)
        return None if profile is None else profile.table_for(self.model)

    def fitted_scales(self, gpu: GPUSpec) -> FittedScales:
        """Roofline corrections fitted on the measured GPU tables (none for a CPU device or without profiles)."""
        folder = self.config.profiles_dir
        if folder is None or gpu.ray_type == "CPU" or not Path(folder).is_dir():
            return FittedScales({}, (), ())
        stamp = tuple((p.name, p.stat().st_mtime) for p in sorted(Path(folder).glob("*.json")))
        return _fitted_scales(Path(folder), stamp)

    def latency_source(self, gpu: GPUSpec) -> str:
        """What layer times of `gpu` come from, as the plan reports it; for a table, the bit-widths it timed with
        older kernels than the runtime's."""
        table = self.profile_table(gpu)
        if table is None:
            return self._fitted_source(gpu)
        measured = self.other_variant(gpu)
        source = "profile" if measured is None else f"profile of {measured.name}, scaled by the roofline"
        outdated = table.outdated_bits()
        if outdated:
            source += (f", its {_older_points(outdated)} (re-measure: `llmpq profile --model {self.model.name}` on "
                       "that GPU)")
        missing = [b for b in sorted(self.kernels["bits"], reverse=True)
                   if not (table.has(b, "prefill") and table.has(b, "decode"))]
        if missing:
            source += f"; {'/'.join(map(str, missing))}-bit layers, which it lacks: {self._fitted_source(gpu)}"
        return source

    def _fitted_source(self, gpu: GPUSpec) -> str:
        fit = self.fitted_scales(gpu)
        if not fit.scales:
            return "roofline"
        source = f"roofline, efficiencies fitted on {'+'.join(fit.fitted_on)}"
        if fit.outdated_bits:
            source += f" (their {_older_points(fit.outdated_bits)})"
        return source

    def layer_time(self, gpu: GPUSpec, bits: int, phase: Phase, micro_batch: int, seq: int) -> float:
        """Seconds for one decoder layer: prefill of `seq` prompt tokens, or one decode step at context `seq`."""
        table = self.profile_table(gpu)
        if table is not None and table.has(bits, phase):
            measured = self.other_variant(gpu)
            scale = 1.0 if measured is None else (self.roofline_layer_time(gpu, bits, phase, micro_batch, seq)
                                                  / self.roofline_layer_time(measured, bits, phase, micro_batch, seq))
            return scale * table.interpolate(bits, phase, micro_batch, seq)
        # no table, or one without these bits (timed before the runtime had them, or with `bits` left out)
        scale = self.fitted_scales(gpu).scales.get((self.kernel_bits(gpu, bits), phase), 1.0)
        return scale * self.roofline_layer_time(gpu, bits, phase, micro_batch, seq)

    @staticmethod
    def kernel_bits(gpu: GPUSpec, bits: int) -> int:
        """The bit-width whose kernel runs a `bits` layer on `gpu`: below compute capability 8.0 (T4, V100) torch has
        no int4 kernel, and 4-bit weights are dequantized at each call as 3-bit ones are (`quant/linear.py`), so the
        efficiency fitted on the 3-bit path's measurements scales them. The bare roofline keeps the fused kernels'
        efficiencies of `kernels.yaml` (the paper's kind of cost model) for every GPU."""
        return 3 if bits == 4 and not int4_kernel_on(gpu) else bits

    def roofline_layer_time(self, gpu: GPUSpec, bits: int, phase: Phase, micro_batch: int, seq: int) -> float:
        m, k, a = self.model, self.kernels, self.config.act_bytes
        factor = k["bits"][bits]
        if phase == "prefill":
            tokens = micro_batch * seq
            flops = 2 * tokens * m.linear_params + 4 * micro_batch * seq * seq * m.hidden
            act = tokens * (10 * m.hidden + 3 * m.ffn) * a + 2 * micro_batch * m.heads * seq * seq * a
            kv = tokens * 2 * m.kv_dim * self.config.kv_bytes
        else:
            tokens = micro_batch
            flops = 2 * tokens * m.linear_params + 4 * micro_batch * seq * m.hidden
            act = tokens * (10 * m.hidden + 3 * m.ffn) * a
            kv = micro_batch * seq * 2 * m.kv_dim * self.config.kv_bytes
        moved = self.layer_weight_bytes(bits) + act + kv
        compute_s = flops / (gpu.fp16_tflops * 1e12 * k["compute_eff"] * factor["compute"])
        memory_s = moved / (gpu.mem_bw_gbs * 1e9 * k["bandwidth_eff"] * factor["bandwidth"])
        return max(compute_s, memory_s) + k["launch_us"] * 1e-6

    def embedding_time(self, gpu: GPUSpec, phase: Phase, micro_batch: int, seq: int) -> float:
        tokens = micro_batch * (seq if phase == "prefill" else 1)
        moved = 2 * tokens * self.model.hidden * self.config.act_bytes
        return moved / (gpu.mem_bw_gbs * 1e9 * self.kernels["bandwidth_eff"])

    def head_time(self, gpu: GPUSpec, micro_batch: int) -> float:
        """Final norm + LM head for the last position of each sequence (prefill and decode alike) and the logits'
        copy to the host: measured when the device's profile has this head, else the roofline."""
        profile = self.profile(gpu)
        timed = profile.head_time(self.model.hidden, self.model.vocab, micro_batch) if profile else None
        if timed is None:
            return self.roofline_head_time(gpu, micro_batch)
        measured = self.other_variant(gpu)
        if measured is None:
            return timed
        return timed * self.roofline_head_time(gpu, micro_batch) / self.roofline_head_time(measured, micro_batch)

    def roofline_head_time(self, gpu: GPUSpec, micro_batch: int) -> float:
        k = self.kernels
        flops = 2 * micro_batch * self.model.head_params
        compute_s = flops / (gpu.fp16_tflops * 1e12 * k["compute_eff"])
        memory_s = self.head_bytes() / (gpu.mem_bw_gbs * 1e9 * k["bandwidth_eff"])
        return max(compute_s, memory_s) + k["launch_us"] * 1e-6

    def step_overhead(self, gpu: GPUSpec, micro_batch: int) -> float:
        """The router's own work per micro-batch (scheduling, sampling, detokenizing) and the micro-batch's way over
        the stage ring to the first stage and back from the last, as measured beside this device's profile (with
        its stage computing before it answers, as stages keep the router waiting); 0 without one. It comes after the
        last stage, and the router handles one micro-batch at a time, so the planner counts it as part of the last
        stage."""
        profile = self.profile(gpu)
        return (profile.step_time(micro_batch) if profile else None) or 0.0

    # ---- transfer ------------------------------------------------------------------------------------------------
    def activation_bytes(self, phase: Phase, micro_batch: int, seq: int, src: GPUSpec | None = None) -> int:
        """What a micro-batch's hop carries from a stage on `src`: its hidden states in the stage's runtime type,
        fp32 from a CPU stage (runtime/shard.py's runtime_dtype)."""
        tokens = micro_batch * (seq if phase == "prefill" else 1)
        element = float_bytes_on(src.ray_type if src else None, self.config.act_bytes)
        return tokens * self.model.hidden * element

    def link(self, src: DeviceSpec, dst: DeviceSpec, inter_node_gbs: float) -> tuple[float, float]:
        """(bytes/s, latency s) of the hop from src to dst. The ring takes every activation off the device and
        through a TCP socket, so the hop measured beside src's profile (`Profile.transfer`) is what a hop within a
        node costs; between nodes the network's bandwidth caps it and its latency adds. Without a measured hop: the
        catalog's links."""
        profile = self.profile(src.spec)
        hop = profile.transfer if profile else None
        if src.node == dst.node:
            if hop:
                return hop.bytes_per_s, hop.latency_s
            return min(src.spec.link_gbs, dst.spec.link_gbs) * 1e9, self.config.intra_node_latency_s
        network = inter_node_gbs * 1e9
        if hop:
            return min(network, hop.bytes_per_s), self.config.inter_node_latency_s + hop.latency_s
        return network, self.config.inter_node_latency_s

    def transfer_time(self, src: DeviceSpec, dst: DeviceSpec, inter_node_gbs: float, phase: Phase,
                      micro_batch: int, seq: int) -> float:
        bandwidth, latency = self.link(src, dst, inter_node_gbs)
        return self.activation_bytes(phase, micro_batch, seq, src.spec) / bandwidth + latency

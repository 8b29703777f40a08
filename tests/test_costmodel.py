"""Each cost-model formula against numbers worked out by hand."""

import math

import pytest

from llmpq_serve.costmodel import CostConfig, CostModel, group_size_for, matrix_bytes, packed_words, profile_gpu
from llmpq_serve.profile_table import Profile
from llmpq_serve.spec import ClusterSpec, GPUSpec, ModelSpec

GiB, MiB = 1024**3, 1024**2


@pytest.fixture
def tiny() -> ModelSpec:
    return ModelSpec(name="tiny", arch="llama", layers=2, hidden=512, heads=8, kv_heads=2, ffn=1024, vocab=1000,
                     max_pos=256)


def test_packed_words():
    assert packed_words(512, 4) == 64  # 8 per 32-bit word
    assert packed_words(512, 3) == 48  # dense: values straddle words, no bits wasted
    assert packed_words(10, 3) == 1 and packed_words(11, 3) == 2


def test_group_size_halves_until_it_divides():
    assert group_size_for(4096, 128) == 128
    assert group_size_for(96, 128) == 32
    assert group_size_for(100, 128) == 4


def test_matrix_bytes_by_hand():
    out_f, in_f = 256, 512
    assert matrix_bytes(out_f, in_f, 16, 128) == 256 * 512 * 2
    assert matrix_bytes(out_f, in_f, 8, 128) == 256 * 512 + 256 * 2
    # values 256 rows x 64 words; an fp16 scale and an fp16 zero per row and group of 128
    assert matrix_bytes(out_f, in_f, 4, 128) == 256 * 64 * 4 + 256 * 4 * 2 * 2
    assert matrix_bytes(out_f, in_f, 3, 128) == 256 * 48 * 4 + 256 * 4 * 2 * 2
    assert matrix_bytes(out_f, in_f, 16, 128, float_bytes=4) == 256 * 512 * 4  # an fp32 CPU runtime


def test_layer_weight_bytes_llama_gqa(tiny):
    cm = CostModel(tiny)
    # q, k, v, o with kv_dim = 2 heads x 64 = 128; gate/up/down of ffn 1024
    shapes = [(512, 512), (128, 512), (128, 512), (512, 512), (1024, 512), (1024, 512), (512, 1024)]
    assert tiny.linear_shapes() == shapes
    params = sum(o * i for o, i in shapes)
    assert cm.layer_weight_bytes(16) == params * 2 + 2 * 512 * 2  # plus two RMSNorm weights in fp16
    assert cm.layer_weight_bytes(8) == params + sum(o for o, _ in shapes) * 2 + 2 * 512 * 2
    assert cm.layer_weight_bytes(4) < cm.layer_weight_bytes(8) < cm.layer_weight_bytes(16)
    with pytest.raises(ValueError, match="unsupported bit-width"):
        cm.layer_weight_bytes(5)


def test_kv_cache_and_activations(tiny):
    cm = CostModel(tiny)
    assert cm.layer_kv_bytes(batch=4, max_len=100) == 2 * 4 * 100 * 128 * 2
    # prefill of 2 x 10 tokens: hidden states + MLP intermediate, plus 2 x 8 heads x 10 x 10 attention scores
    hidden = 20 * (4 * 512 + 2 * 1024) * 2
    assert cm.activation_peak_bytes("prefill", 2, 10, last_stage=False) == hidden + 2 * 8 * 10 * 10 * 2
    assert cm.activation_peak_bytes("prefill", 2, 10, last_stage=True) == hidden + 2 * 8 * 100 * 2 + 2 * 1000 * 4


def test_usable_memory_paper_rule(tiny):
    cm = CostModel(tiny)
    t4 = GPUSpec.from_catalog("T4")
    assert cm.usable_memory(t4) == pytest.approx(14.56 * GiB * 0.95 - 1930 * MiB)  # what CUDA reports of a T4
    cm2 = CostModel(tiny, CostConfig(memory_fraction=1.0, runtime_overhead_mib=0))
    assert cm2.usable_memory(t4) == 14.56 * GiB


def test_roofline_decode_is_memory_bound(tiny):
    cm = CostModel(tiny, CostConfig(profiles_dir=None))
    a100 = GPUSpec.from_catalog("A100-SXM4-40GB")
    k = cm.kernels
    moved = cm.layer_weight_bytes(16) + 1 * (10 * 512 + 3 * 1024) * 2 + 1 * 64 * 2 * 128 * 2
    expect = moved / (1555e9 * k["bandwidth_eff"] * k["bits"][16]["bandwidth"]) + k["launch_us"] * 1e-6
    assert cm.layer_time(a100, 16, "decode", 1, 64) == pytest.approx(expect)
    # 4-bit moves ~4x fewer weight bytes: faster decode despite the unpacking factor
    assert cm.layer_time(a100, 4, "decode", 1, 64) < cm.layer_time(a100, 16, "decode", 1, 64)


def test_roofline_prefill_is_compute_bound():
    m = ModelSpec.from_catalog("opt-30b")
    cm = CostModel(m, CostConfig(profiles_dir=None))
    v100 = GPUSpec.from_catalog("V100-SXM2-32GB")
    k = cm.kernels
    flops = 2 * 8 * 512 * m.linear_params + 4 * 8 * 512 * 512 * m.hidden
    expect = flops / (125e12 * k["compute_eff"]) + k["launch_us"] * 1e-6
    assert cm.layer_time(v100, 16, "prefill", 8, 512) == pytest.approx(expect)
    # weight-only quantisation slows compute-bound prefill (dequantisation), as the LLM-PQ paper observes
    assert cm.layer_time(v100, 3, "prefill", 8, 512) > cm.layer_time(v100, 16, "prefill", 8, 512)


def test_transfer_intra_vs_inter_node(tiny):
    cm = CostModel(tiny, CostConfig(profiles_dir=None))  # worked out from the catalog, not from a measured hop
    cluster = ClusterSpec.from_dict({"nodes": [{"name": "a", "devices": [{"type": "T4", "count": 2}]},
                                               {"name": "b", "devices": [{"type": "A10", "count": 1}]}],
                                     "inter_node_gbs": 2.0})
    a0, a1, b0 = cluster.devices
    nbytes = 4 * 100 * 512 * 2
    assert cm.transfer_time(a0, a1, 2.0, "prefill", 4, 100) == pytest.approx(nbytes / 16e9 + 10e-6)
    assert cm.transfer_time(a0, b0, 2.0, "prefill", 4, 100) == pytest.approx(nbytes / 2e9 + 50e-6)
    assert cm.transfer_time(a0, b0, 2.0, "decode", 4, 100) == pytest.approx(4 * 512 * 2 / 2e9 + 50e-6)


def test_4bit_layers_on_gpus_without_the_int4_kernel_take_the_3bit_paths_fitted_efficiency(tiny, monkeypatch):
    """A T4 (compute capability 7.5) has no int4 kernel and runs 4-bit weights the way 3-bit ones run: the measured
    tables' efficiency of the 3-bit path scales its 4-bit roofline; an A100's keeps the 4-bit kernel's."""
    from llmpq_serve.costmodel import FittedScales

    cm = CostModel(tiny, CostConfig(profiles_dir=None))
    fitted = FittedScales({(4, "decode"): 2.0, (3, "decode"): 50.0}, ("H100",), ())
    monkeypatch.setattr(cm, "fitted_scales", lambda gpu: fitted)
    t4, a100 = GPUSpec.from_catalog("T4"), GPUSpec.from_catalog("A100-SXM4-80GB")
    assert (t4.sm, a100.sm) == (75, 80)
    assert cm.layer_time(t4, 4, "decode", 8, 512) == 50.0 * cm.roofline_layer_time(t4, 4, "decode", 8, 512)
    assert cm.layer_time(a100, 4, "decode", 8, 512) == 2.0 * cm.roofline_layer_time(a100, 4, "decode", 8, 512)


def test_embedding_and_head_costs(tiny):
    cm = CostModel(tiny, CostConfig(profiles_dir=None))  # worked out from the catalog, not from a measured head
    t4 = GPUSpec.from_catalog("T4")
    assert cm.embedding_bytes() == 1000 * 512 * 2
    assert cm.head_bytes() == (1000 * 512 + 2 * 512) * 2
    fp32 = CostModel(tiny, CostConfig(float_bytes=4))  # the CPU runtime keeps them in fp32
    assert (fp32.embedding_bytes(), fp32.head_bytes()) == (2 * cm.embedding_bytes(), 2 * cm.head_bytes())
    expect = max(2 * 3 * tiny.head_params / (65e12 * 0.6), cm.head_bytes() / (320e9 * 0.8)) + 60e-6
    assert cm.head_time(t4, 3) == pytest.approx(expect)
    assert math.isclose(cm.embedding_time(t4, "decode", 3, 50), 2 * 3 * 512 * 2 / (320e9 * 0.8))


def test_the_dequantizing_workspace_by_gpu_and_bits(tiny):
    """A GPU dequantizes a whole matrix per call where no kernel takes the weight as held: 4-bit has torch's int4
    kernel from compute capability 8.0, 3-bit and int8 nowhere; a CPU works in small blocks."""
    cm = CostModel(tiny)
    largest = 1024 * 512
    t4, a100, cpu = (GPUSpec.from_catalog(n) for n in ("T4", "A100-SXM4-40GB", "CPU"))
    assert [cm.dequant_workspace_bytes(t4, b) for b in (16, 8, 4, 3)] == [0, 2 * largest, 3 * largest, 6 * largest]
    assert [cm.dequant_workspace_bytes(a100, b) for b in (16, 8, 4, 3)] == [0, 2 * largest, 0, 6 * largest]
    assert cm.dequant_workspace_bytes(cpu, 3) == 0


@pytest.mark.parametrize("device_type, device_name, gpu", [
    ("A100", "NVIDIA A100-SXM4-40GB", "A100-SXM4-40GB"),
    ("A100", "NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB"),
    ("A800", "NVIDIA A800-SXM4-80GB", "A800-SXM4-80GB"),  # Ray's A800, not an A100
    ("H100", "NVIDIA H100 80GB HBM3", "H100-SXM5-80GB"),
    ("H100", "NVIDIA H100 PCIe", "H100-PCIE-80GB"),
    ("V100", "Tesla V100-SXM2-16GB", "V100-SXM2-16GB"),
])
def test_a_profile_names_the_variant_it_was_measured_on(device_type, device_name, gpu):
    profile = Profile(device_type=device_type, device_name=device_name, torch="2", measured_at="today", tables=[])
    assert profile_gpu(profile).name == gpu


def test_another_variant_of_a_profiled_type_gets_its_times_scaled_by_the_roofline():
    """profiles/H100.json was measured on an SXM H100 (3.35 TB/s); a PCIe one (2 TB/s) took its times as they were."""
    cm = CostModel(ModelSpec.from_catalog("llama-3-8b"))
    sxm, pcie = GPUSpec.from_catalog("H100-SXM5-80GB"), GPUSpec.from_catalog("H100-PCIE-80GB")
    assert cm.other_variant(sxm) is None and cm.latency_source(sxm).startswith("profile")
    assert cm.other_variant(pcie).name == "H100-SXM5-80GB"
    assert cm.latency_source(pcie).startswith("profile of H100-SXM5-80GB, scaled by the roofline")
    for phase, mb, seq in (("decode", 8, 512), ("prefill", 4, 512)):
        ratio = cm.roofline_layer_time(pcie, 16, phase, mb, seq) / cm.roofline_layer_time(sxm, 16, phase, mb, seq)
        assert ratio > 1.2
        assert cm.layer_time(pcie, 16, phase, mb, seq) == pytest.approx(ratio * cm.layer_time(sxm, 16, phase, mb, seq))
    # the LM head too (its measured time had been the SXM's on every variant)
    ratio = cm.roofline_head_time(pcie, 4) / cm.roofline_head_time(sxm, 4)
    assert ratio > 1.2 and cm.head_time(pcie, 4) == pytest.approx(ratio * cm.head_time(sxm, 4))

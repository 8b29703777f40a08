"""Quantized layers: error bounds, packed sizes, AWQ vs round-to-nearest, shards, the cache, stage loading."""

import pytest
import torch
from torch import nn

from llmpq_serve.costmodel import CostConfig, CostModel, matrix_bytes
from llmpq_serve.quant.apply import QuantCache, layer_state, model_id, quantize_shard
from llmpq_serve.quant.calibration import collect_inputs, decoder_layers
from llmpq_serve.quant.groupwise import quantize
from llmpq_serve.quant.linear import QuantLinear
from llmpq_serve.spec import ModelSpec


def tiny_llama(seed: int = 0, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def tiny_opt(seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=300, hidden_size=256, ffn_dim=512, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=128, word_embed_proj_dim=256, dropout=0.0)
    return OPTForCausalLM(config).eval()


def test_awq_folds_nothing_into_the_norms_of_a_post_norm_opt_layer(monkeypatch):
    """In OPT's post-norm layers (opt-350m) the norms come after attention and the MLP: folding scales into them
    would change the layer. Only the linear-to-linear folds (v -> out_proj, fc1 -> fc2) remain, and the layer's
    full-precision function is unchanged."""
    from transformers import OPTConfig, OPTForCausalLM

    from llmpq_serve.quant import awq

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=300, hidden_size=256, ffn_dim=512, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=128, word_embed_proj_dim=256, dropout=0.0, do_layer_norm_before=False)
    model = OPTForCausalLM(config).eval()
    calib = collect_inputs(model, "opt", [ids()])
    layer = model.model.decoder.layers[0]
    folded = []
    fold = awq._fold
    monkeypatch.setattr(awq, "_fold", lambda prev, linears, s: (folded.append(prev), fold(prev, linears, s)))
    reference = calib[0].block_output(layer)
    with torch.no_grad():
        awq.awq_quantize_layer(layer, "opt", calib[0], 4)
    assert folded and all(isinstance(prev, nn.Linear) for prev in folded)
    torch.testing.assert_close(calib[0].block_output(layer), reference, atol=1e-4, rtol=1e-4)


def ids(n: int = 4, seq: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 300, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_round_trip_error_is_within_half_a_step(bits):
    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=False)
    w = lin.weight.detach()
    if bits == 8:
        layer = QuantLinear.from_linear(lin, 8)
        step = layer.scale[:, None]
        back = layer.dequantized_weight()
    else:
        gq = quantize(w, bits, 128)
        assert int(gq.q.max()) <= 2**bits - 1
        step = gq.scale.repeat_interleave(128, dim=1)
        back = gq.dequantize()
    assert ((back - w).abs() <= step / 2 + 1e-6).all()


def test_a_4bit_weight_without_the_int4_kernel_is_held_two_to_a_byte(monkeypatch):
    """A GPU below compute capability 8.0 (T4, V100) has no int4 kernel: the same weight is held as nibbles and
    dequantized at each call, computes the same product, and saves to the same on-disk form."""
    import llmpq_serve.quant.linear as linear_module

    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    gq = quantize(lin.weight.detach().float(), 4, 128)
    with_kernel = QuantLinear.from_group_quant(gq, lin.bias)
    monkeypatch.setattr(linear_module, "has_int4_kernel", lambda device: False)
    nibbles = QuantLinear.from_group_quant(gq, lin.bias)
    assert with_kernel.int4_kernel and not nibbles.int4_kernel
    assert nibbles.qweight.dtype == torch.uint8 and nibbles.qweight.shape == (128, 128)
    torch.testing.assert_close(nibbles.dequantized_weight(), gq.dequantize())
    x = torch.randn(3, 5, 256)
    torch.testing.assert_close(nibbles(x), nn.functional.linear(x, gq.dequantize(), lin.bias), atol=1e-4, rtol=0)
    for k, v in with_kernel.state().items():
        assert torch.equal(nibbles.state()[k], v), k
    again = QuantLinear.from_state(nibbles.state(), 4, 128)
    assert not again.int4_kernel and torch.equal(again.qweight, nibbles.qweight)


@pytest.mark.parametrize("bits", [4, 3])
def test_a_layer_loaded_in_half_precision_keeps_half_scales_as_the_cost_model_counts_them(monkeypatch, bits):
    """A GPU stage loads its layers in its runtime's half type; its dequantized layers (3 bits, and 4 bits below
    compute capability 8.0) held fp32 scales and zero points, twice what the planner counted."""
    import llmpq_serve.quant.linear as linear_module

    monkeypatch.setattr(linear_module, "has_int4_kernel", lambda device: False)
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    gq = quantize(lin.weight.detach().float(), bits, 128)
    state = {k: v.half() if v.is_floating_point() else v
             for k, v in QuantLinear.from_group_quant(gq, lin.bias).state().items()}
    half = QuantLinear.from_state(state, bits, 128)
    assert half.scale.dtype == half.zero.dtype == torch.float16
    assert half.weight_nbytes() == matrix_bytes(128, 256, bits, 128, float_bytes=2)
    back = half.group_quant()
    assert torch.equal(back.q, gq.q) and torch.equal(back.zero, gq.zero)
    torch.testing.assert_close(half.dequantized_weight(), gq.dequantize(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("bits", [16, 8, 4, 3])
def test_packed_bytes_match_the_cost_model(bits):
    lin = nn.Linear(512, 384, bias=False)
    q = QuantLinear.from_linear(lin, bits, 128)
    assert q.weight_nbytes() == matrix_bytes(384, 512, bits, 128, float_bytes=4)
    if bits == 4:  # about a quarter of fp16 plus scales
        assert q.weight_nbytes() < 0.3 * 384 * 512 * 2


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_kernels_compute_the_dequantized_product(bits):
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    q = QuantLinear.from_linear(lin, bits, 128)
    x = torch.randn(3, 5, 256)
    if bits == 3:  # dequantized in the activations' dtype
        torch.testing.assert_close(q(x), nn.functional.linear(x, q.dequantized_weight(), lin.bias), atol=1e-4, rtol=0)
    else:  # the int8/int4 kernels take bf16 activations and give a bf16 product
        expect = nn.functional.linear(x.bfloat16().float(), q.dequantized_weight(), lin.bias)
        torch.testing.assert_close(q(x), expect, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("in_features", [256, 40])  # rows of whole 32-bit words, and of bytes only
def test_3bit_weight_is_held_as_bit_planes_and_multiplied_block_by_block(monkeypatch, in_features):
    from llmpq_serve.quant import linear

    torch.manual_seed(0)
    lin = nn.Linear(in_features, 100)
    group = 128 if in_features == 256 else 8
    gq = quantize(lin.weight.detach(), 3, group)
    q = QuantLinear.from_linear(lin, 3, group, quantized=gq)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (3, 100, in_features // 8)  # 3 bits per value
    assert torch.equal(q.group_quant().q, gq.q)
    x = torch.randn(5, in_features)
    expect = nn.functional.linear(x, gq.dequantize(), lin.bias)
    whole = q(x)
    monkeypatch.setattr(linear, "CPU_BLOCK_BYTES", 4 * in_features * 48)  # blocks of 48, 48 and 4 output rows
    torch.testing.assert_close(q(x), expect, atol=1e-4, rtol=0)
    torch.testing.assert_close(q(x), whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", [16, 8, 4, 3])
def test_compressed_tensors_state_round_trip(bits):
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(256, 96), bits, 128)
    state = q.state()
    if bits in (4, 3):
        assert {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"} <= set(state)
        assert state["weight_packed"].dtype == torch.int32
        assert state["weight_packed"].shape == (96, 256 * bits // 32)
    again = QuantLinear.from_state(state, bits, 128)
    x = torch.randn(4, 256)
    assert torch.equal(again(x), q(x))


def _outlier_model():
    """Real LLMs have a few input channels with huge activations (often from norm weights); give the tiny model
    some, so that activation-aware scaling has something to protect."""
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:4] *= 30.0
    return model


@pytest.mark.parametrize("bits", [4, 3])
def test_awq_beats_round_to_nearest_on_outlier_channels(bits):
    import copy

    model = _outlier_model()
    calib = collect_inputs(model, "llama", [ids(seed=5)])
    x = ids(seed=9)
    with torch.no_grad():
        ref = model(input_ids=x).logits
    errors = {}
    for method in ("awq", "rtn"):
        twin = copy.deepcopy(model)
        quantize_shard(twin, "llama", [0, 1, 2], [bits] * 3, calib, method=method)
        with torch.no_grad():
            errors[method] = (twin(input_ids=x).logits - ref).pow(2).mean().item()
    assert errors["awq"] < 0.8 * errors["rtn"]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_awq_scaling_keeps_the_full_precision_function(arch):
    """Folding the scales into norms and preceding linears (v->o, up->down, fc1->fc2) changes nothing in fp32."""
    from llmpq_serve.quant.awq import awq_quantize_layer

    model = _outlier_model() if arch == "llama" else tiny_opt()
    calib = collect_inputs(model, arch, [ids(seed=5)])
    x = ids(seed=9)
    with torch.no_grad():
        before = model(input_ids=x).logits
        for i, layer in enumerate(decoder_layers(model, arch)):
            awq_quantize_layer(layer, arch, calib[i], 4)  # folds scales; the weights stay float
        after = model(input_ids=x).logits
    assert torch.allclose(before, after, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("make,arch", [(tiny_llama, "llama"), (tiny_opt, "opt")])
def test_calibration_calls_rerun_without_a_stale_kv_cache(make, arch):
    """A candidate's block output must see its own k and v: a KV cache captured with the calls would make re-runs
    attend to the keys of the first run and hide every k/v quantization from the search."""
    model = make()
    calib = collect_inputs(model, arch, [ids(seed=5)])[0]
    assert not any(type(v).__name__.endswith("Cache") for _, kwargs in calib.calls for v in kwargs.values())
    layer = decoder_layers(model, arch)[0]
    with torch.no_grad():
        before = calib.block_output(layer)
        layer.self_attn.v_proj.weight.mul_(0.5)
        assert not torch.allclose(calib.block_output(layer), before, atol=1e-4)


def test_awq_falls_back_to_round_to_nearest_when_it_does_worse(monkeypatch):
    from llmpq_serve.quant import awq

    model = tiny_llama()
    layer = decoder_layers(model, "llama")[0]
    calib = collect_inputs(model, "llama", [ids(seed=5)])[0]
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    def harmful_scales(magnitude, _w):  # a search that can only do harm
        n = len(magnitude)
        yield torch.logspace(-2, 2, n)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]

    monkeypatch.setattr(awq, "_candidate_scales", harmful_scales)
    monkeypatch.setattr(awq, "CLIP_RATIOS", [1.0])
    monkeypatch.setattr(awq, "BLOCK_CLIP_RATIOS", ())
    found = awq.awq_quantize_layer(layer, "llama", calib, 3)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, original[k]), f"{k} kept a fold although the layer fell back"
    for name, gq in found.items():
        assert torch.equal(gq.q, quantize(layer.get_submodule(name).weight, 3).q)

@pytest.mark.parametrize("make,arch", [(tiny_llama, "llama"), (tiny_opt, "opt")])
def test_quantized_shard_stays_close_to_fp32(make, arch):
    model = make()
    x = ids(seed=3)
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=x).logits, -1)
    calib = collect_inputs(model, arch, [ids(seed=4)])
    n = len(decoder_layers(model, arch))
    quantize_shard(model, arch, list(range(n)), [8] + [4] * (n - 1), calib)
    assert isinstance(decoder_layers(model, arch)[0].get_submodule(
        "self_attn.q_proj" if arch == "llama" else "fc1"), QuantLinear)
    with torch.no_grad():
        out = torch.log_softmax(model(input_ids=x).logits, -1)
    kl = (ref.exp() * (ref - out)).sum(-1).mean().item()
    assert kl < 0.05


def test_only_the_planned_layers_are_quantized():
    model = tiny_llama()
    calib = collect_inputs(model, "llama", [ids()])
    quantize_shard(model, "llama", [1, 2], [16, 3], calib)
    layers = model.model.layers
    assert isinstance(layers[0].mlp.down_proj, nn.Linear) and isinstance(layers[1].mlp.down_proj, nn.Linear)
    assert isinstance(layers[2].mlp.down_proj, QuantLinear) and layers[2].mlp.down_proj.bits == 3
    with pytest.raises(ValueError, match="2 layers but 1 bit-widths"):
        quantize_shard(model, "llama", [0, 1], [4], calib)


def test_cache_hit_skips_calibration(tmp_path, monkeypatch):
    cache = QuantCache(tmp_path)
    first = tiny_llama()
    calib = collect_inputs(first, "llama", [ids()])
    assert quantize_shard(first, "llama", [0, 1], [4, 3], calib, cache=cache, model_key="m") == 0
    assert cache.path("m", 1, 3, "awq", 128).is_file()

    from llmpq_serve.quant import apply

    monkeypatch.setattr(apply, "awq_quantize_layer", lambda *a, **k: pytest.fail("recalibrated despite the cache"))
    second = tiny_llama()
    assert quantize_shard(second, "llama", [0, 1], [4, 3], None, cache=cache, model_key="m") == 2
    x = ids(seed=7)
    with torch.no_grad():
        assert torch.equal(first(input_ids=x).logits, second(input_ids=x).logits)
    assert layer_state(second.model.layers[0], "llama").keys() == layer_state(first.model.layers[0], "llama").keys()


@pytest.mark.parametrize("method", ["awq", "rtn"])
def test_the_state_saved_from_the_integers_is_the_layers_own(method, monkeypatch):
    """`quantize_layer` hands out each 4/3-bit linear's on-disk state from the integers it quantized, not read back
    from the kernel's layout (a matmul with the identity): the same tensors, and no read-back."""
    from llmpq_serve.quant.apply import quantize_layer

    model = tiny_llama()
    calib = collect_inputs(model, "llama", [ids()])
    for i, bits in ((0, 4), (1, 3)):
        layer = model.model.layers[i]
        with monkeypatch.context() as m:
            m.setattr(QuantLinear, "group_quant", lambda self: pytest.fail("read back from the kernel's layout"))
            states = quantize_layer(layer, "llama", bits, method, calib[i])
        assert sorted(states) == sorted(n for n, _ in layer.named_modules() if isinstance(_, QuantLinear))
        for name, state in states.items():
            own = layer.get_submodule(name).state()
            assert state.keys() == own.keys() and all(torch.equal(state[k], own[k]) for k in own), name


def test_stage_loads_only_its_own_layers(tmp_path):
    from llmpq_serve.checkpoint import load_stage_model, read_tensors

    model = tiny_llama(layers=4)
    model.save_pretrained(tmp_path)
    own = set(model.state_dict())
    tensors = read_tensors(tmp_path, "llama", range(1, 3), first=False, last=False, model_keys=own)
    assert tensors and all(k.startswith(("model.layers.1.", "model.layers.2.")) for k in tensors)
    stage = load_stage_model(tmp_path, "llama", range(1, 3), first=False, last=False)
    for i, layer in enumerate(stage.model.layers):
        real = not layer.mlp.up_proj.weight.is_meta
        assert real == (i in (1, 2))
        if real:
            assert torch.equal(layer.mlp.up_proj.weight, model.model.layers[i].mlp.up_proj.weight)
    assert stage.model.embed_tokens.weight.is_meta and stage.lm_head.weight.is_meta
    first = load_stage_model(tmp_path, "llama", range(1), first=True, last=False)
    assert not first.model.embed_tokens.weight.is_meta and first.lm_head.weight.is_meta
    assert model_id(tmp_path) == model_id(tmp_path) and len(model_id(tmp_path)) == 16
    # a merged adapter changes some layers' weights, not the config, the sizes or the header: a new id
    before = model_id(tmp_path)
    with torch.no_grad():
        for layer in model.model.layers[2:]:
            layer.self_attn.v_proj.weight.add_(0.01)
    model.save_pretrained(tmp_path)
    assert model_id(tmp_path) != before


def test_an_edit_of_one_norm_alone_gives_the_checkpoint_a_new_id(tmp_path, monkeypatch):
    """Norm-only tuning changes a few KiB of a file; chunks spread over a large file fell between them, and the cache
    handed the old model's quantized layers (and norms) to the new one."""
    from llmpq_serve.quant import apply

    monkeypatch.setattr(apply, "ID_CHUNKS", 1)  # as few chunks as a large file has for a norm: none on it
    model = tiny_llama(layers=4)
    model.save_pretrained(tmp_path)
    before = model_id(tmp_path)
    with torch.no_grad():
        model.model.layers[2].input_layernorm.weight.mul_(1.5)
    model.save_pretrained(tmp_path)
    assert model_id(tmp_path) != before


def test_an_opt_stage_loads_its_projections_from_a_checkpoint_without_the_model_prefix(tmp_path):
    """opt-350m projects embeddings into the hidden size (project_in, the first stage's) and back (project_out, the
    last's); OPT's own checkpoints name their tensors `decoder.*`, without the `model.` prefix HF's class has."""
    from safetensors.torch import load_file, save_file
    from transformers import OPTConfig, OPTForCausalLM

    from llmpq_serve.checkpoint import load_stage_model

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=256, ffn_dim=512, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=128,
                                     do_layer_norm_before=False, dropout=0.0)).eval()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in weights.items() if k != "lm_head.weight"},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    first = load_stage_model(tmp_path, "opt", range(1), first=True, last=False).model.decoder
    last = load_stage_model(tmp_path, "opt", range(1, 2), first=False, last=True).model.decoder
    assert torch.equal(first.project_in.weight, model.model.decoder.project_in.weight) and first.project_out.weight.is_meta
    assert torch.equal(last.project_out.weight, model.model.decoder.project_out.weight) and last.project_in.weight.is_meta
    assert torch.equal(first.layers[0].fc1.weight, model.model.decoder.layers[0].fc1.weight)
    assert last.layers[0].fc1.weight.is_meta and not last.layers[1].fc1.weight.is_meta


def test_a_checkpoint_short_of_a_stages_tensors_says_which(tmp_path):
    from safetensors.torch import load_file, save_file

    from llmpq_serve.checkpoint import load_stage_model

    tiny_llama(layers=2).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    load_stage_model(tmp_path, "llama", range(1), first=True, last=False)  # the other stage's loss is not its own
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\) this stage needs, e.g. model.layers.1.mlp.up_proj"):
        load_stage_model(tmp_path, "llama", range(1, 2), first=False, last=True)


def test_cost_model_predicts_a_quantized_layer_footprint():
    model = tiny_llama()
    spec = ModelSpec.from_hf_config(model.config, name="tiny")
    calib = collect_inputs(model, "llama", [ids()])
    cost = CostModel(spec, CostConfig(float_bytes=4))
    quantize_shard(model, "llama", [0, 1, 2], [8, 4, 3], calib)
    for i, bits in enumerate((8, 4, 3)):
        layer = model.model.layers[i]
        held = sum(t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers()))
        assert held == pytest.approx(cost.layer_weight_bytes(bits), rel=0.05)


def test_a_weight_multiplied_in_blocks_of_rows_gives_the_whole_product():
    """As a GPU multiplies a dequantized matrix larger than GPU_BLOCK_WEIGHTS (here blocks of 7 rows, the last short)."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 100)
    layer = QuantLinear.from_linear(lin, 3, 128, quantize(lin.weight.detach().float(), 3, 128))
    x = torch.randn(5, 256)
    whole = layer._row_blocks(x, layer._dequantize, 1 << 30)
    blocks = layer._row_blocks(x, layer._dequantize, 256 * 7)
    torch.testing.assert_close(blocks, whole)
    torch.testing.assert_close(whole, x @ layer.dequantized_weight().T)

import functools
import json

import pytest

from llmpq_serve.indicator import Indicator
from llmpq_serve.spec import ModelSpec


def test_normalisation_whole_model_at_3_bits_is_one():
    ind = Indicator.analytic(ModelSpec.from_catalog("opt-30b"))
    assert ind.uniform_quality(3) == pytest.approx(1.0)
    assert ind.uniform_quality(16) == 0.0
    assert ind.uniform_quality(4) == pytest.approx(0.25)  # noise power falls as 2^-2b
    assert ind.uniform_quality(8) == pytest.approx(2.0 ** -10)


def test_analytic_default_edges_most_sensitive():
    omega = Indicator.analytic(ModelSpec.from_catalog("opt-30b")).omega
    assert omega[0][3] == pytest.approx(2 * omega[len(omega) // 2][3], rel=0.01)
    assert omega[0][3] > omega[0][4] > omega[0][8] > omega[0][16] == 0


def test_from_json_and_validation(tmp_path):
    path = tmp_path / "ind.json"
    path.write_text(json.dumps({"omega": [{"16": 0, "8": 0.1, "4": 1, "3": 3}, {"16": 0, "8": 0.1, "4": 1, "3": 1}]}))
    ind = Indicator.from_json(path)
    assert ind.source.startswith("file:") and ind.quality([3, 16]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="3 bits"):
        Indicator(source="x", omega=[{16: 0.0, 4: 1.0}])
    with pytest.raises(ValueError, match="same bit-widths"):
        Indicator(source="x", omega=[{16: 0.0, 3: 1.0}, {16: 0.0, 4: 1.0, 3: 1.0}])
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="finite and non-negative"):
            Indicator(source="x", omega=[{16: 0.0, 3: bad}])
    with pytest.raises(ValueError, match="2 bit-widths for 3 layers"):
        Indicator(source="x", omega=[{3: 1.0}] * 3).quality([3, 3])
    # a file with its bit-width keys swapped, or no loss at the reference: every budget would lose its meaning
    # (`--quality fp16` planned 3-bit layers with such a file)
    with pytest.raises(ValueError, match="larger at 16 bits .* than at 8 bits"):
        Indicator(source="x", omega=[{16: 2.0, 8: 0.001, 4: 0.25, 3: 1.0}])
    with pytest.raises(ValueError, match="sums to 0"):
        Indicator(source="x", omega=[{16: 0.0, 4: 0.0, 3: 0.0}] * 2)
    # one layer's noise between close bit-widths is allowed; the model's totals must fall as bits rise
    Indicator(source="x", omega=[{16: 0.0, 4: 0.3, 3: 0.2}, {16: 0.0, 4: 0.1, 3: 0.9}])


def test_calibrated_indicator_tracks_output_perturbation():
    import torch

    from llmpq_serve.quant.calibration import collect_inputs
    from tests.test_quant import ids, tiny_llama

    model = tiny_llama()
    with torch.no_grad():  # layer 1 gets larger, harder-to-quantize weights
        for p in model.model.layers[1].mlp.parameters():
            p.mul_(4.0)
    calib = collect_inputs(model, "llama", [ids()])
    ind = Indicator.calibrated(model, "llama", calib)
    assert ind.source.startswith("calibrated")
    for row in ind.omega:
        assert row[16] == 0 < row[8] < row[4] < row[3]
    assert max(range(3), key=lambda i: ind.omega[i][3]) == 1
    assert ind.uniform_quality(3) == pytest.approx(1.0)


def test_checkpoint_indicator_is_calibrated_once_then_read_from_the_cache(demo_checkpoint, tmp_path, monkeypatch):
    from llmpq_serve.quant.apply import QuantCache
    from llmpq_serve.runtime import quantized
    from llmpq_serve.runtime.quantized import checkpoint_indicator
    from llmpq_serve.runtime.shard import QuantOptions
    from llmpq_serve.spec import ModelSpec

    path = demo_checkpoint("opt")
    spec = ModelSpec.from_checkpoint(path)
    cache, options = QuantCache(tmp_path), QuantOptions("awq", 128)
    # a quarter of the calibration text: what is tested is that it is computed once, and a minute less of the suite
    monkeypatch.setattr(quantized, "calibration_batches", functools.partial(quantized.calibration_batches, windows=8))
    first = checkpoint_indicator(path, spec.arch, options, cache)
    assert first.layers == spec.layers and first.source.startswith("calibrated: awq")
    for row in first.omega:
        assert row[16] == 0 < row[8] < row[4] < row[3]
    monkeypatch.setattr(Indicator, "calibrated", lambda *a, **k: pytest.fail("recalibrated despite the cache"))
    assert checkpoint_indicator(path, spec.arch, options, cache).omega == first.omega

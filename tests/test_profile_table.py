"""Measured tables: schema round-trip, interpolation, and their use by the cost model."""

import pytest

from llmpq_serve.costmodel import CostConfig, CostModel
from llmpq_serve.profile_table import LayerShape, Profile, ProfilePoint, ShapeTable
from llmpq_serve.spec import GPUSpec, ModelSpec

GRID = {(1, 128): 1.0, (1, 512): 3.0, (4, 128): 2.0, (4, 512): 8.0}


def _profile(model: ModelSpec, device_type: str = "T4") -> Profile:
    points = [ProfilePoint(bits=16, phase="prefill", micro_batch=m, seq=s, median_s=v) for (m, s), v in GRID.items()]
    return Profile(device_type=device_type, device_name="test", torch="2.13", measured_at="2026-11-25",
                   tables=[ShapeTable(shape=LayerShape.of(model), points=points)])


def test_round_trip(tmp_path):
    p = _profile(ModelSpec.from_catalog("opt-13b"))
    p.save(tmp_path / "T4.json")
    assert Profile.load(tmp_path / "T4.json") == p


def test_exact_at_grid_points_and_bilinear_between():
    table = _profile(ModelSpec.from_catalog("opt-13b")).tables[0]
    for (m, s), v in GRID.items():
        assert table.interpolate(16, "prefill", m, s) == pytest.approx(v)
    assert table.interpolate(16, "prefill", 1, 320) == pytest.approx(2.0)
    assert table.interpolate(16, "prefill", 2.5, 320) == pytest.approx((2.0 + 5.0) / 2)


def test_monotone_between_points_and_linear_beyond():
    table = _profile(ModelSpec.from_catalog("opt-13b")).tables[0]
    values = [table.interpolate(16, "prefill", m, 512) for m in (1, 1.5, 2, 3, 4)]
    assert values == sorted(values)
    assert table.interpolate(16, "prefill", 7, 512) == pytest.approx(8.0 + 3 * (8.0 - 3.0) / 3)


def test_non_rectangular_grid_is_rejected():
    model = ModelSpec.from_catalog("opt-13b")
    points = [ProfilePoint(bits=16, phase="decode", micro_batch=1, seq=128, median_s=1.0),
              ProfilePoint(bits=16, phase="decode", micro_batch=2, seq=256, median_s=2.0)]
    table = ShapeTable(shape=LayerShape.of(model), points=points)
    with pytest.raises(ValueError, match="not rectangular"):
        table.interpolate(16, "decode", 1, 128)


def test_cost_model_uses_profile_when_shape_matches(tmp_path):
    model = ModelSpec.from_catalog("opt-13b")
    _profile(model).save(tmp_path / "T4.json")
    t4 = GPUSpec.from_catalog("T4")
    cm = CostModel(model, CostConfig(profiles_dir=tmp_path))
    assert cm.latency_source(t4) == "profile"
    assert cm.layer_time(t4, 16, "prefill", 4, 512) == pytest.approx(8.0)
    # a phase or bit-width the table lacks falls back to the roofline
    assert cm.layer_time(t4, 4, "decode", 1, 512) == cm.roofline_layer_time(t4, 4, "decode", 1, 512)
    # another model shape, or another device type, has no table: roofline, and the plan says so
    other = CostModel(ModelSpec.from_catalog("opt-30b"), CostConfig(profiles_dir=tmp_path))
    assert other.latency_source(t4) == "roofline"
    assert cm.latency_source(GPUSpec.from_catalog("A10")) == "roofline"

"""Measured tables: schema round-trip, interpolation, and their use by the cost model."""

import pytest

from llmpq_serve.costmodel import CostConfig, CostModel
from llmpq_serve.profile_table import LayerShape, Profile, ProfilePoint, ShapeTable, StepPoint, TransferFit
from llmpq_serve.runtime.kernel_revisions import KERNEL_REVISIONS
from llmpq_serve.spec import GPUSpec, ModelSpec

GRID = {(1, 128): 1.0, (1, 512): 3.0, (4, 128): 2.0, (4, 512): 8.0}
LACKS = "; 16/8/4/3-bit layers, which it lacks: "  # `_profile`'s table: 16-bit prefill only


def _profile(model: ModelSpec, device_type: str = "T4", kernels: dict[int, int] | None = None) -> Profile:
    points = [ProfilePoint(bits=16, phase="prefill", micro_batch=m, seq=s, median_s=v) for (m, s), v in GRID.items()]
    kernels = {16: KERNEL_REVISIONS[16]} if kernels is None else kernels
    return Profile(device_type=device_type, device_name="test", torch="2.13", measured_at="2026-11-25",
                   tables=[ShapeTable(shape=LayerShape.of(model), points=points, kernels=kernels)])


def test_round_trip(tmp_path):
    p = _profile(ModelSpec.from_catalog("opt-13b"))
    p.save(tmp_path / "T4.json")
    assert Profile.load(tmp_path / "T4.json") == p


def test_tables_timed_with_older_kernels_are_named_in_the_plan(tmp_path):
    model = ModelSpec.from_catalog("opt-13b")
    t4 = GPUSpec.from_catalog("T4")
    old_3bit = [ProfilePoint(bits=3, phase="decode", micro_batch=1, seq=128, median_s=1.0)]
    current = {b: KERNEL_REVISIONS[b] for b in (16, 3)}
    cases = [({16: KERNEL_REVISIONS[16]}, []), ({}, [16]),  # a table from before revisions were recorded
             ({**current, 3: KERNEL_REVISIONS[3] - 1}, [3]), (current, [])]
    for i, (kernels, outdated) in enumerate(cases):
        profile = _profile(model, kernels=kernels)
        if 3 in kernels:
            profile.tables[0].points.extend(old_3bit)
        assert profile.tables[0].outdated_bits() == outdated
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        profile.save(folder / "T4.json")
        cost = CostModel(model, CostConfig(profiles_dir=folder))
        source = cost.latency_source(t4)
        # a GPU without a table is priced by the roofline fitted on this one, whose older points the plan names too
        fitted = cost.latency_source(GPUSpec.from_catalog("A10"))
        if outdated:
            assert source.startswith(f"profile, its {outdated[0]}-bit points timed with older kernels")
            assert "`llmpq profile --model opt-13b` on that GPU" in source
            assert fitted == (f"roofline, efficiencies fitted on T4 (their {outdated[0]}-bit points timed with older "
                              "kernels than the runtime's)")
        else:
            assert source == "profile" + LACKS + "roofline, efficiencies fitted on T4"
            assert fitted == "roofline, efficiencies fitted on T4"


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


def test_beyond_the_grid_a_time_never_falls_as_the_sizes_grow():
    """An outer cell measured sloping down (noise) must not extrapolate towards zero; one sloping up goes on."""
    model = ModelSpec.from_catalog("opt-13b")
    grid = {(1, 128): 1.0, (1, 512): 0.8, (4, 128): 2.0, (4, 512): 1.5}
    points = [ProfilePoint(bits=16, phase="decode", micro_batch=m, seq=s, median_s=v) for (m, s), v in grid.items()]
    table = ShapeTable(shape=LayerShape.of(model), points=points)
    assert table.interpolate(16, "decode", 4, 512) == 1.5  # still exact at the grid's points
    along_seq = [table.interpolate(16, "decode", 4, s) for s in (512, 2048, 8192, 32768)]
    assert along_seq == [1.5] * 4
    along_batch = [table.interpolate(16, "decode", m, 512) for m in (4, 16, 64)]
    assert along_batch == sorted(along_batch) and along_batch[-1] > 1.5
    # below the grid: the edge's time, whichever way its cell slopes
    assert table.interpolate(16, "decode", 4, 64) == pytest.approx(2.0)
    assert table.interpolate(16, "decode", 0.5, 128) == pytest.approx(1.0)


def test_below_the_grid_a_time_stays_at_the_grids_edge():
    """A prompt shorter than the shortest timed one: a cell's slope carried down reached 0 (a GPU table's 16-token
    prefill was priced at a sixth of one decode step of the same rows)."""
    table = _profile(ModelSpec.from_catalog("opt-13b")).tables[0]
    for seq in (1, 16, 64, 127):
        assert table.interpolate(16, "prefill", 1, seq) == pytest.approx(GRID[(1, 128)])
        assert table.interpolate(16, "prefill", 4, seq) == pytest.approx(GRID[(4, 128)])


def test_above_the_micro_batch_grid_a_longer_prompt_never_takes_less():
    """Each length extrapolates its own cell's micro-batch slope: a steeper cell at the short length (noise) made an
    H100 table's 3-bit prefill of 64 rows fall from 32 ms at 128 tokens to 26 ms at 512."""
    model = ModelSpec.from_catalog("opt-13b")
    grid = {(4, 128): 1.0, (4, 512): 2.0, (8, 128): 3.0, (8, 512): 3.2}
    points = [ProfilePoint(bits=16, phase="prefill", micro_batch=m, seq=s, median_s=v) for (m, s), v in grid.items()]
    table = ShapeTable(shape=LayerShape.of(model), points=points)
    assert table.interpolate(16, "prefill", 64, 128) == pytest.approx(3.0 + 14 * 2.0)  # the cell's slope goes on
    for m in (16, 64):
        along_seq = [table.interpolate(16, "prefill", m, s) for s in (128, 256, 512, 1024, 4096)]
        assert along_seq == sorted(along_seq), m
    along_batch = [table.interpolate(16, "prefill", m, 4096) for m in (4, 6, 8, 16, 64)]
    assert along_batch == sorted(along_batch)


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
    assert cm.latency_source(t4) == "profile" + LACKS + "roofline, efficiencies fitted on T4"
    assert cm.layer_time(t4, 16, "prefill", 4, 512) == pytest.approx(8.0)
    # a phase or bit-width the table lacks falls back to the roofline
    assert cm.layer_time(t4, 4, "decode", 1, 512) == cm.roofline_layer_time(t4, 4, "decode", 1, 512)
    # another model shape, or another device type, has no table: the roofline scaled by the T4 table, and the plan
    # says so
    other = CostModel(ModelSpec.from_catalog("opt-30b"), CostConfig(profiles_dir=tmp_path))
    assert other.latency_source(t4) == "roofline, efficiencies fitted on T4"
    assert cm.latency_source(GPUSpec.from_catalog("A10")) == "roofline, efficiencies fitted on T4"
    assert CostModel(model, CostConfig(profiles_dir=tmp_path / "none")).latency_source(t4) == "roofline"


def test_roofline_scaled_by_efficiency_fitted_on_measured_gpus(tmp_path):
    """A T4 table that runs exactly 3x slower than the roofline at every point: a GPU without a table then gets 3x
    its roofline for that bit-width and phase, and the plain roofline for the others."""
    measured = ModelSpec.from_catalog("opt-13b")
    t4 = GPUSpec.from_catalog("T4")
    plain = CostModel(measured, CostConfig(profiles_dir=None))
    points = [ProfilePoint(bits=16, phase="decode", micro_batch=m, seq=s,
                           median_s=3 * plain.roofline_layer_time(t4, 16, "decode", m, s))
              for m in (1, 8) for s in (128, 512)]
    Profile(device_type="T4", device_name="Tesla T4", torch="2.13", measured_at="2026-11-25",
            tables=[ShapeTable(shape=LayerShape.of(measured), points=points)]).save(tmp_path / "T4.json")
    target = ModelSpec.from_catalog("llama-3-8b")
    a100 = GPUSpec.from_catalog("A100-SXM4-80GB")
    cm = CostModel(target, CostConfig(profiles_dir=tmp_path))
    assert cm.layer_time(a100, 16, "decode", 4, 300) == pytest.approx(3 * cm.roofline_layer_time(a100, 16, "decode",
                                                                                                    4, 300))
    assert cm.layer_time(a100, 4, "prefill", 4, 300) == cm.roofline_layer_time(a100, 4, "prefill", 4, 300)
    # CPU devices are not scaled by GPU measurements
    cpu = GPUSpec.from_catalog("CPU")
    assert cm.layer_time(cpu, 16, "decode", 4, 300) == cm.roofline_layer_time(cpu, 16, "decode", 4, 300)
    # only the files the cost model reads are fitted on: not a quick grid's, nor a copy's
    quick = Profile.load(tmp_path / "T4.json")
    for point in quick.tables[0].points:
        point.median_s *= 10
    quick.save(tmp_path / "T4.quick.json")
    quick.save(tmp_path / "T4-backup.json")
    cm = CostModel(target, CostConfig(profiles_dir=tmp_path))
    assert cm.layer_time(a100, 16, "decode", 4, 300) == pytest.approx(3 * cm.roofline_layer_time(a100, 16, "decode",
                                                                                                    4, 300))
    assert cm.latency_source(a100).startswith("roofline, efficiencies fitted on T4 (")  # not T4+T4+T4


def test_bits_a_table_lacks_get_the_fitted_roofline_and_the_plan_says_so(tmp_path):
    """A table without some bit-width (profiled with fewer `bits`, or before the runtime had them) used to price it
    by the bare roofline while the plan said "profile": an H100's 3-bit decode ~100x faster than measured."""
    t4 = GPUSpec.from_catalog("T4")
    llama, opt = ModelSpec.from_catalog("llama-3-8b"), ModelSpec.from_catalog("opt-13b")
    plain = CostModel(opt, CostConfig(profiles_dir=None))

    def points(model: ModelSpec, bits: int, factor: float) -> list[ProfilePoint]:
        cost = CostModel(model, CostConfig(profiles_dir=None))
        return [ProfilePoint(bits=bits, phase=phase, micro_batch=m, seq=s,
                             median_s=factor * cost.roofline_layer_time(t4, bits, phase, m, s))
                for phase in ("prefill", "decode") for m in (1, 8) for s in (128, 512)]

    tables = [ShapeTable(shape=LayerShape.of(llama), points=points(llama, 16, 2.0), kernels={16: KERNEL_REVISIONS[16]}),
              ShapeTable(shape=LayerShape.of(opt), points=points(opt, 3, 5.0), kernels={3: KERNEL_REVISIONS[3]})]
    Profile(device_type="T4", device_name="Tesla T4", torch="2.13", measured_at="2026-11-28",
            tables=tables).save(tmp_path / "T4.json")
    cm = CostModel(llama, CostConfig(profiles_dir=tmp_path))
    assert cm.layer_time(t4, 16, "decode", 4, 300) == pytest.approx(2.0 * cm.roofline_layer_time(t4, 16, "decode", 4,
                                                                                                   300))
    assert cm.layer_time(t4, 3, "decode", 4, 300) == pytest.approx(5.0 * cm.roofline_layer_time(t4, 3, "decode", 4,
                                                                                                  300))
    assert cm.latency_source(t4) == "profile; 8/4/3-bit layers, which it lacks: roofline, efficiencies fitted on T4"
    assert plain.latency_source(t4) == "roofline"


def test_router_step_overhead_is_interpolated_and_charged_to_the_last_stage(tmp_path):
    from llmpq_serve.planner import Problem
    from llmpq_serve.spec import ClusterSpec, Workload

    model = ModelSpec.from_catalog("opt-13b")
    profile = _profile(model)
    profile.step_overhead = [StepPoint(micro_batch=1, median_s=0.001), StepPoint(micro_batch=8, median_s=0.008)]
    profile.save(tmp_path / "T4.json")
    t4 = GPUSpec.from_catalog("T4")
    cm = CostModel(model, CostConfig(profiles_dir=tmp_path))
    assert cm.step_overhead(t4, 4) == pytest.approx(0.004)
    assert CostModel(model, CostConfig(profiles_dir=None)).step_overhead(t4, 4) == 0.0
    cluster = ClusterSpec.from_dict({"name": "t4", "devices": [{"type": "T4", "count": 1}]})
    problem = Problem(model, cluster, Workload(), cost=cm)
    with_head = problem.stage_fixed_time("T4", "decode", 4, first=False, last=True)
    assert with_head == pytest.approx(cm.head_time(t4, 4) + 0.004)


def test_profiler_measures_the_routers_step_beside_a_computing_stage_and_leaves_no_stage_behind():
    import psutil

    from llmpq_serve.profiler.ring_costs import profile_step_overhead

    def children() -> set[int]:  # alive ones; earlier tests may have left helpers such as multiprocessing's tracker
        return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}

    before = children()
    points = profile_step_overhead((1, 4), vocab=64, steps=8, compute_s=0.02)
    assert [p.micro_batch for p in points] == [1, 4]
    # the stage's 20 ms per step are its own time, not the step's
    assert all(0 < p.median_s < 0.02 and p.stage_compute_s == 0.02 for p in points)
    assert children() <= before


def test_a_new_profile_keeps_the_other_shapes_of_an_older_one():
    old = _profile(ModelSpec.from_catalog("opt-13b"))
    old.tables += _profile(ModelSpec.from_catalog("llama-3-8b")).tables
    new = _profile(ModelSpec.from_catalog("opt-13b"))
    new.tables[0].points[0].median_s = 0.5
    merged = new.keeping(old)
    assert [t.shape for t in merged.tables] == [t.shape for t in old.tables]
    assert merged.tables[0].points[0].median_s == 0.5  # measured now wins
    # each table keeps when and with which torch it was measured
    assert [(t.measured_at, t.torch) for t in merged.tables] == [("2026-11-25", "2.13")] * 2
    old.tables[1].measured_at = "2026-11-20"
    assert new.keeping(old).tables[1].measured_at == "2026-11-20"
    # a partial save (no hop, no step yet) keeps the older file's; a complete profile's own win
    old.transfer = TransferFit(latency_s=1e-4, bytes_per_s=1e9, sizes=[1, 2], seconds=[1e-4, 1e-4])
    old.step_overhead = [StepPoint(micro_batch=1, median_s=4e-4)]
    assert merged.transfer is None and new.keeping(old).transfer == old.transfer
    assert new.keeping(old).step_overhead == old.step_overhead
    new.transfer = TransferFit(latency_s=2e-4, bytes_per_s=2e9, sizes=[1, 2], seconds=[2e-4, 2e-4])
    assert new.keeping(old).transfer == new.transfer
    with pytest.raises(ValueError, match="cannot merge"):
        new.keeping(_profile(ModelSpec.from_catalog("opt-13b"), device_type="A100"))
    # another variant of the type: its tables would be read as timed on this one's device and scaled once more
    pcie = old.model_copy(update={"device_name": "NVIDIA H100 PCIe"})
    with pytest.raises(ValueError, match="measured on NVIDIA H100 PCIe"):
        new.keeping(pcie)


def test_a_file_written_before_tables_recorded_their_date_gives_them_its_own(tmp_path):
    profile = _profile(ModelSpec.from_catalog("opt-13b"))
    data = profile.model_dump()
    for t in data["tables"]:
        del t["measured_at"], t["torch"]
    loaded = Profile.model_validate(data)
    assert (loaded.tables[0].measured_at, loaded.tables[0].torch) == ("2026-11-25", "2.13")


def test_a_measured_hop_prices_the_links_of_its_device_type(tmp_path):
    """The ring's hop as profiled (off the device, a loopback socket, onto the device) replaces the catalog's link
    within a node; between nodes the network caps its bandwidth and adds its latency. Other types keep the catalog."""
    from llmpq_serve.profile_table import TransferFit
    from llmpq_serve.spec import ClusterSpec

    model = ModelSpec.from_catalog("opt-13b")
    profile = _profile(model)
    profile.transfer = TransferFit(latency_s=80e-6, bytes_per_s=1e9, sizes=[1, 2], seconds=[1.0, 2.0])
    profile.save(tmp_path / "T4.json")
    cm = CostModel(model, CostConfig(profiles_dir=tmp_path))
    cluster = ClusterSpec.from_dict({"nodes": [{"name": "a", "devices": [{"type": "T4", "count": 2},
                                                                          {"type": "A10", "count": 1}]},
                                               {"name": "b", "devices": [{"type": "T4", "count": 1}]}],
                                     "inter_node_gbs": 0.5})
    t4, t4_next, a10, t4_far = cluster.devices
    nbytes = cm.activation_bytes("decode", 4, 100)
    assert cm.transfer_time(t4, t4_next, 0.5, "decode", 4, 100) == pytest.approx(80e-6 + nbytes / 1e9)
    assert cm.transfer_time(t4, t4_far, 0.5, "decode", 4, 100) == pytest.approx(50e-6 + 80e-6 + nbytes / 0.5e9)
    assert cm.transfer_time(a10, t4, 0.5, "decode", 4, 100) == pytest.approx(
        nbytes / (min(a10.spec.link_gbs, t4.spec.link_gbs) * 1e9) + 10e-6)
    # a CPU stage sends its hidden states in fp32, as its runtime holds them (the CPU's hop fit was timed on bytes)
    cpu = ClusterSpec.from_dict({"devices": [{"type": "CPU", "count": 2}]}).devices
    assert cm.activation_bytes("decode", 4, 100, cpu[0].spec) == 2 * nbytes
    assert cm.transfer_time(cpu[0], cpu[1], 0.5, "decode", 4, 100) == pytest.approx(
        2 * nbytes / (cpu[0].spec.link_gbs * 1e9) + 10e-6)

"""The profiler measures the runtime's own layer forward and writes a profile the cost model reads back."""

import functools
import threading

import pytest

from llmpq_serve import profiler
from llmpq_serve.costmodel import CostConfig, CostModel
from llmpq_serve.profile_table import HeadPoint, LayerShape, Profile
from llmpq_serve.profiler.timing import measure_round_robin
from llmpq_serve.runtime.kernel_revisions import KERNEL_REVISIONS
from llmpq_serve.spec import GPUSpec, ModelSpec

TINY = ModelSpec(name="tiny", arch="llama", layers=2, hidden=128, heads=4, kv_heads=2, ffn=256, vocab=300,
                 max_pos=256, tie=False)
GRID = profiler.Grid((1, 2), (8, 16), (1, 4), (8, 32))


@pytest.fixture(autouse=True)
def _short_router_steps(monkeypatch):
    """The router-step measurement at 8 steps a point instead of 64: it has its own test (test_profile_table), and
    at full length it took most of each profile here."""
    from llmpq_serve.profiler import ring_costs

    monkeypatch.setattr(profiler, "profile_step_overhead", functools.partial(ring_costs.profile_step_overhead, steps=8))


def test_profile_covers_the_grid_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr(profiler.ModelSpec, "resolve", staticmethod(lambda name: TINY))
    prof = profiler.run(["tiny"], device="cpu", grid=GRID, bits=(16, 4), threads=1, samples=3)
    assert prof.device_type == "CPU" and "median of 3 samples" in prof.method
    (table,) = prof.tables
    assert table.shape == LayerShape.of(TINY)
    assert len(table.points) == 2 * (2 * 2 + 2 * 2)
    assert table.kernels == {16: KERNEL_REVISIONS[16], 4: KERNEL_REVISIONS[4]} and not table.outdated_bits()
    assert all(p.p10_s <= p.median_s <= p.p90_s for p in table.points)
    hop = prof.transfer  # the ring's own hop: a loopback socket between two threads, both ways closed after
    assert hop is not None and hop.bytes_per_s > 0 and hop.latency_s > 0
    assert hop.seconds[-1] > hop.seconds[0] and hop.sizes == sorted(hop.sizes)
    assert not [t for t in threading.enumerate() if t.name == "profile-hop-echo"]
    assert [h.micro_batch for h in prof.heads] == [1, 4]
    prof.save(tmp_path / "CPU.json")
    again = Profile.load(tmp_path / "CPU.json")
    assert again == prof
    # the cost model reads it back for the CPU device, exactly at the grid points
    cost = CostModel(TINY, CostConfig(profiles_dir=tmp_path))
    cpu = GPUSpec.from_catalog("CPU")
    assert cost.latency_source(cpu) == "profile; 8/3-bit layers, which it lacks: roofline"  # profiled at (16, 4)
    p = table.points[0]
    assert cost.layer_time(cpu, p.bits, p.phase, p.micro_batch, p.seq) == p.median_s
    assert cost.head_time(cpu, 4) == prof.heads[1].median_s
    # the layer tables alone, timed again
    layers = profiler.run(["tiny"], device="cpu", grid=GRID, bits=(16, 4), threads=1, samples=3, extras=False)
    assert [t.shape for t in layers.tables] == [table.shape] and len(layers.tables[0].points) == len(table.points)
    assert not layers.heads and layers.transfer is None and not layers.step_overhead
    assert "decode step of one layer" in profiler.summary(prof)


def test_head_time_is_piecewise_linear_in_micro_batch():
    prof = Profile(device_type="X", device_name="x", torch="t", measured_at="now", tables=[],
                   heads=[HeadPoint(hidden=8, vocab=16, micro_batch=1, median_s=1.0),
                          HeadPoint(hidden=8, vocab=16, micro_batch=5, median_s=3.0)])
    assert prof.head_time(8, 16, 3) == 2.0
    assert prof.head_time(8, 32, 3) is None


def test_device_type_uses_ray_names():
    import torch

    assert profiler.detect_device_type(torch.device("cpu"))[0] == "CPU"


def test_samples_are_taken_round_robin_and_slow_points_take_fewer():
    """A slow spell of the machine must cost each point one sample, not every sample of a few neighbours."""
    import time

    import torch

    order = []

    def call(k, seconds=0.0):
        def fn():
            order.append(k)
            time.sleep(seconds)
        return fn

    class Bar:
        n = 0

        def update(self, k=1):
            self.n += k

    bar = Bar()
    calls = [call(0), call(1), call(2, seconds=0.11)]
    stats = measure_round_robin(calls, torch.device("cpu"), samples=5, sample_s=0.0, bar=bar)
    sampled = order[2 * len(calls):]  # after each call's warm-up and timing call
    assert sampled == [0, 1, 2] * 3 + [0, 1] * 2
    assert stats[2][0] >= 0.11 and all(p10 <= median <= p90 for median, p10, p90 in stats)
    assert bar.n == len(calls) * 5


def test_an_interrupted_profile_keeps_the_shapes_it_finished(tmp_path, monkeypatch, capsys):
    """`llmpq profile` writes each shape's table into the type's file as it finishes: a run cut short (Ctrl-C on a
    shape that takes minutes on a GPU) keeps what it measured, and the file's other shapes."""
    from llmpq_serve import cli

    other = TINY.model_copy(update={"name": "other", "hidden": 256, "ffn": 512})
    kept = TINY.model_copy(update={"name": "kept", "hidden": 64, "ffn": 128})
    models = {m.name: m for m in (TINY, other, kept)}
    monkeypatch.setattr(profiler.ModelSpec, "resolve", staticmethod(lambda name: models[name]))
    monkeypatch.setattr(profiler, "CPU_GRID", GRID)
    cli.main(["profile", "--model", "kept", "--device", "cpu", "--threads", "1", "--samples", "3",
              "--profiles", str(tmp_path)])
    measured = profiler.profile_shape

    def cut_short(shape, *args):
        if shape == LayerShape.of(other):
            raise KeyboardInterrupt
        return measured(shape, *args)

    monkeypatch.setattr(profiler, "profile_shape", cut_short)
    rc = cli.main(["profile", "--model", "tiny", "other", "--device", "cpu", "--threads", "1", "--samples", "3",
                   "--profiles", str(tmp_path)])
    assert rc == 130 and "holds the 1 shape table(s) this run finished" in capsys.readouterr().out
    saved = Profile.load(tmp_path / "CPU.json")
    assert [t.shape for t in saved.tables] == [LayerShape.of(TINY), LayerShape.of(kept)]
    assert "partial: 1 of 2 shapes" in saved.method
    assert saved.transfer is not None and saved.heads  # the earlier run's, kept
    assert not list(tmp_path.glob("*.partial"))


def test_a_quick_profile_goes_beside_the_full_one(tmp_path, monkeypatch):
    """A smoke test's small grid must not replace the tables the cost model reads."""
    from llmpq_serve import cli

    monkeypatch.setattr(profiler.ModelSpec, "resolve", staticmethod(lambda name: TINY))
    monkeypatch.setattr(profiler, "Grid", lambda *a: GRID)
    assert cli.main(["profile", "--model", "tiny", "--device", "cpu", "--threads", "1", "--samples", "3", "--quick",
                     "--profiles", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["CPU.quick.json"]


@pytest.mark.parametrize("cuda_name, ray_type", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100"), ("Tesla T4", "T4"), ("NVIDIA H200", "H200"),
    ("Tesla V100-SXM2-16GB", "V100"), ("NVIDIA A100-SXM4-40GB", "A100"), ("NVIDIA A10G", "A10G"),
    ("NVIDIA A800-SXM4-80GB", "A800"),  # was filed as profiles/80GB.json, which no plan reads
    ("NVIDIA RTX A6000", "RTX-A6000"),  # not in the catalog: Ray's own name
])
def test_a_profile_is_filed_under_the_type_ray_gives_the_gpu(cuda_name, ray_type):
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    assert profiler.ray_type_of(cuda_name) == ray_type
    assert NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(cuda_name) == ray_type


def test_a_points_spread_lies_within_its_samples():
    from llmpq_serve.profiler.timing import _spread

    median, p10, p90 = _spread([0.2, 0.6, 0.61])  # the exclusive quantiles gave p10 = -0.04
    assert 0.2 <= p10 <= median <= p90 <= 0.61


def test_the_summarys_bandwidth_bound_counts_the_floats_the_device_runs():
    """A CPU times 16-bit layers in fp32: int8 moves a quarter of their bytes, not half."""
    from llmpq_serve.profile_table import ProfilePoint, ShapeTable

    points = [ProfilePoint(bits=b, phase="decode", micro_batch=1, seq=16, median_s=1e-3) for b in (16, 8)]
    table = ShapeTable(shape=LayerShape.of(TINY), points=points)
    bounds = {}
    for device_type in ("CPU", "T4"):
        prof = Profile(device_type=device_type, device_name="x", torch="2", measured_at="now", tables=[table])
        (row,) = profiler.decode_speedups(prof, batches=(1,))
        bounds[device_type] = row["int8_bound"]
    assert bounds["T4"] == pytest.approx(2.0, rel=0.05) and bounds["CPU"] == pytest.approx(4.0, rel=0.05)

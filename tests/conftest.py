import contextlib
import os
from collections.abc import Iterator

import pytest

from llmpq_serve.spec import ClusterSpec, ModelSpec


@pytest.fixture
def bloom_like() -> ModelSpec:
    """BLOOM-176B-shaped layers (5 GB each at fp16) but only 5 of them: small enough to search exhaustively, big
    enough that memory forces quantisation on the small devices below."""
    return ModelSpec(name="bloom-5", arch="bloom", layers=5, hidden=14336, heads=112, kv_heads=112, ffn=57344,
                     vocab=250880, max_pos=2048, tie=True)


@pytest.fixture
def two_node() -> ClusterSpec:
    return ClusterSpec.from_dict({"name": "two", "devices": [{"type": "P100-PCIE-16GB", "count": 1},
                                                             {"type": "T4", "count": 1}]})


@pytest.fixture
def three_dev() -> ClusterSpec:
    return ClusterSpec.from_dict({"name": "three", "nodes": [
        {"name": "a", "devices": [{"type": "T4", "count": 2}]},
        {"name": "b", "devices": [{"type": "V100-SXM2-32GB", "count": 1}]}]})


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """These environment variables set (Ray processes started meanwhile inherit them), then as they were."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session", autouse=True)
def _test_environment(tmp_path_factory):
    """Quantized layers and indicators the tests make go to a temporary $LLMPQ_CACHE, not the user's ~/.cache. Ray
    gives its control store 30 s to come up, which a loaded 2-core CI machine once exceeded, failing a whole module
    at setup: 120 s here."""
    with environ(LLMPQ_CACHE=str(tmp_path_factory.mktemp("llmpq-cache")), RAY_gcs_server_port_wait_time_s="120"):
        yield


QUICK_DEMO = {"steps": 12, "train_chars": 200_000, "layers": 3}


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory):
    """A 3-layer demo model of each architecture, briefly trained, saved with its tokenizer: a real checkpoint to
    load by path. Built once per session."""
    from llmpq_serve import demo_model

    root = tmp_path_factory.mktemp("demo")
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = demo_model.build(arch, out_dir=root / arch, **QUICK_DEMO)
        return built[arch]

    return get


class StubTokenizer:
    """Enough of a tokenizer for a scheduler over a fake chain: no end-of-sequence token, every id decodes to ""."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return ""

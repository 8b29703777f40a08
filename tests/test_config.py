"""The serve config's own checks: what `serve run` refuses before any planning."""

import pytest
from pydantic import ValidationError

from llmpq_serve.config import ServeConfig


def test_a_misspelt_key_of_a_fixed_stage_is_refused():
    stage = {"accelerator_type": "T4", "layers": [0, 8], "bit": [4] * 8}
    with pytest.raises(ValidationError, match="bit"):
        ServeConfig(model="m", stages=[stage], prefill_micro_batch=1, decode_micro_batch=1)


def test_a_workload_longer_than_a_request_may_be_is_refused_by_its_fields():
    """Found at each of the planner actor's polls before, after `serve run` had said it deployed."""
    with pytest.raises(ValidationError, match=r"prompt_len 512 \+ gen_len 100 = 612 tokens is more than max_context 512"):
        ServeConfig(model="m", workload={"batch_size": 8})
    assert ServeConfig(model="m", workload={"batch_size": 8}, max_context=612).workload.max_len == 612
    stage = {"accelerator_type": "T4", "layers": [0, 8]}  # not planned: its workload is only its batch
    assert ServeConfig(model="m", stages=[stage], prefill_micro_batch=1, decode_micro_batch=1, max_context=64)


def test_theta_alone_weighs_quality_without_the_default_budget():
    assert ServeConfig(model="m").quality == "awq4"
    assert ServeConfig(model="m", theta=1.0).quality is None
    both = ServeConfig(model="m", theta=1.0, quality="int8")
    assert (both.theta, both.quality) == (1.0, "int8")
    for bad in (float("inf"), float("nan"), 1e25):
        with pytest.raises(ValidationError, match="theta"):
            ServeConfig(model="m", theta=bad)


def test_a_baseline_method_with_a_quality_target_is_refused():
    """uniform and pipeedge pick the highest bits that fit: an awq4 target beside them served an all-3-bit model."""
    for target in ({"quality": "awq4"}, {"theta": 1.0}):
        with pytest.raises(ValidationError, match="method pipeedge chooses its own bit-widths"):
            ServeConfig(model="m", method="pipeedge", **target)
    assert ServeConfig(model="m", method="uniform").method == "uniform"

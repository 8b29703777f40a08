"""The serve configuration (the `args:` of a Serve config file), validated with pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmpq_serve import catalog
from llmpq_serve.costmodel import SUPPORTED_BITS
from llmpq_serve.spec import ClusterSpec, Workload

if TYPE_CHECKING:
    from llmpq_serve.runtime.scheduler import SchedulerOptions

DEMO_MODELS = {"demo-llama": "llama", "demo-opt": "opt"}
# the planner's methods (`llmpq_serve.planner.METHODS`), named here so that a config and the CLI's parser are checked
# without importing the solver stack
PlanMethod = Literal["llmpq", "uniform", "pipeedge", "llmpq_no_adabits", "llmpq_no_phase", "llmpq_fast"]
PLAN_METHODS: tuple[str, ...] = get_args(PlanMethod)
BASELINE_METHODS = ("uniform", "pipeedge")  # they pick their bits by their own rule, whatever the quality target
# far above any useful weight of quality against latency; beyond ~1e20 the solver reads the costs as unbounded and
# says nothing fits
MAX_THETA = 1e6
# a quality target by name: no worse than the whole model in that format (its bits)
QualityName = Literal["fp16", "int8", "awq4", "awq3"]
NAMED_TARGETS: dict[str, int] = dict(zip(get_args(QualityName), (16, 8, 4, 3), strict=True))


class FixedStage(BaseModel):
    """A stage given by hand instead of planned."""

    model_config = ConfigDict(extra="forbid")

    accelerator_type: str
    layers: tuple[int, int]
    bits: list[int] | None = None  # default: 16 for every layer

    @model_validator(mode="after")
    def _layers_and_their_bits(self) -> FixedStage:
        first, end = self.layers
        if not 0 <= first < end:
            raise ValueError(f"layers {list(self.layers)}: give [first, end) with 0 <= first < end")
        if self.bits is not None:
            if len(self.bits) != end - first:
                raise ValueError(f"{len(self.bits)} bit-widths for the {end - first} layers [{first}, {end})")
            if unknown := sorted(set(self.bits) - set(SUPPORTED_BITS)):
                raise ValueError(f"bit-widths {unknown}: the runtime has {', '.join(map(str, SUPPORTED_BITS))}")
        return self


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="checkpoint directory, or demo-llama / demo-opt (trained on first use)")
    cluster: str = Field("ray", description="'ray' (the live cluster's GPUs) or a cluster YAML")
    gpu_variants: dict[str, str] = Field(
        default_factory=dict, description="with cluster: ray, which catalog GPU an accelerator_type is where the "
        "catalog has several ({A100: A100-SXM4-80GB}; Ray does not tell them apart). Default: the one with the least "
        "memory, so that a plan always fits")
    inter_node_gbs: float = Field(3.0, gt=0, description="with cluster: ray, the bandwidth between nodes, GB/s per "
                                  "direction (a cluster YAML gives its own)")
    quality: QualityName | None = Field(
        "awq4", description="no worse than the whole model at this format (the planner's quality budget)")
    theta: float | None = Field(None, ge=0, le=MAX_THETA, allow_inf_nan=False,
                                description="weight of quality against latency (instead of quality)")
    method: PlanMethod = "llmpq"
    workload: Workload = Field(default_factory=lambda: Workload(batch_size=16, prompt_len=64, gen_len=64))
    max_context: int = Field(512, gt=0, description="prompt + max_tokens of one request")
    max_queue: int = Field(256, gt=0, description="waiting requests beyond which the router answers 429")
    mixed_steps: bool = Field(False, description="prefills ride along with decode steps (less compute, more latency)")
    prefill_chunk_tokens: int | None = Field(
        None, gt=0, description="prompt tokens per prefill micro-batch: a long prompt is prefilled in pieces between "
        "decode steps instead of holding them up (default: whole prompts)")
    prefill_wait_ms: float = Field(
        5.0, ge=0, description="how long a prefill micro-batch short of the planned size may wait for more requests "
        "while the pipeline has room for it: a burst then goes in as planned instead of its first request alone")
    replan_poll_s: float = Field(5.0, gt=0, description="how often the planner looks at the cluster's GPU nodes")
    recovery_timeout_s: float = Field(
        300.0, gt=0, description="how long requests wait for lost stages to come back or be re-planned before failing")
    plan_time_limit: float = Field(10.0, gt=0)
    quant_method: Literal["awq", "rtn"] = "awq"
    group_size: int = Field(128, gt=0)
    stages: list[FixedStage] | None = Field(None, min_length=1, description="fixed stages instead of a plan")
    prefill_micro_batch: int | None = Field(None, gt=0, description="with fixed stages")
    decode_micro_batch: int | None = Field(None, gt=0, description="with fixed stages")

    @field_validator("gpu_variants")
    @classmethod
    def _variants_of_their_type(cls, variants: dict[str, str]) -> dict[str, str]:
        for ray_type, gpu in variants.items():
            names = catalog.gpus_for_ray_type(ray_type)
            if not names:
                raise ValueError(f"the GPU catalog has no accelerator_type {ray_type!r}")
            if gpu not in names:
                raise ValueError(f"{gpu!r} is not a catalog GPU of accelerator_type {ray_type!r}; choose from "
                                 f"{', '.join(names)}")
        return variants

    @model_validator(mode="before")
    @classmethod
    def _quality_target_as_given(cls, data: Any) -> Any:
        """What the config says of quality, not the defaults: `theta` alone weighs quality against latency, without
        the default budget beside it (both given: the budget and the weight); and a baseline, which picks its own
        bits, takes neither."""
        if not isinstance(data, dict):
            return data
        if data.get("method") in BASELINE_METHODS and {"quality", "theta"} & set(data):
            raise ValueError(f"method {data['method']} chooses its own bit-widths (the highest that fit) and would "
                             "ignore quality and theta: drop them, or use method llmpq")
        if data.get("theta") is not None and "quality" not in data:
            return {**data, "quality": None}
        return data

    @model_validator(mode="after")
    def _fixed_stages_are_complete(self) -> ServeConfig:
        if self.stages is not None and (self.prefill_micro_batch is None or self.decode_micro_batch is None):
            raise ValueError("fixed stages need prefill_micro_batch and decode_micro_batch too")
        return self

    @model_validator(mode="after")
    def _workload_fits_a_request(self) -> ServeConfig:
        """The planner sizes the KV cache for `max_context` tokens a request and plans for the workload's requests:
        found here rather than at each of the planner's polls (fixed stages are not planned: only the workload's
        batch size counts for them)."""
        w = self.workload
        if self.stages is None and w.max_len > self.max_context:
            raise ValueError(f"workload: prompt_len {w.prompt_len} + gen_len {w.gen_len} = {w.max_len} tokens is more "
                             f"than max_context {self.max_context}: raise max_context or shorten the workload")
        return self

    def scheduling(self) -> SchedulerOptions:
        from llmpq_serve.runtime.scheduler import SchedulerOptions  # the config stays importable without torch

        return SchedulerOptions(max_queue=self.max_queue, mixed_steps=self.mixed_steps,
                                recovery_s=self.recovery_timeout_s, prefill_chunk=self.prefill_chunk_tokens,
                                prefill_wait_s=self.prefill_wait_ms / 1e3)

    def cluster_spec(self) -> ClusterSpec:
        """The cluster to plan for: the live Ray cluster's alive GPU nodes as they are now, or the cluster file."""
        if self.cluster == "ray":
            return ClusterSpec.from_ray(self.gpu_variants, self.inter_node_gbs)
        return ClusterSpec.from_yaml(self.cluster)

    def checkpoint(self) -> Path:
        """The model's directory; the demo models are trained here on first use."""
        if self.model in DEMO_MODELS:
            from llmpq_serve import demo_model

            return demo_model.build(DEMO_MODELS[self.model])
        path = Path(self.model).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"model {self.model!r}: no config.json there; give a checkpoint directory or one of "
                             f"{', '.join(DEMO_MODELS)}")
        return path

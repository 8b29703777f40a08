"""What the planner plans for: the model's shape, the cluster's devices, the workload."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmpq_serve import catalog
from llmpq_serve.validation import naming, yaml_mapping

Arch = Literal["llama", "qwen2", "opt", "bloom"]
_LLAMA_FAMILY = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


class GPUSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    ray_type: str | None
    memory_gib: float
    mem_bw_gbs: float
    fp16_tflops: float
    int8_tops: float | None = None
    link_gbs: float
    sm: int = Field(0, description="compute capability x 10 (75 for a T4); 0 for the CPU")

    @classmethod
    def from_catalog(cls, name: str) -> GPUSpec:
        table = catalog.gpu_table()
        if name not in table:
            raise ValueError(f"unknown GPU type {name!r}; known: {', '.join(sorted(table))}")
        fields = {k: v for k, v in table[name].items() if k in cls.model_fields}
        return cls(name=name, **fields)


def _catalog_gpu(name: str) -> str:
    """`name`, a catalog GPU (a ValueError listing the known ones otherwise)."""
    GPUSpec.from_catalog(name)
    return name


class ModelSpec(BaseModel):
    """Shape of a decoder-only transformer: all the cost model needs to know about a model."""

    model_config = ConfigDict(frozen=True)

    name: str
    arch: Arch
    layers: int = Field(gt=0)
    hidden: int = Field(gt=0)
    heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    ffn: int = Field(gt=0)
    vocab: int = Field(gt=0)
    max_pos: int = Field(gt=0)
    tie: bool = False
    head_size: int | None = Field(None, gt=0, description=(
        "each head's width where the config sets it apart from hidden / heads (Mistral-Nemo: 128 with hidden 5120 "
        "and 32 heads); None: hidden / heads"))

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSpec:
        if (self.head_size is None and self.hidden % self.heads) or self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: hidden {self.hidden}, heads {self.heads}, kv_heads {self.kv_heads} "
                             "must divide evenly")
        return self

    @classmethod
    def from_catalog(cls, name: str) -> ModelSpec:
        table = catalog.model_table()
        if name not in table:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(table))} "
                             "(or give a checkpoint path)")
        return cls(name=name, **table[name])

    @classmethod
    def from_hf_config(cls, config: Any, name: str | None = None) -> ModelSpec:
        kind = config.model_type
        name = name or getattr(config, "_name_or_path", "") or kind
        if kind in _LLAMA_FAMILY:
            heads = config.num_attention_heads
            head_size = getattr(config, "head_dim", None)  # as the runtime reads it (runtime/layers.py head_dim_of)
            return cls(name=name, arch=_LLAMA_FAMILY[kind], layers=config.num_hidden_layers,
                       hidden=config.hidden_size, heads=heads,
                       kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                       ffn=config.intermediate_size, vocab=config.vocab_size,
                       max_pos=config.max_position_embeddings, tie=bool(config.tie_word_embeddings),
                       head_size=head_size if head_size and head_size * heads != config.hidden_size else None)
        if kind == "opt":
            return cls(name=name, arch="opt", layers=config.num_hidden_layers, hidden=config.hidden_size,
                       heads=config.num_attention_heads, kv_heads=config.num_attention_heads, ffn=config.ffn_dim,
                       vocab=config.vocab_size, max_pos=config.max_position_embeddings,
                       tie=bool(getattr(config, "tie_word_embeddings", True)))
        if kind == "bloom":
            # BLOOM uses ALiBi and has no position limit of its own; 2048 is its training length.
            return cls(name=name, arch="bloom", layers=config.n_layer, hidden=config.hidden_size,
                       heads=config.n_head, kv_heads=config.n_head, ffn=4 * config.hidden_size,
                       vocab=config.vocab_size, max_pos=getattr(config, "seq_length", 2048) or 2048, tie=True)
        raise ValueError(f"unsupported architecture {kind!r}: llmpq-serve handles llama, mistral, qwen2, opt, bloom")

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ModelSpec:
        """Reads config.json only; no weights are touched."""
        from transformers import AutoConfig

        return cls.from_hf_config(AutoConfig.from_pretrained(str(path)), name=str(path))

    @classmethod
    def resolve(cls, name_or_path: str) -> ModelSpec:
        if name_or_path in catalog.model_table():
            return cls.from_catalog(name_or_path)
        if Path(name_or_path, "config.json").is_file():
            return cls.from_checkpoint(name_or_path)
        if Path(name_or_path).is_dir():
            raise ValueError(f"{name_or_path} holds no config.json: give a Hugging Face checkpoint directory or a "
                             f"catalog name ({', '.join(sorted(catalog.model_table()))})")
        return cls.from_catalog(name_or_path)  # raises with the list of known names

    # ---- derived shapes -------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        """The query projection's width (the hidden size but where `head_size` says otherwise)."""
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def gated_mlp(self) -> bool:
        return self.arch in ("llama", "qwen2")

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out_features, in_features) of every matrix of one decoder layer: the weights that get quantized."""
        h, q, kv, f = self.hidden, self.q_dim, self.kv_dim, self.ffn
        attn = [(q, h), (kv, h), (kv, h), (h, q)]
        mlp = [(f, h), (f, h), (h, f)] if self.gated_mlp else [(f, h), (h, f)]
        return attn + mlp

    @property
    def linear_params(self) -> int:
        return sum(o * i for o, i in self.linear_shapes())

    @property
    def layer_extra_params(self) -> int:
        """Norms and biases of one decoder layer; they stay in 16 bits."""
        h, kv, f = self.hidden, self.kv_dim, self.ffn
        if self.arch in ("opt", "bloom"):
            return 4 * h + (2 * h + 2 * kv) + (f + h)  # 2 LayerNorms (w+b), q/k/v/o biases, MLP biases
        return 2 * h + (self.q_dim + 2 * kv if self.arch == "qwen2" else 0)

    @property
    def embedding_params(self) -> int:
        extra = {"opt": (self.max_pos + 2) * self.hidden, "bloom": 2 * self.hidden}.get(self.arch, 0)
        return self.vocab * self.hidden + extra

    @property
    def head_params(self) -> int:
        """Final norm and LM head (held by the last stage even when tied to the embedding)."""
        return self.vocab * self.hidden + 2 * self.hidden


class Workload(BaseModel):
    """A batch of requests: `batch_size` prompts of `prompt_len` tokens, each generating `gen_len` tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_size: int = Field(default=32, gt=0)
    prompt_len: int = Field(default=512, gt=0)
    gen_len: int = Field(default=100, gt=0)

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.gen_len


def slot_count(max_batch: int, decode_micro_batch: int) -> int:
    """KV-cache slots for `max_batch` concurrent requests: whole groups of one decode micro-batch each."""
    return math.ceil(max_batch / decode_micro_batch) * decode_micro_batch


def accelerator_types(resources: dict[str, float]) -> list[str]:
    """The GPU types a Ray node's resources declare, as `accelerator_type:<TYPE>` keys."""
    return [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]


class DeviceSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    node: str
    gpu: str

    _known = field_validator("gpu")(_catalog_gpu)

    @property
    def spec(self) -> GPUSpec:
        return GPUSpec.from_catalog(self.gpu)


class DeviceGroup(BaseModel):
    """`count` devices of the catalog GPU `type`."""

    model_config = ConfigDict(extra="forbid")

    type: str
    count: int = Field(default=1, gt=0)

    # here too, so that the error names the file's key (nodes.0.devices.0.type)
    _known = field_validator("type")(_catalog_gpu)


class NodeGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, description="default: node<i>, by its place in the list")
    devices: list[DeviceGroup]


class ClusterFile(BaseModel):
    """A cluster YAML: `nodes: [{name, devices: [{type, count}]}]`, or the short form `devices: [{type, count}]` in
    which each device type sits on a node of its own (the paper's clusters)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "cluster"
    inter_node_gbs: float = Field(default=3.0, gt=0, description="bandwidth between nodes, GB/s per direction")
    nodes: list[NodeGroup] | None = None
    devices: list[DeviceGroup] | None = None


class ClusterSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = "cluster"
    devices: list[DeviceSpec]
    inter_node_gbs: float = Field(default=3.0, gt=0, description="bandwidth between nodes, GB/s per direction")

    @model_validator(mode="after")
    def _non_empty(self) -> ClusterSpec:
        if not self.devices:
            raise ValueError(f"cluster {self.name!r} has no devices")
        ids = [d.id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"cluster {self.name!r}: duplicate device ids")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterSpec:
        """A cluster file's contents (see `ClusterFile`); a wrong or missing key is a ValueError naming it."""
        file = ClusterFile.model_validate(data)
        if (file.nodes is None) == (file.devices is None):
            raise ValueError(f"cluster {file.name!r}: give either `nodes: [{{name, devices: [{{type, count}}]}}]` or "
                             "`devices: [{type, count}]`, not both or neither")
        nodes = file.nodes
        if nodes is None:
            nodes = [NodeGroup(name=f"node{i}-{g.type}", devices=[g]) for i, g in enumerate(file.devices)]
        devices = []
        names = [node.name or f"node{i}" for i, node in enumerate(nodes)]
        if repeated := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"cluster {file.name!r}: node name(s) {', '.join(repeated)} given more than once (a node "
                             "without a name is node<i>, i its place in the list): each node needs a name of its own")
        for name, node in zip(names, nodes, strict=True):
            numbered: Counter = Counter()  # a node may list one type in several groups
            for group in node.devices:
                for _ in range(group.count):
                    devices.append(DeviceSpec(id=f"{name}/{group.type}#{numbered[group.type]}", node=name,
                                              gpu=group.type))
                    numbered[group.type] += 1
        return cls(name=file.name, devices=devices, inter_node_gbs=file.inter_node_gbs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterSpec:
        """A cluster file; what is wrong in one is a ValueError that names the file."""
        data = yaml_mapping(path, "cluster file")
        with naming(path, "cluster file"):
            return cls.from_dict({"name": Path(path).stem, **data})

    @classmethod
    def from_ray(cls, gpu_overrides: dict[str, str] | None = None, inter_node_gbs: float = 3.0) -> ClusterSpec:
        """The live Ray cluster: every alive node's GPUs, typed by its `accelerator_type:<TYPE>` resource.

        Ray reports a type (A100) but not the variant (40 or 80 GB): by default the smallest-memory variant of the
        catalog is assumed, so a plan always fits; `gpu_overrides` ({"A100": "A100-SXM4-80GB"}) says otherwise."""
        import ray

        overrides = gpu_overrides or {}
        devices: list[DeviceSpec] = []
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            res = node.get("Resources", {})
            types = accelerator_types(res)
            count = int(res.get("GPU", 0))
            if not types or not count:
                continue
            ray_type = types[0]
            gpu = overrides.get(ray_type) or next(iter(catalog.gpus_for_ray_type(ray_type)), None)
            if gpu is None:
                raise ValueError(f"node {node['NodeID'][:8]} reports accelerator_type {ray_type!r}, which the GPU "
                                 "catalog does not know; add it to llmpq_serve/catalog/gpus.yaml or pass an override")
            node_name = node["NodeID"][:12]
            devices += [DeviceSpec(id=f"{node_name}/{ray_type}#{i}", node=node_name, gpu=gpu) for i in range(count)]
        return cls(name="ray", devices=devices, inter_node_gbs=inter_node_gbs)

    def summary(self) -> str:
        counts = Counter(d.gpu for d in self.devices)
        return " + ".join(f"{n}x{g}" for g, n in counts.items())

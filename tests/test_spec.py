"""Catalog, ModelSpec from every source, ClusterSpec from YAML and from a live Ray cluster."""

import pytest
import yaml

from llmpq_serve import catalog
from llmpq_serve.spec import ClusterSpec, GPUSpec, ModelSpec


def test_catalog_is_complete():
    for name in catalog.gpu_table():
        spec = GPUSpec.from_catalog(name)
        assert spec.memory_gib > 0 and spec.mem_bw_gbs > 0 and spec.fp16_tflops > 0, name
    for name in ("opt-30b", "bloom-176b", "llama-2-70b", "llama-3-8b", "mistral-7b", "qwen2.5-72b"):
        m = ModelSpec.from_catalog(name)
        assert m.layers > 0 and m.linear_params > 0
    assert catalog.gpus_for_ray_type("A100")[0] == "A100-SXM4-40GB"
    # of the same memory, the slowest first: a plan for it holds on the faster variant, not the other way round
    assert catalog.gpus_for_ray_type("H100")[0] == "H100-PCIE-80GB"
    assert catalog.gpus_for_ray_type("V100")[0] == "V100-PCIE-16GB"
    # named as Ray names them: an NVIDIA A10 is Ray's A10, AWS's A10G its own
    assert catalog.gpus_for_ray_type("A10") == ["A10"] and catalog.gpus_for_ray_type("A10G") == ["A10G"]
    assert catalog.gpus_for_ray_type("GeForce-RTX-3090") == ["RTX-3090"]


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'gpt-9'.*opt-30b"):
        ModelSpec.from_catalog("gpt-9")
    with pytest.raises(ValueError, match="unknown GPU type 'Z80'"):
        ClusterSpec.from_dict({"devices": [{"type": "Z80", "count": 1}]})


def test_shapes_from_catalog():
    m = ModelSpec.from_catalog("llama-3-70b")
    assert (m.head_dim, m.kv_dim) == (128, 1024)
    assert m.linear_params == 2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 8192 * 28672
    opt = ModelSpec.from_catalog("opt-30b")
    assert opt.linear_params == 4 * 7168 * 7168 + 2 * 7168 * 28672


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "opt", "bloom"])
def test_model_spec_from_hf_config_and_checkpoint(kind, tmp_path):
    from transformers import AutoConfig

    kwargs = {"llama": dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                            intermediate_size=512, vocab_size=1000, max_position_embeddings=128),
              "mistral": dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                              intermediate_size=512, vocab_size=1000, max_position_embeddings=128),
              "qwen2": dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                            intermediate_size=512, vocab_size=1000, max_position_embeddings=128),
              "opt": dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=8, ffn_dim=512, vocab_size=1000,
                          max_position_embeddings=128, word_embed_proj_dim=256),
              "bloom": dict(hidden_size=256, n_layer=3, n_head=8, vocab_size=1000)}[kind]
    config = AutoConfig.for_model(kind, **kwargs)
    spec = ModelSpec.from_hf_config(config, name="x")
    assert (spec.layers, spec.hidden, spec.heads) == (3, 256, 8)
    assert spec.ffn == (1024 if kind == "bloom" else 512)
    assert spec.kv_heads == (2 if kind in ("llama", "mistral", "qwen2") else 8)
    config.save_pretrained(tmp_path)  # a checkpoint directory without weights: only config.json is read
    assert ModelSpec.resolve(str(tmp_path)).model_dump(exclude={"name"}) == spec.model_dump(exclude={"name"})


def test_unsupported_architecture():
    from transformers import AutoConfig

    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        ModelSpec.from_hf_config(AutoConfig.for_model("gpt2"))


def test_cluster_yaml_both_forms(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"inter_node_gbs": 12.5, "nodes": [
        {"name": "n1", "devices": [{"type": "T4", "count": 2}, {"type": "A10", "count": 1}]},
        {"name": "n2", "devices": [{"type": "V100-SXM2-32GB", "count": 1}]}]}))
    c = ClusterSpec.from_yaml(path)
    assert [d.gpu for d in c.devices] == ["T4", "T4", "A10", "V100-SXM2-32GB"]
    assert [d.node for d in c.devices] == ["n1", "n1", "n1", "n2"] and c.inter_node_gbs == 12.5
    short = ClusterSpec.from_dict({"devices": [{"type": "T4", "count": 3}, {"type": "V100-SXM2-32GB", "count": 1}]})
    assert len({d.node for d in short.devices}) == 2 and c.summary() == "2xT4 + 1xA10 + 1xV100-SXM2-32GB"


def test_a_node_may_list_one_type_in_several_groups():
    c = ClusterSpec.from_dict({"nodes": [{"name": "n", "devices": [{"type": "T4"}, {"type": "A10"},
                                                                    {"type": "T4", "count": 2}]}]})
    assert [d.id for d in c.devices] == ["n/T4#0", "n/A10#0", "n/T4#1", "n/T4#2"]


def test_cluster_file_mistakes_are_errors_that_name_them():
    """A cluster file is user input: every mistake is a ValueError (the CLI prints it) saying where, never a
    KeyError from deep inside."""
    unnamed = ClusterSpec.from_dict({"nodes": [{"devices": [{"type": "T4"}]}, {"devices": [{"type": "A10"}]}]})
    assert [d.node for d in unnamed.devices] == ["node0", "node1"]
    for bad, says in [({"nodes": [{"devices": [{"count": 2}]}]}, "type"),
                      ({"devices": [{"type": "T4", "cuont": 2}]}, "cuont"),
                      ({"devices": [{"type": "T4", "count": 0}]}, "count"),
                      ({"device": [{"type": "T4"}]}, "device"),
                      ({"nodes": [], "devices": [{"type": "T4"}]}, "not both or neither")]:
        with pytest.raises(ValueError, match=says):
            ClusterSpec.from_dict(bad)


def test_empty_cluster_is_an_error():
    with pytest.raises(ValueError, match="has no devices"):
        ClusterSpec.from_dict({"name": "void", "devices": []})


def test_cluster_from_live_ray_cluster():
    """Two Ray nodes declaring logical GPUs and accelerator_type resources, as in the CPU demo and tests."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1, num_gpus=2, resources={"accelerator_type:T4": 1})
        cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:A100": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        spec = ClusterSpec.from_ray()
        assert sorted(d.gpu for d in spec.devices) == ["A100-SXM4-40GB", "T4", "T4"]
        assert len({d.node for d in spec.devices}) == 2
        override = ClusterSpec.from_ray(gpu_overrides={"A100": "A100-SXM4-80GB"})
        assert "A100-SXM4-80GB" in {d.gpu for d in override.devices}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_node_name_given_twice_is_refused_by_name():
    """Merged into one node, the two nodes' hop was priced as a PCIe link instead of the network."""
    data = {"nodes": [{"devices": [{"type": "T4", "count": 2}]},
                      {"name": "node0", "devices": [{"type": "V100-SXM2-32GB", "count": 1}]}], "inter_node_gbs": 3}
    with pytest.raises(ValueError, match="node name.s. node0 given more than once"):
        ClusterSpec.from_dict(data)


def test_a_misspelt_workload_key_is_refused():
    from pydantic import ValidationError

    from llmpq_serve.spec import Workload

    with pytest.raises(ValidationError, match="batch"):
        Workload.model_validate({"batch": 4})


def test_a_config_that_sets_its_head_width_is_costed_with_it():
    """Mistral-Nemo's heads are 128 wide with hidden 5120 and 32 heads: derived from hidden / heads, its weights came
    out 4.8% and its KV cache 25% larger than the runtime holds."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=32, num_hidden_layers=1, vocab_size=128)
    spec = ModelSpec.from_hf_config(config, name="wide-heads")
    assert (spec.head_dim, spec.q_dim, spec.kv_dim) == (32, 128, 64)
    layer = MistralForCausalLM(config).model.layers[0]
    held = {name: tuple(m.weight.shape) for name, m in layer.named_modules()
            if hasattr(m, "weight") and m.weight.dim() == 2}
    assert sorted(held.values()) == sorted(spec.linear_shapes())
    # a config whose head_dim is hidden / heads anyway keeps the derived one
    plain = ModelSpec.from_hf_config(MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=16, num_hidden_layers=1, vocab_size=128))
    assert plain.head_size is None and plain.head_dim == 16

"""The demo model recipe end to end, shortened: split, tokenizer, training, save_pretrained, reuse, determinism."""

import json

import pytest
import torch

from llmpq_serve import demo_model
from llmpq_serve.spec import ModelSpec

QUICK = {"steps": 12, "train_chars": 200_000, "layers": 2}


def test_stdlib_split_is_disjoint_and_fixed():
    train, held = demo_model.stdlib_files()
    assert train and held and not set(train) & set(held)
    assert len(held) < len(train) / 10
    assert demo_model.stdlib_files() == (train, held)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_build_saves_a_loadable_checkpoint_and_reuses_it(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo_model.build(arch, out_dir=tmp_path / arch, **QUICK)
    meta = json.loads((path / "demo.json").read_text())
    assert meta["held_out_ppl"] < meta["random_init_ppl"]
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert ModelSpec.from_checkpoint(path).arch == arch
    ids = tokenizer("def main():\n    return 0\n", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape[-1] == len(tokenizer)
    stamp = (path / "model.safetensors").stat().st_mtime
    assert demo_model.build(arch, out_dir=tmp_path / arch, **QUICK) == path  # same recipe: reused
    assert (path / "model.safetensors").stat().st_mtime == stamp


def test_training_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    a = demo_model.build("llama", out_dir=tmp_path / "a", **QUICK)
    b = demo_model.build("llama", out_dir=tmp_path / "b", **QUICK)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

"""The demo models: small causal LMs trained here, deterministically, on the Python standard library's sources.

No weights can be downloaded, and a random-weight model says nothing about quality, so `llmpq demo-model` trains a
Llama-architecture and an OPT-architecture model of a few million parameters with a byte-level BPE tokenizer, saves
each with `save_pretrained` under $LLMPQ_CACHE (default ~/.cache/llmpq), and everything else loads them by path like
any HF checkpoint. Files are split into train and held-out by a hash of their path."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

EOS = "<|endoftext|>"
SEED = 1234


def cache_dir() -> Path:
    return Path(os.environ.get("LLMPQ_CACHE", Path.home() / ".cache" / "llmpq"))


@dataclass(frozen=True)
class Recipe:
    arch: str  # "llama" or "opt"
    layers: int = 8
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 768
    vocab: int = 512
    # Many small steps beat few large ones at this budget: 600 steps of 8 x 64 tokens reach a held-out perplexity
    # of ~67 in ~2.3 min on 2 cores, where 150 steps of 16 x 128 tokens were still at ~350.
    seq_len: int = 64
    batch: int = 8
    steps: int = 600
    lr: float = 3e-3
    train_chars: int = 3_000_000

    @property
    def name(self) -> str:
        return f"demo-{self.arch}"


RECIPES = {"llama": Recipe("llama"), "opt": Recipe("opt", ffn=1024, kv_heads=8, steps=400)}


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(train, held-out) source files of this Python's standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts]
    # ordered by a hash of the path: a fixed order that mixes packages, so any prefix is a fair sample
    key = {p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest() for p in files}
    files.sort(key=key.get)
    held = [p for p in files if int(key[p], 16) % 20 == 0]
    train = [p for p in files if int(key[p], 16) % 20 != 0]
    return train, held


def read_texts(files: list[Path], max_chars: int) -> list[str]:
    texts, total = [], 0
    for p in files:
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        total += len(t)
        if total >= max_chars:
            break
    return texts


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=EOS)


def encode(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def build_config(recipe: Recipe, tokenizer):
    from transformers import LlamaConfig, OPTConfig

    eos = tokenizer.eos_token_id
    if recipe.arch == "llama":
        return LlamaConfig(vocab_size=len(tokenizer), hidden_size=recipe.hidden, intermediate_size=recipe.ffn,
                           num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                           num_key_value_heads=recipe.kv_heads, max_position_embeddings=1024,
                           tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    return OPTConfig(vocab_size=len(tokenizer), hidden_size=recipe.hidden, ffn_dim=recipe.ffn,
                     num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, max_position_embeddings=1024,
                     word_embed_proj_dim=recipe.hidden, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def batches(data: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
        yield torch.stack([data[s:s + seq_len + 1] for s in starts])


@torch.no_grad()
def perplexity(model, data: torch.Tensor, seq_len: int = 128, max_windows: int = 64) -> float:
    """exp(mean next-token loss) over consecutive held-out windows."""
    model.eval()
    n = min(max_windows, (len(data) - 1) // seq_len)
    windows = torch.stack([data[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])
    losses = []
    for chunk in windows.split(16):
        out = model(input_ids=chunk[:, :-1], labels=chunk[:, :-1].clone())
        losses.append(out.loss.item() * len(chunk))
    return math.exp(sum(losses) / n)


def held_out_tokens(tokenizer, max_chars: int = 400_000) -> torch.Tensor:
    return encode(tokenizer, read_texts(stdlib_files()[1], max_chars))


def load_meta(path: Path) -> dict:
    """What training recorded: recipe, held-out and random-init perplexity, parameter count, seconds."""
    return json.loads((Path(path) / "demo.json").read_text())


def build(arch: str, out_dir: Path | None = None, force: bool = False, **overrides) -> Path:
    """Trains (or reuses, when one with the same recipe exists) the demo model of `arch`; returns its checkpoint
    directory. `overrides` change recipe fields (tests train a few steps on less text)."""
    from transformers import AutoModelForCausalLM

    recipe = Recipe(**{**asdict(RECIPES[arch]), **overrides})
    path = out_dir or cache_dir() / recipe.name
    ready = (path / "config.json").is_file() and (path / "demo.json").is_file()
    if ready and not force and load_meta(path)["recipe"] == asdict(recipe):
        return path
    torch.manual_seed(SEED)
    start = time.perf_counter()
    train_files, _ = stdlib_files()
    texts = read_texts(train_files, recipe.train_chars)
    tokenizer = train_tokenizer(texts, recipe.vocab)
    data = encode(tokenizer, texts)
    held = held_out_tokens(tokenizer)
    model = AutoModelForCausalLM.from_config(build_config(recipe, tokenizer))
    random_ppl = perplexity(model, held)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, recipe.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / recipe.steps))))
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    stream = batches(data, recipe.seq_len, recipe.batch, gen)
    bar = tqdm(range(recipe.steps), desc=f"training {recipe.name}", unit="step")
    for _ in bar:
        chunk = next(stream)
        loss = model(input_ids=chunk[:, :-1], labels=chunk[:, :-1].clone()).loss  # HF shifts labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    ppl = perplexity(model, held)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    meta = {"recipe": asdict(recipe), "held_out_ppl": ppl, "random_init_ppl": random_ppl,
            "params": sum(p.numel() for p in model.parameters()), "train_tokens": recipe.steps * recipe.batch
            * recipe.seq_len, "seconds": time.perf_counter() - start, "torch": torch.__version__}
    (path / "demo.json").write_text(json.dumps(meta, indent=1))
    return path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmpq_serve.runtime.sampling import Detokenizer, SamplingParams, make_generator, sample


def draws(logits: torch.Tensor, n: int, **kw) -> torch.Tensor:
    """n tokens for the single row `logits`, all drawn from one seeded generator."""
    p = SamplingParams(seed=0, **kw)
    return torch.tensor(sample(logits.expand(n, -1), [p] * n, [make_generator(p)] * n))


def test_greedy_is_argmax_and_ties_take_lowest_index():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)).bfloat16()
    logits[0, 7] = logits[0, 30] = 10.0
    p = SamplingParams(temperature=0)
    assert sample(logits, [p] * 6, [None] * 6) == logits.float().argmax(-1).tolist()
    assert sample(logits, [p] * 6, [None] * 6)[0] == 7


@pytest.mark.parametrize("temperature", [0.1, 1.0, 2.0])
def test_top_k_one_and_tiny_top_p_are_greedy(temperature):
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(2))
    greedy = logits.argmax(-1).tolist()
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        ps = [SamplingParams(temperature=temperature, seed=i, **kw) for i in range(8)]
        assert sample(logits, ps, [make_generator(p) for p in ps]) == greedy


@pytest.mark.parametrize("kw", [{"temperature": 1e-39}, {"temperature": 1e-300}, {"top_p": 1e-300},
                                {"temperature": 1e-30, "top_p": 1e-300}])
def test_extreme_temperature_and_top_p_are_greedy_not_an_error(kw):
    """Values a request may send that overflow or underflow in float32: without the care taken, inf/NaN
    probabilities or an all-masked row, on which torch.multinomial raises."""
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(5)) * 30
    ps = [SamplingParams(seed=i, **kw) for i in range(8)]
    assert sample(logits, ps, [make_generator(p) for p in ps]) == logits.argmax(-1).tolist()


def test_a_row_no_token_can_be_drawn_from_is_none_and_its_batch_mates_are_drawn_as_alone():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(6))
    logits[1, 7], logits[2, 3], logits[3] = float("nan"), float("inf"), float("-inf")
    ps = [SamplingParams(temperature=0), SamplingParams(temperature=0), SamplingParams(seed=1),
          SamplingParams(temperature=0), SamplingParams(seed=2)]
    tokens = sample(logits, ps, [make_generator(p) for p in ps])
    assert tokens[1:4] == [None, None, None]
    assert tokens[0] == logits[0].argmax().item()
    assert tokens[4] == sample(logits[4:], ps[4:], [make_generator(ps[4])])[0]


def test_a_top_k_beyond_the_vocabulary_keeps_it_all():
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    assert set(draws(logits, 500, top_k=2**70).tolist()) == {0, 1, 2}


def test_seeded_sampling_is_reproducible_and_batch_invariant():
    torch.manual_seed(3)
    mine = SamplingParams(temperature=1.5, top_p=0.9, top_k=40, seed=42)
    others = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=1), SamplingParams(top_p=0.5)]
    steps = [torch.randn(4, 200) for _ in range(20)]

    def alone() -> list[int]:
        g = make_generator(mine)
        return [sample(s[2:3], [mine], [g])[0] for s in steps]

    g, gs = make_generator(mine), [make_generator(p) for p in others]
    batched = [sample(s, [others[0], others[1], mine, others[2]], [gs[0], gs[1], g, gs[2]])[2] for s in steps]
    assert alone() == alone() == batched
    assert len(set(batched)) > 5  # actually sampled, not stuck on one token


def test_temperature_flattens_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    freq = {t: (draws(logits, 2000, temperature=t) == 1).float().mean().item() for t in (0.5, 1.0, 2.0)}
    assert freq[0.5] < freq[1.0] < freq[2.0]
    assert freq[1.0] == pytest.approx(logits.softmax(-1)[1].item(), abs=0.03)


def test_top_k_and_top_p_restrict_support():
    logits = torch.randn(30, generator=torch.Generator().manual_seed(4))
    top3 = set(logits.topk(3).indices.tolist())
    assert set(draws(logits, 2000, temperature=2.0, top_k=3).tolist()) == top3
    # probabilities 0.5, 0.3, 0.2: the nucleus for 0.7 is the first two, for 0.4 the first alone
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    assert set(draws(logits, 2000, top_p=0.7).tolist()) == {0, 1}
    assert set(draws(logits, 200, top_p=0.4).tolist()) == {0}


def test_a_nucleus_beyond_the_first_candidates_is_found_whole_and_drawn_as_its_probabilities():
    """A flat distribution's nucleus holds more tokens than the search takes first; nothing cut draws each token as
    often as its probability."""
    from llmpq_serve.runtime.sampling import NUCLEUS_START

    logits = torch.linspace(0, -3, 1000)[torch.randperm(1000, generator=torch.Generator().manual_seed(8))]
    probs = logits.softmax(-1)
    ranked = probs.sort(descending=True).values
    nucleus = int(((ranked.cumsum(-1) - ranked) < 0.5).sum())
    assert nucleus > 2 * NUCLEUS_START
    drawn = draws(logits, 4000, top_p=0.5)
    assert set(drawn.tolist()) <= set(probs.topk(nucleus).indices.tolist())
    assert len(set(drawn.tolist())) > nucleus * 0.9
    peaked = torch.tensor([3.0, 2.0, 1.0, 0.0] + [-2.0] * 60)
    freq = torch.bincount(draws(peaked, 20000), minlength=64).float() / 20000
    assert torch.allclose(freq[:4], peaked.softmax(-1)[:4], atol=0.015)


def test_make_generator():
    assert make_generator(SamplingParams(temperature=0, seed=1)) is None
    a, b = (make_generator(SamplingParams(seed=7)) for _ in range(2))
    assert torch.equal(a.get_state(), b.get_state())
    c, d = (make_generator(SamplingParams()) for _ in range(2))
    assert not torch.equal(c.get_state(), d.get_state())


class WordTokenizer:
    """Each id is one fixed piece of text; id 0 is the special eos."""

    vocab = ("</s>", "ab", "c S", "TOP", "TOPxyz", "more", "S")

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i == 0))


def run(ids: list[int], eos: int | None = 0, **kw) -> list[tuple[str, str | None]]:
    d = Detokenizer(WordTokenizer(), SamplingParams(**kw), eos)
    out = [d.add(i) for i in ids]
    assert "".join(piece for piece, _ in out) == d.text and d.token_ids == ids
    return out


def test_stop_string_across_tokens_is_cut():
    assert run([1, 2, 3], stop=["STOP"]) == [("ab", None), ("c ", None), ("", "stop")]
    assert run([1, 2, 4], stop=["xyz", "STOP"]) == [("ab", None), ("c ", None), ("", "stop")]
    # "S" is held back as a possible start of "STOP" and released once it cannot be
    assert run([1, 2, 5], stop=["STOP"]) == [("ab", None), ("c ", None), ("Smore", None)]


def test_held_back_text_is_released_on_finish():
    assert run([1, 2, 0], stop=["STOP"]) == [("ab", None), ("c ", None), ("S", "stop")]
    assert run([1, 2], stop=["STOP"], max_tokens=2) == [("ab", None), ("c S", "length")]


def test_stop_token_ids_eos_and_max_tokens():
    assert run([1, 5], stop_token_ids=[5]) == [("ab", None), ("", "stop")]
    assert run([1, 0]) == [("ab", None), ("", "stop")]
    assert run([1, 0, 5], ignore_eos=True) == [("ab", None), ("", None), ("more", None)]
    assert run([1, 5], eos=None) == [("ab", None), ("more", None)]
    assert run([1, 5, 1], max_tokens=3) == [("ab", None), ("more", None), ("ab", "length")]


@pytest.fixture(scope="module")
def byte_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # a vocabulary of little more than the 256 bytes, so most non-ASCII characters stay split over several tokens
    trainer = trainers.BpeTrainer(vocab_size=270, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["héllo wörld ✓ 日本", "hello world", "plain ascii text"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_multibyte_characters_are_never_released_half(byte_bpe):
    text = "héllo wörld ✓ 日本 done"
    ids = byte_bpe.encode(text)
    assert any("\ufffd" in byte_bpe.decode([i]) for i in ids)  # the test needs characters split across tokens
    d = Detokenizer(byte_bpe, SamplingParams(max_tokens=len(ids)), None)
    pieces = [d.add(i) for i in ids]
    assert not any("\ufffd" in piece for piece, _ in pieces)
    assert "".join(piece for piece, _ in pieces) == d.text == text
    assert pieces[-1][1] == "length" and sum(bool(piece) for piece, _ in pieces) > 5
    assert d.token_ids == ids


class CountingTokenizer:
    """Wraps a tokenizer and records the longest run of ids it was asked to decode."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def decode(self, ids, skip_special_tokens=False):
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_long_outputs_decode_a_short_window_and_the_whole_text(byte_bpe):
    text = "héllo wörld ✓ 日本 plain ascii text " * 40
    ids = byte_bpe.encode(text)
    tok = CountingTokenizer(byte_bpe)
    d = Detokenizer(tok, SamplingParams(max_tokens=len(ids)), None)
    assert "".join(d.add(i)[0] for i in ids) == text
    assert len(ids) > 300 and tok.longest <= 8  # a step's work does not grow with the output


def test_leading_space_of_sentencepiece_pieces_survives_the_window():
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁again": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Metaspace()
    sp = PreTrainedTokenizerFast(tokenizer_object=tok)
    ids = [1, 2, 3, 4, 2]
    assert sp.decode(ids) == "Hello world! again world"  # the first piece's space is dropped, the others' are kept
    d = Detokenizer(sp, SamplingParams(max_tokens=len(ids)), None)
    assert "".join(d.add(i)[0] for i in ids) == sp.decode(ids)

"""Sampling parameters of a request and turning a stage chain's logits into tokens."""

from __future__ import annotations

import secrets
from typing import Any

import torch
from pydantic import BaseModel, Field


class SamplingParams(BaseModel):
    """What a request asks of generation. `temperature == 0` is greedy; `top_k == 0` and `top_p == 1` are off."""

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """The request's own random stream, so its draws never depend on what else runs; None when greedy."""
    if params.temperature == 0:
        return None
    # torch seeds are 64-bit; reducing keeps any user int valid while staying reproducible
    seed = params.seed % 2**64 if params.seed is not None else secrets.randbits(64)
    return torch.Generator().manual_seed(seed)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int | None]:
    """One token per row of `logits` [B, V]; row i follows params[i] and draws from generators[i] only. None for a
    row no token can be drawn from (a NaN or +inf logit, or all -inf): the model's numbers went wrong for that row,
    and only its request should fail, not its batch mates."""
    x = logits.float()
    best = x.amax(-1, keepdim=True)
    broken = (~best.isfinite()).flatten().tolist()  # the max of a row is NaN if any of it is: one reduction finds all
    tokens: list[int | None] = [None] * len(params)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0 and not broken[i]]
    rows = [i for i, p in enumerate(params) if p.temperature > 0 and not broken[i]]
    if greedy:  # argmax only where it is the answer: on a CPU it costs more than the sampled rows' softmax
        for i, token in zip(greedy, _rows(x, greedy).argmax(-1).tolist()):
            tokens[i] = token
    if not rows:
        return tokens
    # every op below works along a row, so a row's result does not depend on its batch mates
    ps = [params[i] for i in rows]
    # a temperature below float32's smallest normal number (1e-300 is a valid one to ask for) would round to 0 and
    # make the best logit's 0 / 0 a NaN
    temp = torch.tensor([p.temperature for p in ps], device=x.device).clamp_min(torch.finfo(torch.float32).tiny)
    # the row's best logit is 0 before scaling, so a tiny temperature sends the others to -inf, never all to inf
    probs = ((_rows(x, rows) - _rows(best, rows)) / temp[:, None]).softmax(-1)
    probs = probs.cpu()  # the generators live on the CPU
    for j, i in enumerate(rows):
        tokens[i] = _draw(probs[j], ps[j], generators[i])
    return tokens


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return x if len(rows) == x.shape[0] else x[rows]  # all of them: no copy


NUCLEUS_START = 64  # candidates the top-p search takes first; it doubles them until the nucleus ends among them


def _draw(probs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from a row's probabilities within its top-k and top-p, by inverse CDF: one uniform number from the
    request's generator, looked up in the running sum of the candidates' probabilities. (torch.multinomial took ~1 ms
    per row of a 32k vocabulary on a core, this takes ~0.05.)"""
    vocab = probs.shape[-1]
    top_k = min(params.top_k or vocab, vocab)  # a huge top_k overflows int64
    ids = None
    if top_k < vocab or params.top_p < 1:
        probs, ids = _candidates(probs, top_k, params.top_p)
    # else nothing is cut: the vocabulary need not be ordered
    cdf = probs.cumsum(-1)
    u = torch.rand((), generator=generator) * cdf[-1]
    # right=True never lands on a token of probability 0, whose running sum equals the one before it
    pick = min(int(torch.searchsorted(cdf, u, right=True)), len(cdf) - 1)
    return pick if ids is None else int(ids[pick])


def _candidates(probs: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, token ids) of what top-k and top-p keep, most probable first: the smallest set whose mass
    reaches top_p (never empty: the first token stays even where top_p underflows to 0), within the top_k; top_p == 1
    cuts nothing, so that float rounding in the running sum cannot drop tail tokens. Found by `topk` of a doubling
    size rather than by sorting the vocabulary, which took ~3.6 ms per row of 32k tokens on a core; a nucleus of a
    language model's probabilities is mostly far smaller."""
    k = top_k if top_p >= 1 else min(top_k, NUCLEUS_START)
    while True:
        values, ids = probs.topk(k)  # its order among equal probabilities is its own, but fixed for a given row
        keep = values.cumsum(-1) - values < top_p  # the mass before each token is still short of top_p
        keep[0] = True
        if k == top_k or not keep[-1]:  # the cut, or the nucleus ended among these
            n = int(keep.sum())
            return values[:n], ids[:n]
        k = min(2 * k, top_k)


class Detokenizer:
    """Turns one request's generated tokens into released text, and decides when the request is finished."""

    def __init__(self, tokenizer: Any, params: SamplingParams, eos_token_id: int | None) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.eos_token_id = eos_token_id
        # an empty stop string would end every request before its first character
        self.stops = [s for s in params.stop if s]
        self.token_ids: list[int] = []
        self.text = ""
        self._decoded = ""
        # Decoding only a window of the latest tokens keeps a step's cost flat, where decoding every generated token
        # again each step grows with the output (0.3 ms per row at 1024 tokens with the demo tokenizer). The window
        # starts one settled piece back, so that a tokenizer that drops a leading space at the start of a text (the
        # SentencePiece ones) sees the same context as in a whole decode.
        self._settled = ""  # decode of token_ids[:_read], ending on a character boundary
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> tuple[str, str | None]:
        """Take the next generated token; return the text it releases and the finish reason, if it ends the request."""
        self.token_ids.append(token_id)
        p = self.params
        if token_id in p.stop_token_ids or (token_id == self.eos_token_id and not p.ignore_eos):
            return self._release(len(self._decoded)), "stop"
        self._decoded = self._settled + self._new_text()
        # released text never ends in a stop-string prefix, so a stop string can only start after it
        hits = [i for i in (self._decoded.find(s, len(self.text)) for s in self.stops) if i >= 0]
        if hits:
            return self._release(min(hits)), "stop"
        if len(self.token_ids) >= p.max_tokens:
            return self._release(len(self._decoded)), "length"
        # "\ufffd" marks a character whose remaining bytes are still to come
        end = len(self._decoded.rstrip("\ufffd"))
        return self._release(end - self._stop_prefix(end)), None

    def _new_text(self) -> str:
        """The text of the tokens after `_read`; settles it when it ends on a character boundary (byte-level BPE
        tokens need not: an unfinished character decodes to "\ufffd")."""
        before = self.tokenizer.decode(self.token_ids[self._prefix:self._read], skip_special_tokens=True)
        window = self.tokenizer.decode(self.token_ids[self._prefix:], skip_special_tokens=True)
        new = window[len(before):]
        if not new.endswith("\ufffd"):
            self._settled += new
            self._prefix, self._read = self._read, len(self.token_ids)
        return new

    def _stop_prefix(self, end: int) -> int:
        """Length of the longest unreleased tail of decoded[:end] that could still grow into a stop string."""
        room = end - len(self.text)
        for n in range(min(room, max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            tail = self._decoded[end - n:end]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _release(self, end: int) -> str:
        piece = self._decoded[len(self.text):end]
        self.text += piece
        return piece

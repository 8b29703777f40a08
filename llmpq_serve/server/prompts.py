"""A request's prompt as token ids, and how many tokens it may generate within the model's context."""

from __future__ import annotations

from typing import Any

from llmpq_serve.server.errors import APIError
from llmpq_serve.server.protocol import ChatMessage


def completion_prompt(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    vocab = len(tokenizer)
    outside = [token for token in prompt if not 0 <= token < vocab]
    if outside:
        raise APIError(400, f"prompt token ids must lie in [0, {vocab}); got {outside[:8]}", param="prompt")
    return prompt


def chat_prompt(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    """The model's chat template where the tokenizer has one, else `role: content` lines. A template writes the
    special tokens it wants (BOS) into its text, so encoding it must not add them again."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer.encode("".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:")
    try:
        text = tokenizer.apply_chat_template([m.model_dump() for m in messages], add_generation_prompt=True,
                                             tokenize=False)
    except Exception as exc:  # a template rejects what it cannot render (e.g. roles not alternating) by raising
        raise APIError(400, f"the model's chat template rejected the messages: {exc}", param="messages") from exc
    return tokenizer.encode(text, add_special_tokens=False)


def max_new_tokens(prompt_tokens: int, requested: int | None, max_context: int, *, prompt_param: str,
                   limit_param: str) -> int:
    """`requested`, or all the context the prompt leaves when the request gives no limit."""
    if prompt_tokens >= max_context:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens but this model's context is {max_context} tokens, "
                       "and it must leave at least one to generate", param=prompt_param)
    if requested is None:
        return max_context - prompt_tokens
    if prompt_tokens + requested > max_context:
        raise APIError(400, f"this model's context is {max_context} tokens, but the request asks for "
                       f"{prompt_tokens + requested}: {prompt_tokens} in the prompt and {requested} to generate "
                       f"({limit_param}); shorten the prompt or lower {limit_param}", param=limit_param)
    return requested

"""OpenAI's wire format for /v1/completions and /v1/chat/completions: requests, responses, stream chunks, errors.

Request models ignore fields they do not know (pydantic's default), as OpenAI clients send many. OpenAI's own
parameters that this server does not implement are refused when they ask for something (`echo`, `logprobs`,
penalties, tools, ...): an answer computed without them would look right and be wrong (a log-likelihood scorer
reading `logprobs` would get nulls)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationInfo,
    field_validator,
)

from llmpq_serve.runtime.sampling import SamplingParams

MAX_STOP_STRINGS = 4
MAX_CHOICES = 64  # prompts x n in one request: each choice is a request of its own in the engine's queue
NOT_IMPLEMENTED = ("echo", "suffix", "best_of", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
                   "logit_bias", "tools", "functions", "response_format")
# what a not-implemented parameter may be set to besides null, false, 0 and empty: values that ask for nothing
_ASKS_NOTHING = {"best_of": 1, "response_format": {"type": "text"}}


def _characters(value: str) -> str:
    """JSON may escape half of a UTF-16 surrogate pair ("\\ud800"), which Python keeps in a str but no tokenizer
    takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text holds {value[e.start:e.end]!r}, half of a UTF-16 surrogate pair, which is not a "
                         "character") from None
    return value


Text = Annotated[str, AfterValidator(_characters)]


def _json_number(value: Any) -> Any:
    """pydantic's lax mode reads true as 1 and "2" as 2: in JSON those are a client's mistake, 2.0 is still 2."""
    if isinstance(value, bool | str):
        raise ValueError(f"expected a number, got {json.dumps(value)}")  # noqa: TRY004 - pydantic reports ValueErrors
    return value


Number = BeforeValidator(_json_number)  # on the whole of `int | None`: a union would report it once per member


def _prompt_batch(value: Any) -> Any:
    """OpenAI's prompt (a text, token ids, or a batch of either) as the list of its prompts."""
    batch = value if isinstance(value, list) and value and isinstance(value[0], str | list) else [value]
    if any(isinstance(p, str | list) and not p for p in batch):
        raise ValueError("the prompt is empty")
    return batch


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class GenerationRequest(BaseModel):
    """The fields both endpoints share. Ranges are OpenAI's; top_k, ignore_eos and stop_token_ids are vLLM's
    extensions."""

    model: str | None = None
    temperature: Annotated[float | None, Number] = Field(None, ge=0.0, le=2.0)
    top_p: Annotated[float | None, Number] = Field(None, gt=0.0, le=1.0)
    top_k: Annotated[int | None, Number] = Field(None, ge=0)
    seed: Annotated[int | None, Number] = None
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    stop_token_ids: list[StrictInt] = Field(default_factory=list)
    ignore_eos: StrictBool = False
    n: Annotated[int, Number] = Field(1, ge=1, le=MAX_CHOICES)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    echo: Any = None
    suffix: Any = None
    best_of: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    tools: Any = None
    functions: Any = None
    response_format: Any = None

    @field_validator(*NOT_IMPLEMENTED)
    @classmethod
    def _asks_nothing(cls, value: Any, info: ValidationInfo) -> Any:
        if value in (None, False, 0, "", [], {}) or value == _ASKS_NOTHING.get(info.field_name):
            return value
        raise ValueError(f"{info.field_name} is not supported by this server; leave it out")

    @field_validator("n", "stream", "ignore_eos", "stop_token_ids", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:  # some clients send every parameter, null where they mean the default
            return cls.model_fields[info.field_name].get_default(call_default_factory=True)
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int, sample: int = 0) -> SamplingParams:
        """Fields the client left out (or sent as null) keep SamplingParams' defaults. `sample`: which of a prompt's
        `n` choices; with a seed, choice j draws from seed + j, so the n differ and each is reproducible."""
        given = self.model_dump(include={"temperature", "top_p", "top_k", "seed"}, exclude_none=True)
        if self.seed is not None:
            given["seed"] = self.seed + sample
        return SamplingParams(max_tokens=max_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
                              ignore_eos=self.ignore_eos, **given)


class CompletionRequest(GenerationRequest):
    # strict: a true or 2.0 among token ids is a client's mistake, not token 1 or 2
    prompt: Annotated[list[Text | list[StrictInt]], BeforeValidator(_prompt_batch)]
    max_tokens: Annotated[int | None, Number] = Field(16, ge=1, description="null: as many as the context leaves")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message of the conversation; content given as parts (text only here) is joined into one text."""

    role: Literal["system", "user", "assistant"]
    content: Text

    @field_validator("role", mode="before")
    @classmethod
    def _developer_is_system(cls, value: Any) -> Any:
        return "system" if value == "developer" else value  # OpenAI's newer name for system messages

    @field_validator("content", mode="before")
    @classmethod
    def _joined_parts(cls, value: Any) -> Any:
        if isinstance(value, list):
            other = [p.get("type") for p in value if isinstance(p, dict) and p.get("type") != "text"]
            if other:
                raise ValueError(f"only text content parts are supported, not {other[0]!r}")
            return "\n".join(part.text for part in _TEXT_PARTS.validate_python(value))
        return value


_TEXT_PARTS = TypeAdapter(list[TextPart])


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int | None, Number] = Field(None, ge=1)
    max_tokens: Annotated[int | None, Number] = Field(None, ge=1,
                                                      description="OpenAI's older name of max_completion_tokens")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Envelope(BaseModel):
    """What every response and stream chunk carries."""

    id: str
    created: int
    model: str


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmpq-serve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

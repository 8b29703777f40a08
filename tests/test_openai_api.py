"""The OpenAI-compatible HTTP layer over a fake engine: routes, streaming, every error case, cancellation, metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from pydantic import Field
from starlette.requests import ClientDisconnect
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llmpq_serve.runtime.sampling import SamplingParams
from llmpq_serve.server import openai_app, protocol
from llmpq_serve.server.engine import GenerationEvent, QueueFullError
from llmpq_serve.server.openai_app import build_app

pytestmark = pytest.mark.anyio

REPLY = " the quick brown fox jumps over the lazy dog"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MODEL = "tiny-opt"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few strings, which puts BOS in front of what it encodes, as Llama's does."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([REPLY, "hello world", "user: system: assistant:", "<|user|><|assistant|>"] * 4, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


class FakeEngine:
    """Answers every prompt with REPLY, one token per event; can refuse, fail or hang on request."""

    model_name = MODEL
    max_context = 64

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer
        self.reply = tokenizer.encode(REPLY, add_special_tokens=False)
        self.ready = True
        self.retry_after: float | None = None  # raise QueueFullError with it
        self.capacity: int | None = None  # requests it takes before it raises QueueFullError
        self.fail_at: int | None = None  # raise before this event
        self.hang_at: int | None = None  # wait forever before this event
        self.requests: list[tuple[list[int], SamplingParams, str]] = []
        self.cancelled: list[str] = []

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[GenerationEvent]:
        self.requests.append((prompt_ids, params, request_id))
        if self.retry_after is not None or (self.capacity is not None and len(self.requests) > self.capacity):
            raise QueueFullError(self.retry_after or 1.0)
        finished = False
        try:
            for i in range(params.max_tokens):
                if i == self.fail_at:
                    raise RuntimeError("stage 2 lost its GPU")
                if i == self.hang_at:
                    await asyncio.Event().wait()
                token = self.reply[i]
                reason = "stop" if i + 1 == len(self.reply) else "length" if i + 1 == params.max_tokens else None
                finished = reason is not None
                yield GenerationEvent(text=self.tokenizer.decode([token]), token_ids=[token], finish_reason=reason,
                                      prompt_tokens=len(prompt_ids), completion_tokens=i + 1)
                if finished:
                    return
                await asyncio.sleep(0)
        finally:
            if not finished:
                self.cancelled.append(request_id)

    def plan(self) -> dict:
        return {"stages": [{"device": "T4", "layers": [0, 12]}]}

    def health(self) -> dict:
        return {"ready": self.ready, "queue_depth": 3, "resumed_requests": 2, "pipeline_down_s": 4.5}


@pytest.fixture
def engine(tokenizer: PreTrainedTokenizerFast) -> FakeEngine:
    return FakeEngine(tokenizer)


@pytest.fixture
async def client(engine: FakeEngine) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(lambda: engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield http


def reply_text(engine: FakeEngine, tokens: int) -> str:
    return engine.tokenizer.decode(engine.reply[:tokens])


def sse_payloads(body: str) -> list[Any]:
    """The payload of each `data:` event; [DONE] as the string "[DONE]"."""
    events = body.split("\n\n")
    assert events[-1] == ""
    assert all(event.startswith("data: ") for event in events[:-1])
    return [event[6:] if event == "data: [DONE]" else json.loads(event[6:]) for event in events[:-1]]


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("server_error" if status >= 500 else
                             "rate_limit_error" if status == 429 else "invalid_request_error")
    assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error["message"]


async def test_completion(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    request = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0, "stop": "fox", "seed": 7,
               "service_tier": "auto"}  # which this server ignores, as it ignores all fields it does not know
    response = await client.post("/v1/completions", json=request)
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"] == [{"index": 0, "text": reply_text(engine, 4), "logprobs": None, "finish_reason": "length"}]
    prompt_ids, params, request_id = engine.requests[0]
    assert prompt_ids == engine.tokenizer.encode("hello") and prompt_ids[0] == engine.tokenizer.bos_token_id
    assert (params.max_tokens, params.temperature, params.stop, params.seed) == (4, 0.0, ["fox"], 7)
    assert request_id == body["id"]
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 4,
                             "total_tokens": len(prompt_ids) + 4}


async def test_completion_defaults_and_token_prompts(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await client.post("/v1/completions", json={"prompt": [5, 6, 7]})
    assert response.json()["choices"][0]["finish_reason"] == "stop"
    prompt_ids, params, _ = engine.requests[0]
    assert prompt_ids == [5, 6, 7]
    assert params == SamplingParams(max_tokens=16)
    await client.post("/v1/completions", json={"prompt": [[8, 9]], "max_tokens": None})
    await client.post("/v1/completions", json={"prompt": ["hello"]})
    assert engine.requests[1][0] == [8, 9] and engine.requests[1][1].max_tokens == engine.max_context - 2
    assert engine.requests[2][0] == engine.tokenizer.encode("hello")


async def test_streamed_completion_matches_the_plain_one(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    request = {"prompt": "hello", "max_tokens": 6}
    plain = (await client.post("/v1/completions", json=request)).json()
    response = await client.post("/v1/completions", json=request | {"stream": True,
                                                                     "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    *chunks, usage, done = sse_payloads(response.text)
    assert done == "[DONE]"
    assert all(chunk["id"].startswith("cmpl-") and chunk["object"] == "text_completion" for chunk in chunks)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == plain["choices"][0]["text"]
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None] * 5 + ["length"]
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]


async def test_a_batch_of_prompts_with_several_choices_each(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    """Choice i * n + j is prompt i's j-th, drawn with seed + j; each prompt's tokens count once in the usage."""
    request = {"prompt": ["hello", [5, 6, 7]], "n": 2, "max_tokens": 4, "seed": 10}
    body = (await client.post("/v1/completions", json=request)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == reply_text(engine, 4) and c["finish_reason"] == "length" for c in body["choices"])
    hello = engine.tokenizer.encode("hello")
    assert [(ids, params.seed) for ids, params, _ in engine.requests] == [(hello, 10), (hello, 11), ([5, 6, 7], 10),
                                                                         ([5, 6, 7], 11)]
    assert [rid for *_, rid in engine.requests] == [f"{body['id']}-{i}" for i in range(4)]
    assert body["usage"] == {"prompt_tokens": len(hello) + 3, "completion_tokens": 16, "total_tokens": len(hello) + 19}


async def test_streamed_chat_choices_are_told_apart_by_their_index(client: httpx.AsyncClient,
                                                                   engine: FakeEngine) -> None:
    request = {"messages": [{"role": "user", "content": "hello"}], "n": 3, "stream": True, "max_tokens": 5,
               "stream_options": {"include_usage": True}}
    *chunks, usage, done = sse_payloads((await client.post("/v1/chat/completions", json=request)).text)
    openings, chunks = chunks[:3], chunks[3:]
    assert [(o["choices"][0]["index"], o["choices"][0]["delta"]) for o in openings] == [
        (i, {"role": "assistant", "content": ""}) for i in range(3)]
    for i in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["delta"]["content"] for c in mine) == reply_text(engine, 5)
        assert [c["finish_reason"] for c in mine] == [None] * 4 + ["length"]
    assert {c["choices"][0]["index"] for c in chunks[:3]} == {0, 1, 2}  # side by side, not one after another
    assert usage["usage"]["completion_tokens"] == 15 and done == "[DONE]"
    assert usage["usage"]["prompt_tokens"] == len(engine.requests[0][0])


@pytest.mark.parametrize("stream", [False, True])
async def test_a_choice_the_queue_refuses_refuses_the_request_and_cancels_the_others(
        client: httpx.AsyncClient, engine: FakeEngine, stream: bool) -> None:
    engine.capacity = 2
    engine.hang_at = 0  # the choices queued wait for their first token: the 429 must not wait with them
    with anyio.fail_after(5):
        response = await client.post("/v1/completions", json={"prompt": "hi", "n": 3, "stream": stream})
    assert_error(response, 429, "queue_full")
    assert engine.cancelled == [rid for *_, rid in engine.requests[:2]]
    metrics = (await client.get("/metrics")).text
    assert "llmpq_requests_running 0.0" in metrics


async def test_chat_with_the_tokenizers_template(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello", "name": "ann"}]
    response = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages,
                                                               "max_completion_tokens": 3, "max_tokens": 50})
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": reply_text(engine, 3)},
                                "logprobs": None, "finish_reason": "length"}]
    prompt_ids, params, _ = engine.requests[0]
    assert engine.tokenizer.decode(prompt_ids) == "<s><|system|>be brief\n<|user|>hello\n<|assistant|>"
    assert prompt_ids.count(engine.tokenizer.bos_token_id) == 1
    assert params.max_tokens == 3 and body["usage"]["prompt_tokens"] == len(prompt_ids)


async def test_chat_without_a_template_and_streamed(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    request = {"messages": [{"role": "user", "content": "hello"}], "stream": True}
    response = await client.post("/v1/chat/completions", json=request)
    opening, *chunks, done = sse_payloads(response.text)
    assert engine.tokenizer.decode(engine.requests[0][0], skip_special_tokens=True) == "user: hello\nassistant:"
    assert engine.requests[0][1].max_tokens == engine.max_context - len(engine.requests[0][0])
    assert opening["object"] == "chat.completion.chunk" and opening["id"].startswith("chatcmpl-")
    assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(chunk["choices"][0]["delta"]["content"] for chunk in chunks) == REPLY
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"] is None
    assert done == "[DONE]"


async def test_models_plan_and_health(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in models["data"]] == [(MODEL, "model", 64)]
    assert (await client.get("/v1/plan")).json() == engine.plan()
    assert (await client.get("/healthz")).status_code == 200
    engine.ready = False
    assert (await client.get("/healthz")).status_code == 503


async def test_before_the_engine_exists() -> None:
    app = build_app(lambda: None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        assert (await http.get("/healthz")).status_code == 503
        assert_error(await http.post("/v1/completions", json={"prompt": "hi"}), 503, "engine_not_ready")
        assert_error(await http.get("/v1/models"), 503, "engine_not_ready")
        assert "llmpq_queue_depth" not in (await http.get("/metrics")).text


async def test_why_the_engine_is_not_there_is_said_to_the_client() -> None:
    reason = "the planner could not deploy the stages: no node offers H900"
    app = build_app(lambda: None, lambda: reason)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        health = await http.get("/healthz")
        assert health.status_code == 503 and health.json()["reason"] == reason
        answer = await http.post("/v1/completions", json={"prompt": "hi"})
        assert_error(answer, 503, "engine_not_ready")
        assert answer.json()["error"]["message"] == reason


async def test_while_a_replan_has_no_stages_up_requests_queue_and_the_probe_says_why(engine: FakeEngine) -> None:
    """The engine holds the requests until the new stages come (a re-plan must not lose them), but a load balancer
    should send new ones elsewhere meanwhile."""
    paused: list[str] = ["the planner is deploying the stages; not up yet: stage0 (V100): starting"]
    app = build_app(lambda: engine, paused=lambda: paused[0] if paused else None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        health = await http.get("/healthz")
        assert health.status_code == 503 and health.json()["reason"] == paused[0]
        assert (await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})).status_code == 200
        paused.clear()
        assert (await http.get("/healthz")).status_code == 200


@pytest.mark.parametrize(("path", "body", "status", "code", "param"), [
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model_not_found", "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "x"}, 404, "model_not_found",
     "model"),
    ("/v1/completions", {}, 400, None, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, None, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, None, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "stream": "sometimes"}, 400, None, "stream"),
    ("/v1/completions", {"prompt": ""}, 400, None, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, None, "prompt"),
    ("/v1/completions", {"prompt": ["a", ""]}, 400, None, "prompt"),
    ("/v1/completions", {"prompt": [[1], []]}, 400, None, "prompt"),
    ("/v1/completions", {"prompt": [[1], [2, 100000]]}, 400, None, "prompt"),
    ("/v1/completions", {"prompt": [5, 100000]}, 400, None, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, 400, None, "prompt"),
    ("/v1/completions", {"prompt": [True]}, 400, None, "prompt"),
    ("/v1/completions", {"prompt": [[5, 2.0]]}, 400, None, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [True]}, 400, None, "stop_token_ids"),
    # pydantic's lax mode would read these as 1, 2, 0.5 and true
    ("/v1/completions", {"prompt": "hi", "n": True}, 400, None, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "2"}, 400, None, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "0.5"}, 400, None, "temperature"),
    ("/v1/completions", {"prompt": "hi", "seed": False}, 400, None, "seed"),
    ("/v1/completions", {"prompt": "hi", "stream": "true"}, 400, None, "stream"),
    ("/v1/completions", {"prompt": "hi", "ignore_eos": 1}, 400, None, "ignore_eos"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": True}, 400,
     None, "max_completion_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, None, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, None, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": 2.5}, 400, None, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.1}, 400, None, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, None, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, None, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, None, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 65}, 400, None, "n"),
    ("/v1/completions", {"prompt": ["hi"] * 8, "n": 9}, 400, None, "n"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, None, "stop"),
    # JSON may escape half a UTF-16 surrogate pair, which Python keeps in a str but no tokenizer takes
    ("/v1/completions", {"prompt": "hi \ud800"}, 400, None, "prompt"),
    ("/v1/completions", {"prompt": ["hi", "\udfff"]}, 400, None, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": "\ud800"}, 400, None, "stop"),
    ("/v1/chat/completions", {"messages": []}, 400, None, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, None, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, 400, None, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     400, None, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, None,
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, None, "messages"),
    # OpenAI's parameters that are not implemented here, set to ask for something
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, None, "echo"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 5}, 400, None, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, None, "best_of"),
    ("/v1/completions", {"prompt": "hi", "suffix": "end"}, 400, None, "suffix"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 1.5}, 400, None, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"50256": -100}}, 400, None, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, None,
     "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_object"}}, 400, None, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, None, "tools"),
])
async def test_invalid_requests(client: httpx.AsyncClient, engine: FakeEngine, path: str, body: dict, status: int,
                                code: str | None, param: str) -> None:
    def post(body: dict):  # ASCII JSON, as httpx's own encoding cannot carry the lone surrogates above
        return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})

    assert_error(await post(body), status, code, param)
    if "stream" not in body:
        assert_error(await post(body | {"stream": True}), status, code, param)
    assert engine.requests == []


async def test_parameters_sent_as_null_or_asking_for_nothing_are_accepted(client: httpx.AsyncClient,
                                                                          engine: FakeEngine) -> None:
    """Some clients send every parameter, null or at its default where they mean nothing by it."""
    nothing = {"n": None, "stream": None, "ignore_eos": None, "stop_token_ids": None, "echo": False, "logprobs": None,
               "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "suffix": None}
    response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2} | nothing)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == reply_text(engine, 2)
    # 2.0 is the JSON number 2, as some clients write every number
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.0, "logprobs": False, "tools": [],
            "response_format": {"type": "text"}}
    assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
    assert engine.requests[-1][1].max_tokens == 2


async def test_chat_content_parts_and_the_developer_role(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    """Text given as content parts is joined; `developer` is OpenAI's newer name of `system`."""
    messages = [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]}]
    response = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert (engine.tokenizer.decode(engine.requests[0][0], skip_special_tokens=True)
            == "system: be brief\nuser: hello\nthere\nassistant:")


async def test_malformed_json_and_unknown_routes(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", content=b'{"prompt": "hi",', headers={
        "content-type": "application/json"})
    assert "not valid JSON" in assert_error(response, 400)
    assert response.json()["error"]["param"] is None
    assert_error(await client.post("/v1/completions", content=b"[1, 2]",
                                   headers={"content-type": "application/json"}), 400)
    for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}):  # curl -d without -H
        response = await client.post("/v1/completions", content=b'{"prompt": "hi"}', headers=headers)
        assert "sent with Content-Type: application/json" in assert_error(response, 400)
    assert_error(await client.get("/v1/nothing"), 404)
    assert_error(await client.get("/v1/completions"), 405)


async def test_chat_template_rejecting_the_messages(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.tokenizer.chat_template = "{{ raise_exception('conversation roles must alternate') }}"
    response = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert "must alternate" in assert_error(response, 400, param="messages")


async def test_limits_of_the_runtime_beyond_openais(client: httpx.AsyncClient, engine: FakeEngine,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    class Narrower(SamplingParams):
        top_k: int = Field(0, ge=0, le=50)

    monkeypatch.setattr(protocol, "SamplingParams", Narrower)
    assert_error(await client.post("/v1/completions", json={"prompt": "hi", "top_k": 100}), 400, param="top_k")
    assert engine.requests == []


async def test_a_batch_beyond_the_choice_limit_is_refused_before_it_is_tokenized(
        client: httpx.AsyncClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    def tokenize(*_: object) -> None:
        raise AssertionError("tokenized a batch it refuses")

    monkeypatch.setattr(openai_app, "completion_prompt", tokenize)
    message = assert_error(await client.post("/v1/completions", json={"prompt": ["hi"] * 10_000}), 400, param="n")
    assert "10000" in message and "64" in message
    assert engine.requests == []


async def test_requests_longer_than_the_context(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    message = assert_error(await client.post("/v1/completions", json={"prompt": list(range(64))}), 400,
                           param="prompt")
    assert "64" in message
    message = assert_error(await client.post("/v1/completions", json={"prompt": list(range(60)), "max_tokens": 5}),
                           400, param="max_tokens")
    assert "64" in message and "65" in message
    chat = {"messages": [{"role": "user", "content": "hello " * 100}], "max_completion_tokens": 1}
    assert_error(await client.post("/v1/chat/completions", json=chat), 400, param="messages")
    ok = await client.post("/v1/completions", json={"prompt": list(range(60)), "max_tokens": 4})
    assert ok.status_code == 200


@pytest.mark.parametrize(("retry_after", "header"), [(0.2, "1"), (2.5, "3")])
@pytest.mark.parametrize("stream", [False, True])
async def test_queue_full(client: httpx.AsyncClient, engine: FakeEngine, retry_after: float, header: str,
                          stream: bool) -> None:
    engine.retry_after = retry_after
    response = await client.post("/v1/completions", json={"prompt": "hi", "stream": stream})
    assert_error(response, 429, "queue_full")
    assert response.headers["retry-after"] == header


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_failure_before_any_token(client: httpx.AsyncClient, engine: FakeEngine, stream: bool) -> None:
    engine.fail_at = 0
    response = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                "stream": stream})
    assert "stage 2" not in assert_error(response, 503, "engine_error")


async def test_engine_failure_mid_stream_ends_the_stream(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.fail_at = 3
    response = await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
    assert response.status_code == 200
    *chunks, error, done = sse_payloads(response.text)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == reply_text(engine, 3)
    assert error["error"]["type"] == "server_error" and error["error"]["code"] == "engine_error"
    assert done == "[DONE]"
    plain = await client.post("/v1/completions", json={"prompt": "hi"})
    assert_error(plain, 503, "engine_error")


def asgi_request(path: str, body: dict, spec_version: str) -> tuple[dict, bytes]:
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("test", 80)}
    return scope, json.dumps(body).encode()


@pytest.mark.parametrize("spec_version", ["2.0", "2.4"])
async def test_client_disconnect_cancels_the_request(engine: FakeEngine, spec_version: str) -> None:
    """ASGI 2.0 servers announce the disconnect (Starlette then cancels the response while the engine is working);
    2.4 ones, like uvicorn, make `send` fail (the body iterator is then left suspended between events)."""
    engine.hang_at = 3 if spec_version == "2.0" else None
    app = build_app(lambda: engine)
    scope, body = asgi_request("/v1/completions", {"prompt": "hi", "max_tokens": 8, "stream": True}, spec_version)
    received: list[bytes] = []
    gone = anyio.Event()

    async def receive() -> dict:
        if not received:
            received.append(body)
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if gone.is_set():
            if spec_version == "2.0":  # before 2.4 the spec left a send to a closed connection to the server
                return
            raise OSError("connection reset")
        if message["type"] == "http.response.body" and message["body"]:
            received.append(message["body"])
            if len(received) > 2:
                gone.set()

    with anyio.fail_after(5):
        if spec_version == "2.4":
            with pytest.raises(ClientDisconnect):  # which the server expects to hear of it
                await app(scope, receive, send)
        else:
            await app(scope, receive, send)
    request_id = engine.requests[0][2]
    assert engine.cancelled == [request_id]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        metrics = (await http.get("/metrics")).text
    assert "llmpq_requests_cancelled_total 1.0" in metrics
    assert "llmpq_requests_running 0.0" in metrics


async def test_client_disconnect_cancels_a_whole_answer(engine: FakeEngine) -> None:
    """A response that is not streamed sends nothing before it is done, so only `receive` hears the client go."""
    engine.hang_at = 3
    app = build_app(lambda: engine)
    scope, body = asgi_request("/v1/completions", {"prompt": "hi", "max_tokens": 8}, "2.4")
    bodies = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if bodies:
            return bodies.pop()
        await asyncio.sleep(0.05)  # the engine is at work by then
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await app(scope, receive, send)
    assert engine.cancelled == [engine.requests[0][2]]
    assert sent[0]["status"] == openai_app.CLIENT_CLOSED_REQUEST
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        metrics = (await http.get("/metrics")).text
    assert "llmpq_requests_running 0.0" in metrics


async def test_metrics(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
    await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
    await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 0})
    engine.retry_after = 1
    await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    lines = set(response.text.splitlines())
    assert {'llmpq_requests_total{endpoint="/v1/completions",status="200"} 2.0',
            'llmpq_requests_total{endpoint="/v1/completions",status="400"} 1.0',
            'llmpq_requests_total{endpoint="/v1/chat/completions",status="429"} 1.0',
            "llmpq_time_to_first_token_seconds_count 2.0",
            "llmpq_time_per_output_token_seconds_count 2.0",
            "llmpq_requests_running 0.0",
            "llmpq_requests_cancelled_total 0.0",
            "llmpq_engine_errors_total 0.0",
            "llmpq_queue_depth 3.0",
            "llmpq_requests_resumed 2.0",
            "llmpq_pipeline_down_seconds 4.5"} <= lines
    assert not any("/metrics" in line for line in lines)

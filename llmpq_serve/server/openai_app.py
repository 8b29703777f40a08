"""The OpenAI-compatible HTTP API over an `Engine`, independent of Ray: completions and chat completions (streamed as
server-sent events or not), the model list, the live plan, a health probe and Prometheus metrics."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from llmpq_serve import __version__
from llmpq_serve.runtime.sampling import SamplingParams
from llmpq_serve.server import sse
from llmpq_serve.server.engine import Engine, GenerationEvent
from llmpq_serve.server.errors import NOT_LOADED, APIError, engine_not_ready, install_error_handlers
from llmpq_serve.server.formats import ChatFormat, CompletionFormat, Format
from llmpq_serve.server.generation import Generation
from llmpq_serve.server.metrics import RequestCounter, ServerMetrics
from llmpq_serve.server.prompts import chat_prompt, completion_prompt, max_new_tokens
from llmpq_serve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    ModelCard,
    ModelList,
)

logger = logging.getLogger(__name__)

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def build_app(get_engine: Callable[[], Engine | None], not_ready: Callable[[], str] = lambda: NOT_LOADED) -> FastAPI:
    """The API over whatever engine `get_engine` returns at each request, so the engine may arrive after the app is
    built; while it returns None, the API answers 503 and /healthz says not ready, both with `not_ready()` as the
    reason.

    A Ray Serve ingress is best built in its replica, where its engine is: a class decorated `@serve.ingress()` whose
    `__serve_build_asgi_app__(self)` returns `build_app(lambda: self.engine)`. `@serve.ingress(app)` instead pickles
    `app` into each replica, where a lambda over a module global would read a copy of it, never updated: pass a
    module-level function there, which pickles by reference."""
    app = FastAPI(title="llmpq-serve", version=__version__)
    metrics = ServerMetrics(health=lambda: _health(get_engine(), not_ready))
    install_error_handlers(app)
    app.add_middleware(RequestCounter, counter=metrics.requests, paths=GENERATION_PATHS)
    started = int(time.time())

    def engine_for(model: str | None) -> Engine:
        engine = get_engine()
        if engine is None:
            raise engine_not_ready(not_ready())
        if model is not None and model != engine.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {engine.model_name!r}",
                           param="model", code="model_not_found")
        return engine

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> Response:
        engine = engine_for(request.model)
        prompt_ids = completion_prompt(engine.tokenizer, request.prompt)
        limit = max_new_tokens(len(prompt_ids), request.max_tokens, engine.max_context, prompt_param="prompt",
                               limit_param="max_tokens")
        gen = Generation(engine, prompt_ids, _sampling(request, limit), f"cmpl-{uuid.uuid4().hex}", metrics)
        return await _respond(gen, CompletionFormat(gen.request_id, engine.model_name), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest) -> Response:
        engine = engine_for(request.model)
        prompt_ids = chat_prompt(engine.tokenizer, request.messages)
        limit_param = "max_tokens" if request.max_completion_tokens is None else "max_completion_tokens"
        limit = max_new_tokens(len(prompt_ids), request.max_new_tokens, engine.max_context, prompt_param="messages",
                               limit_param=limit_param)
        gen = Generation(engine, prompt_ids, _sampling(request, limit), f"chatcmpl-{uuid.uuid4().hex}", metrics)
        return await _respond(gen, ChatFormat(gen.request_id, engine.model_name), request)

    @app.get("/v1/models")
    async def models() -> ModelList:
        engine = engine_for(None)
        return ModelList(data=[ModelCard(id=engine.model_name, created=started, max_model_len=engine.max_context)])

    @app.get("/v1/plan")
    async def plan() -> dict:
        return engine_for(None).plan()

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        health = _health(get_engine(), not_ready)
        return JSONResponse(health, status_code=200 if health.get("ready") else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _health(engine: Engine | None, not_ready: Callable[[], str]) -> dict:
    """Never raises: a probe must get an answer, and an engine whose health check fails is not ready."""
    if engine is None:
        return {"ready": False, "reason": not_ready()}
    try:
        return engine.health()
    except Exception as exc:
        logger.warning("engine health check failed", exc_info=exc)
        return {"ready": False, "reason": "the engine's health check failed"}


def _sampling(request: GenerationRequest, max_tokens: int) -> SamplingParams:
    try:
        return request.sampling_params(max_tokens)
    except ValidationError as exc:  # limits of the runtime's own beyond those of the request model
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"])
        raise APIError(400, f"invalid request: {param}: {error['msg']}", param=param) from exc


async def _respond(gen: Generation, fmt: Format, request: GenerationRequest) -> Response:
    if request.stream:
        return await _stream(gen, fmt, request.include_usage)
    try:
        parts = []
        while (event := await gen.next()) is not None:
            parts.append(event.text)
    finally:
        await gen.close()
    return JSONResponse(fmt.response("".join(parts), gen.finish_reason, gen.usage()).model_dump())


async def _stream(gen: Generation, fmt: Format, include_usage: bool) -> sse.EventStream:
    """Answers only once the engine has sent its first event: before that it may still refuse the request, and
    the status code (429 rather than 200) depends on it."""
    try:
        first = await gen.next()
    except BaseException:
        await gen.close()
        raise
    return sse.EventStream(_events(gen, first, fmt, include_usage), on_close=gen.close)


async def _events(gen: Generation, first: GenerationEvent | None, fmt: Format,
                  include_usage: bool) -> AsyncIterator[str]:
    for payload in fmt.opening():
        yield sse.event(payload)
    event = first
    try:
        while event is not None:
            if event.text or event.finish_reason is not None:
                yield sse.event(fmt.chunk(event))
            event = await gen.next()
        if include_usage:
            yield sse.event(fmt.usage_chunk(gen.usage()))
    except APIError as err:
        # The 200 and its headers are out, so the error can only go in-band; the stream then ends as usual.
        yield sse.event(err.body)
    yield sse.DONE

"""The OpenAI-compatible HTTP API over an `Engine`, independent of Ray: completions and chat completions (streamed as
server-sent events or not), the model list, the live plan, a health probe and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.types import Receive

from llmpq_serve import __version__
from llmpq_serve.runtime.sampling import SamplingParams
from llmpq_serve.server import sse
from llmpq_serve.server.choices import Choices
from llmpq_serve.server.engine import Engine, GenerationEvent
from llmpq_serve.server.errors import NOT_LOADED, APIError, engine_not_ready, install_error_handlers
from llmpq_serve.server.formats import ChatFormat, CompletionFormat, Format
from llmpq_serve.server.generation import Generation
from llmpq_serve.server.metrics import RequestCounter, ServerMetrics
from llmpq_serve.server.prompts import chat_prompt, completion_prompt, max_new_tokens
from llmpq_serve.server.protocol import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    ModelCard,
    ModelList,
)

logger = logging.getLogger(__name__)

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
# nginx's status for a request whose client left before its answer: nobody reads it, the metrics count it apart
CLIENT_CLOSED_REQUEST = 499


def build_app(get_engine: Callable[[], Engine | None], not_ready: Callable[[], str] = lambda: NOT_LOADED,
              paused: Callable[[], str | None] = lambda: None) -> FastAPI:
    """The API over whatever engine `get_engine` returns at each request, so the engine may arrive after the app is
    built; while it returns None, the API answers 503 and /healthz says not ready, both with `not_ready()` as the
    reason. While `paused()` says why the engine's stages are gone for now (a re-plan), requests still go to the
    engine, which holds them until new stages come, and /healthz says not ready with that reason.

    A Ray Serve ingress is best built in its replica, where its engine is: a class decorated `@serve.ingress()` whose
    `__serve_build_asgi_app__(self)` returns `build_app(lambda: self.engine)`. `@serve.ingress(app)` instead pickles
    `app` into each replica, where a lambda over a module global would read a copy of it, never updated: pass a
    module-level function there, which pickles by reference."""
    app = FastAPI(title="llmpq-serve", version=__version__)
    metrics = ServerMetrics(health=lambda: _health(get_engine(), not_ready, paused))
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
    async def completions(request: CompletionRequest, http: Request) -> Response:
        engine = engine_for(request.model)
        _check_choices(len(request.prompt), request.n)  # before a batch of any length is tokenized on the loop
        prompts = []
        for prompt in request.prompt:
            ids = completion_prompt(engine.tokenizer, prompt)
            prompts.append((ids, max_new_tokens(len(ids), request.max_tokens, engine.max_context,
                                                prompt_param="prompt", limit_param="max_tokens")))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        choices = await _start(engine, request, prompts, request_id, metrics)
        return await _respond(choices, CompletionFormat(request_id, engine.model_name), request, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, http: Request) -> Response:
        engine = engine_for(request.model)
        prompt_ids = chat_prompt(engine.tokenizer, request.messages)
        limit_param = "max_tokens" if request.max_completion_tokens is None else "max_completion_tokens"
        limit = max_new_tokens(len(prompt_ids), request.max_new_tokens, engine.max_context, prompt_param="messages",
                               limit_param=limit_param)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        choices = await _start(engine, request, [(prompt_ids, limit)], request_id, metrics)
        return await _respond(choices, ChatFormat(request_id, engine.model_name), request, http)

    @app.get("/v1/models")
    async def models() -> ModelList:
        engine = engine_for(None)
        return ModelList(data=[ModelCard(id=engine.model_name, created=started, max_model_len=engine.max_context)])

    @app.get("/v1/plan")
    async def plan() -> dict:
        return engine_for(None).plan()

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        health = _health(get_engine(), not_ready, paused)
        return JSONResponse(health, status_code=200 if health.get("ready") else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _health(engine: Engine | None, not_ready: Callable[[], str], paused: Callable[[], str | None]) -> dict:
    """Never raises: a probe must get an answer, and an engine whose health check fails is not ready."""
    if engine is None:
        return {"ready": False, "reason": not_ready()}
    try:
        health = engine.health()
        if (why := paused()) is not None:
            health.update(ready=False, reason=why)
        return health
    except Exception as exc:
        logger.warning("engine health check failed", exc_info=exc)
        return {"ready": False, "reason": "the engine's health check failed"}


def _sampling(request: GenerationRequest, max_tokens: int, sample: int) -> SamplingParams:
    try:
        return request.sampling_params(max_tokens, sample)
    except ValidationError as exc:  # limits of the runtime's own beyond those of the request model
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"])
        raise APIError(400, f"invalid request: {param}: {error['msg']}", param=param) from exc


def _check_choices(prompts: int, n: int) -> None:
    if prompts * n > MAX_CHOICES:
        raise APIError(400, f"{prompts} prompt(s) x n={n} asks for {prompts * n} choices; "
                       f"one request may ask for at most {MAX_CHOICES}", param="n")


async def _start(engine: Engine, request: GenerationRequest, prompts: list[tuple[list[int], int]], request_id: str,
                 metrics: ServerMetrics) -> Choices:
    """`request.n` choices of each (prompt ids, token limit), choice i * n + j being prompt i's j-th (OpenAI's
    order)."""
    wanted = [(ids, _sampling(request, limit, j)) for ids, limit in prompts for j in range(request.n)]
    gens: list[Generation] = []
    try:
        for i, (ids, params) in enumerate(wanted):
            gens.append(Generation(engine, ids, params, request_id if len(wanted) == 1 else f"{request_id}-{i}",
                                   metrics))
    except BaseException:
        for gen in gens:
            await gen.close()
        raise
    return Choices(gens, sum(len(ids) for ids, _ in prompts))


async def _respond(choices: Choices, fmt: Format, request: GenerationRequest, http: Request) -> Response:
    if request.stream:
        return await _stream(choices, fmt, request.include_usage)
    texts: list[list[str]] = [[] for _ in choices.generations]

    async def collect() -> None:
        while (item := await choices.next()) is not None:
            texts[item[0]].append(item[1].text)

    try:
        if not await _unless_disconnected(http, collect()):
            return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        await choices.close()
    whole = [("".join(parts), choices.finish_reason(i)) for i, parts in enumerate(texts)]
    return JSONResponse(fmt.response(whole, choices.usage()).model_dump())


async def _unless_disconnected(http: Request, work: Awaitable[None]) -> bool:
    """Runs `work` unless the client leaves first (then cancels it and returns False). A whole answer sends
    nothing until it is done, so only `receive` tells of a client gone: otherwise its request would go on to its
    token limit, holding a KV slot, for nobody."""
    done = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(http.receive))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (done, gone):
            task.cancel()
        await asyncio.gather(done, gone, return_exceptions=True)
    if done.cancelled():
        return False
    done.result()  # its error, if it failed
    return True


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _stream(choices: Choices, fmt: Format, include_usage: bool) -> sse.EventStream:
    """Answers only once the engine has sent a first event: before that it may still refuse the request, and the
    status code (429 rather than 200) depends on it."""
    try:
        first = await choices.next()
    except BaseException:
        await choices.close()
        raise
    return sse.EventStream(_events(choices, first, fmt, include_usage), on_close=choices.close)


async def _events(choices: Choices, first: tuple[int, GenerationEvent] | None, fmt: Format,
                  include_usage: bool) -> AsyncIterator[str]:
    for payload in fmt.opening(len(choices.generations)):
        yield sse.event(payload)
    item = first
    try:
        while item is not None:
            index, event = item
            if event.text or event.finish_reason is not None:
                yield sse.event(fmt.chunk(index, event))
            item = await choices.next()
        if include_usage:
            yield sse.event(fmt.usage_chunk(choices.usage()))
    except APIError as err:
        # The 200 and its headers are out, so the error can only go in-band; the stream then ends as usual.
        yield sse.event(err.body)
    yield sse.DONE

"""The OpenAI-compatible HTTP layer: FastAPI routes that validate, enqueue and answer. No model maths here.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream``:
server-sent events ending with ``data: [DONE]``), ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``
(vLLM's names). Every error is ``{"error": {"message", "type", "param", "code"}}`` with its 4xx/5xx status; an
unexpected exception is a 500 for that request only. With ``api_key`` every /v1 route needs
``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HttpRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from slimtune.files import AdapterFileError
from slimtune.serve import api
from slimtune.serve.adapters import AdapterRefused, BaseMismatch
from slimtune.serve.api import ApiError, CompletionCall, Limits
from slimtune.serve.engine import Request
from slimtune.serve.model import MultiAdapterModel, UnknownAdapter
from slimtune.serve.registry import AdapterBusy, AdapterRegistry, PathRefused
from slimtune.serve.sampling import SamplingParams
from slimtune.serve.scheduler import Scheduler


def api_error(e: BaseException, param: str | None = None) -> ApiError:
    """The HTTP error for a library exception (see the module docstring)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, UnknownAdapter):
        return ApiError(404, str(e), param or "model", "model_not_found")
    if isinstance(e, PathRefused):
        return ApiError(e.status, str(e), "lora_path", "path_refused")
    if isinstance(e, BaseMismatch):
        return ApiError(409, str(e), param, "base_mismatch")
    if isinstance(e, AdapterRefused):
        return ApiError(422, str(e), param, "unsupported_adapter")
    if isinstance(e, AdapterFileError):
        return ApiError(400, str(e), param, "invalid_adapter")
    if isinstance(e, AdapterBusy):
        return ApiError(e.status, str(e), param, "adapter_busy")
    if isinstance(e, (ValueError, TypeError)):
        return ApiError(400, str(e), param)
    return ApiError(500, f"internal error: {type(e).__name__}: {e}")


def create_app(model: MultiAdapterModel, registry: AdapterRegistry, base_id: str, max_batch: int = 32,
               limits: Limits = Limits(), api_key: str | None = None) -> FastAPI:
    """The app; its engine thread starts now and stops at shutdown (``app.state.scheduler``)."""
    scheduler = Scheduler(model, max_batch).start()
    app = FastAPI(title="slimtune serve", lifespan=lifespan(scheduler))
    app.state.scheduler, app.state.registry = scheduler, registry
    add_error_handling(app, api_key)
    add_adapter_routes(app, model, registry, base_id, scheduler, limits)
    add_completion_routes(app, model, registry, base_id, scheduler, limits)
    return app


def add_error_handling(app: FastAPI, api_key: str | None) -> None:
    """Every error as OpenAI's JSON; with ``api_key``, the bearer check on /v1 routes."""
    @app.exception_handler(ApiError)
    async def _api(_: HttpRequest, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http(_: HttpRequest, e: HTTPException) -> JSONResponse:  # unknown route, wrong method
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(_: HttpRequest, e: Exception) -> JSONResponse:  # a library error raised outside a try
        err = api_error(e)
        return JSONResponse(err.body(), status_code=err.status)

    @app.middleware("http")
    async def _auth(request: HttpRequest, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                err = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                               "invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)


async def body_of(request: HttpRequest, limits: Limits) -> Any:
    """The parsed JSON body. ApiError 413 over ``limits.max_body_bytes``, 400 for anything not JSON."""
    raw = await request.body()
    if len(raw) > limits.max_body_bytes:
        raise ApiError(413, f"request body of {len(raw)} bytes; at most {limits.max_body_bytes}")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


def add_adapter_routes(app: FastAPI, model: MultiAdapterModel, registry: AdapterRegistry, base_id: str,
                       scheduler: Scheduler, limits: Limits) -> None:
    """/health, /v1/models, /v1/load_lora_adapter, /v1/unload_lora_adapter."""
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "loaded": sorted(model.slots), "running": len(scheduler.engine.running)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        data = [{"id": base_id, "object": "model", "created": now, "owned_by": "slimtune", "root": base_id,
                 "parent": None}]
        data += [{"id": n, "object": "model", "created": now, "owned_by": "slimtune", "root": n, "parent": base_id}
                 for n in registry.names()]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: HttpRequest) -> dict[str, Any]:
        body = await body_of(request, limits)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object {lora_name, lora_path}")
        name, path = body.get("lora_name"), body.get("lora_path")
        if name == base_id:
            raise ApiError(400, f"lora_name={name!r}: that is the base model's name", "lora_name")
        try:
            await run_in_threadpool(registry.add, name, path)
        except Exception as e:  # noqa: BLE001 - mapped to its status
            about_name = isinstance(e, ValueError) and "lora_name" in str(e)
            raise api_error(e, "lora_name" if about_name else "lora_path") from None
        return {"object": "lora_adapter", "id": name, "status": "loaded"}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: HttpRequest) -> dict[str, Any]:
        body = await body_of(request, limits)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str):
            raise ApiError(400, f"lora_name={name!r}: required, the adapter's name", "lora_name")
        try:
            registry.remove(name)
        except Exception as e:  # noqa: BLE001 - mapped to its status
            raise api_error(e, "lora_name") from None
        return {"object": "lora_adapter", "id": name, "status": "unloaded"}


def add_completion_routes(app: FastAPI, model: MultiAdapterModel, registry: AdapterRegistry, base_id: str,
                          scheduler: Scheduler, limits: Limits) -> None:
    """/v1/completions and /v1/chat/completions."""
    context = model.context_length
    max_prompt = limits.max_prompt_tokens or context - 1

    async def complete(request: HttpRequest, chat: bool) -> Any:
        call = api.parse_call(await body_of(request, limits), chat, limits)
        prompts = [prompt_ids(model, p, call, max_prompt, context) for p in call.prompts]
        adapter = None if call.model == base_id else call.model
        return await run_call(call, prompts, adapter, registry, scheduler)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest) -> Any:
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest) -> Any:
        return await complete(request, chat=True)


def lifespan(scheduler: Scheduler) -> Any:
    @contextlib.asynccontextmanager
    async def run(_: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.stop()
    return run


def prompt_ids(model: MultiAdapterModel, prompt: Any, call: CompletionCall, max_prompt: int, context: int) -> list[int]:
    """Token ids of one prompt (a chat through the tokenizer's chat template). ApiError 400 over the limits."""
    tok = model.tokenizer
    if call.chat:
        text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
    elif isinstance(prompt, str):
        ids = list(tok(prompt)["input_ids"])
    else:
        vocab = model.base.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
        ids = prompt
    field = "messages" if call.chat else "prompt"
    if not ids:
        raise ApiError(400, f"{field}: holds no tokens", field)
    if len(ids) > max_prompt:
        raise ApiError(400, f"{field}: {len(ids)} tokens; at most {max_prompt}", field, "context_length_exceeded")
    if len(ids) + call.max_tokens > context:
        raise ApiError(400, f"max_tokens={call.max_tokens} with a prompt of {len(ids)} tokens exceeds the model's "
                       f"context of {context} tokens", "max_tokens", "context_length_exceeded")
    return ids


async def run_call(call: CompletionCall, prompts: list[list[int]], adapter: str | None,
                   registry: AdapterRegistry, scheduler: Scheduler) -> Any:
    """Submit n requests per prompt (choice index = prompt * n + j) and answer or stream their results."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    requests: list[Request] = []
    try:
        for i, ids in enumerate(prompts):
            for j in range(call.n):
                index = i * call.n + j
                seed = None if call.seed is None else call.seed + j
                params = SamplingParams(call.max_tokens, call.temperature, call.top_p, seed, call.stop)
                if adapter is not None:
                    await run_in_threadpool(registry.acquire, adapter)  # loads an evicted adapter; pins it
                r = Request(ids, adapter, params, sink=sink(loop, events, index, adapter, registry))
                requests.append(r)
                scheduler.submit(r)
    except Exception as e:  # noqa: BLE001
        for r in requests:
            r.cancelled = True
        raise api_error(e) from None
    if call.stream:
        return StreamingResponse(stream(call, requests, events, sum(map(len, prompts))),
                                 media_type="text/event-stream")
    try:
        done = await collect(events, len(requests))
    finally:
        for r in requests:
            r.cancelled = True  # a no-op for finished ones; frees the rows of a client that went away
    choices = [api.choice(i, done[i], call.chat) for i in range(len(requests))]
    used = api.usage(sum(map(len, prompts)), sum(len(d.token_ids) for d in done.values()))
    return api.response(call, api.new_id(call.chat), choices, used)


def sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int, adapter: str | None,
         registry: AdapterRegistry) -> Any:
    """The engine-thread callback for one request: forward events to the request's loop; unpin when done."""
    def on_event(kind: str, value: Any) -> None:
        if kind in ("done", "error") and adapter is not None:
            registry.release(adapter)
        loop.call_soon_threadsafe(events.put_nowait, (index, kind, value))
    return on_event


async def collect(events: asyncio.Queue, count: int) -> dict[int, Any]:
    done: dict[int, Any] = {}
    while len(done) < count:
        index, kind, value = await events.get()
        if kind == "error":
            raise api_error(value)
        if kind == "done":
            done[index] = value
    return done


async def stream(call: CompletionCall, requests: list[Request], events: asyncio.Queue,
                 prompt_tokens: int) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text delta, a last chunk per choice with its finish_reason, usage if
    asked (stream_options.include_usage), then ``data: [DONE]``."""
    rid, finished, completion_tokens = api.new_id(call.chat), 0, 0
    try:
        if call.chat:
            for i in range(len(requests)):
                yield sse(api.chunk(call, rid, i, "", None, first=True))
        while finished < len(requests):
            index, kind, value = await events.get()
            if kind == "delta":
                yield sse(api.chunk(call, rid, index, value, None))
            elif kind == "done":
                finished += 1
                completion_tokens += len(value.token_ids)
                yield sse(api.chunk(call, rid, index, None if call.chat else "", value.finish_reason))
            else:
                yield sse(api_error(value).body())
                break
        if call.include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk" if call.chat else "text_completion",
                       "created": int(time.time()), "model": call.model, "choices": [],
                       "usage": api.usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        for r in requests:
            r.cancelled = True  # the client went away, or all are done (a no-op then)


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"

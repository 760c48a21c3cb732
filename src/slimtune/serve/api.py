"""The OpenAI request and response shapes: parsing a body into a validated request, building responses.

No HTTP here. Every bad field raises ``ApiError`` with the status and the OpenAI error fields
(``{"error": {"message", "type", "param", "code"}}``): the message names the field, the value and what is allowed.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from slimtune.serve.engine import Completion

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with HTTP ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. ``max_prompt_tokens`` None: the model's context minus one."""

    max_tokens: int = 1024
    max_n: int = 8
    max_prompts: int = 32
    max_prompt_tokens: int | None = None
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True)
class CompletionCall:
    """A validated /v1/completions or /v1/chat/completions body."""

    model: str
    prompts: tuple[Any, ...]  # text, or token ids (completions only), or a chat's message list
    chat: bool
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    n: int
    stream: bool
    include_usage: bool


def parse_call(body: Any, chat: bool, limits: Limits) -> CompletionCall:
    """Validate ``body`` (parsed JSON). Raises ApiError(400 or 422) naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, f"model={model!r}: required, the name of the base or of an adapter", "model")
    prompts = (_messages(body.get("messages")),) if chat else _prompts(body.get("prompt"), limits)
    max_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, max_key, 16 if not chat else min(256, limits.max_tokens), 1, limits.max_tokens)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, f"stream_options={stream_options!r}: must be an object", "stream_options")
    return CompletionCall(
        model=model, prompts=prompts, chat=chat, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=_number(body, "top_p", 1.0, 0.0, 1.0, True),
        seed=_optional_int(body, "seed"), stop=_stop(body.get("stop")), n=_int(body, "n", 1, 1, limits.max_n),
        stream=_bool(body, "stream"), include_usage=bool(stream_options.get("include_usage", False)))


def _prompts(prompt: Any, limits: Limits) -> tuple[Any, ...]:
    if isinstance(prompt, str) and prompt:
        return (prompt,)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return (list(prompt),)  # one prompt of token ids
    if isinstance(prompt, list) and 0 < len(prompt) <= limits.max_prompts and all(
            isinstance(p, str) and p for p in prompt):
        return tuple(prompt)
    if isinstance(prompt, list) and len(prompt) > limits.max_prompts:
        raise ApiError(400, f"prompt: {len(prompt)} prompts in one request; at most {limits.max_prompts}", "prompt")
    raise ApiError(400, f"prompt={_short(prompt)}: must be a non-empty string, a list of them, or a list of token "
                   "ids", "prompt")


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"messages={_short(messages)}: must be a non-empty list of {{role, content}}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ApiError(400, f"messages[{i}]={_short(m)}: must be {{'role': system|user|assistant, 'content': "
                           "text}}", f"messages[{i}]")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _int(body: dict, key: str, default: int, low: int, high: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{key}={_short(value)}: must be an integer", key)
    if not low <= value <= high:
        raise ApiError(400, f"{key}={value}: must be between {low} and {high} (this server's limit)", key,
                       "limit_exceeded" if value > high else None)
    return value


def _optional_int(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ApiError(400, f"{key}={_short(value)}: must be an integer", key)
    return value


def _number(body: dict, key: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value > high or value < low or (open_low and value == low):
        where = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ApiError(400, f"{key}={_short(value)}: must be a number in {where}", key)
    return float(value)


def _bool(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool) and value is not None:
        raise ApiError(400, f"{key}={_short(value)}: must be true or false", key)
    return bool(value)


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or len(items) > 4 or not all(isinstance(s, str) and s for s in items):
        raise ApiError(400, f"stop={_short(stop)}: must be a non-empty string or a list of up to 4", "stop")
    return tuple(items)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- responses -------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def choice(index: int, done: Completion, chat: bool) -> dict[str, Any]:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": done.text},
                "logprobs": None, "finish_reason": done.finish_reason}
    return {"index": index, "text": done.text, "logprobs": None, "finish_reason": done.finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(call: CompletionCall, rid: str, choices: list[dict], use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion" if call.chat else "text_completion", "created": int(time.time()),
            "model": call.model, "choices": choices, "usage": use}


def chunk(call: CompletionCall, rid: str, index: int, text: str | None, finish: str | None,
          first: bool = False) -> dict[str, Any]:
    """One streamed piece: ``text`` (None: none) for choice ``index``; ``finish`` on the last."""
    if call.chat:
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        piece = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        piece = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk" if call.chat else "text_completion",
            "created": int(time.time()), "model": call.model, "choices": [piece]}

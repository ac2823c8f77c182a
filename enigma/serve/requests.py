"""OpenAI-style requests and responses: each request body checked (a bad one is a 400 with an
OpenAI error body, never a 500), and the JSON objects and server-sent events answered."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from .sampling import Sampling


class RequestError(Exception):
    """A request the server refuses: its HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.param = status, param
        self.code = code or ("invalid_api_key" if status == 401 else "invalid_request")

    def body(self) -> dict:
        kind = "authentication_error" if self.status == 401 else "invalid_request_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param,
                          "code": self.code}}  # fmt: skip


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    return body


def _number(body: dict, name: str, default, kind, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise RequestError(400, f"'{name}' must be {'a number' if kind is float else 'an integer'}",
                           name)  # fmt: skip
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(400, f"'{name}' must be between {low} and {high}, got {value}", name)
    return kind(value)


def sampling(body: dict, default_max: int = 16) -> Sampling:
    max_tokens = _number(body, "max_tokens", default_max, int)
    if max_tokens <= 0:
        raise RequestError(400, f"'max_tokens' must be positive, got {max_tokens}", "max_tokens")
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n=1 is served", "n")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0),
        top_k=_number(body, "top_k", 0, int, 0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, float, 0.01, 10.0),
    )


def text_field(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise RequestError(400, f"'{name}' must be a string", name)
    return value


def messages_field(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        ok = isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
        if not ok or not isinstance(m.get("content"), str):
            raise RequestError(400, f"messages[{i}] needs a 'role' of system, user or assistant "
                               "and a 'content' string", "messages")  # fmt: skip
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def stream_flag(body: dict) -> bool:
    value = body.get("stream", False)
    if not isinstance(value, bool):
        raise RequestError(400, "'stream' must be true or false", "stream")
    return value


@dataclass
class Answer:
    """One request's answer as it grows: its text, its tokens, why it ended."""

    kind: str  # "text_completion" or "chat.completion"
    model: str
    prompt_tokens: int
    id: str = ""
    created: int = 0
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None

    def __post_init__(self):
        prefix = "cmpl" if self.kind == "text_completion" else "chatcmpl"
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens,
                "total_tokens": self.prompt_tokens + self.tokens}  # fmt: skip

    def whole(self) -> dict:
        if self.kind == "text_completion":
            choice = {"index": 0, "text": self.text, "logprobs": None}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text}}
        choice["finish_reason"] = self.finish_reason
        return {"id": self.id, "object": self.kind, "created": self.created,
                "model": self.model, "choices": [choice], "usage": self.usage()}  # fmt: skip

    def chunk(self, delta: str | None, first: bool = False) -> str:
        """One server-sent event: ``delta`` of text, or (None) the end with its reason."""
        if self.kind == "text_completion":
            choice = {"index": 0, "text": delta or "", "logprobs": None}
            kind = "text_completion"
        else:
            content = {} if delta is None else {"content": delta}
            choice = {"index": 0, "delta": {"role": "assistant", **content} if first else content}
            kind = "chat.completion.chunk"
        choice["finish_reason"] = self.finish_reason if delta is None else None
        event = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                 "choices": [choice]}  # fmt: skip
        return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"

"""OpenAI-style request bodies, checked at the door: every field's type and range, so nothing
that reaches the engine can fail a step. A bad field is a 400 with an OpenAI error body naming
it; an unknown model a 404; what the server does not do (``best_of``, ``suffix``, tools) a 400
saying so rather than an answer that silently ignores it.

``/v1/completions`` takes ``prompt`` in each form the API allows: a string, a list of strings,
a list of token ids, or a list of such lists; several prompts (and ``n`` choices of each) are
answered as several choices, indexed prompt by prompt.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .sampling import Sampling

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts per request


class RequestError(Exception):
    """A request the server refuses: its HTTP status and an OpenAI-style error body."""

    KINDS = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}  # fmt: skip

    def __init__(self, status: int, message: str, param: str | None = None, code=None,
                 retry_after: float | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.param, self.retry_after = status, param, retry_after
        self.code = code or ("invalid_api_key" if status == 401 else "invalid_request")

    def body(self) -> dict:
        kind = self.KINDS.get(self.status, "invalid_request_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param,
                          "code": self.code}}  # fmt: skip


@dataclass
class Job:
    """One checked request: its prompts as token ids, how each choice samples, and how the
    answer is shaped."""

    chat: bool
    prompts: list[list[int]]
    texts: list[str | None]  # each prompt's own text where it came as one (echo repeats it)
    sampling: Sampling
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    return body


def _number(body: dict, name: str, default, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RequestError(400, f"'{name}' must be {'an integer' if integer else 'a number'}",
                           name)  # fmt: skip
    if not integer and not math.isfinite(value):
        raise RequestError(400, f"'{name}' must be a finite number, got {value}", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(400, f"'{name}' must be true or false", name)
    return value


def refuse_unserved(body: dict, chat: bool) -> None:
    if body.get("best_of") not in (None, 1, body.get("n", 1)):
        raise RequestError(400, "'best_of' is not served: ask for 'n' choices", "best_of")
    if body.get("suffix"):
        raise RequestError(400, "'suffix' (insertion) is not served", "suffix")
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(name) not in (None, [], "none"):
            raise RequestError(400, f"'{name}' is not served: this model has no tool calls", name)
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise RequestError(400, "'response_format' other than text is not served",
                           "response_format")  # fmt: skip


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    return tuple(s for s in stop if s)


def _logit_bias(body: dict, vocab: int) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise RequestError(400, "'logit_bias' must map token ids to numbers", "logit_bias")
    pairs = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise RequestError(400, f"'logit_bias' key {key!r} is not a token id",
                               "logit_bias") from None  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(400, "'logit_bias' values must be numbers", "logit_bias")
        pairs.append((token, float(value)))
    return tuple(pairs)


def sampling(body: dict, chat: bool, vocab: int, room: int) -> tuple[Sampling, int]:
    """The request's :class:`Sampling` (checked by :meth:`Sampling.problem` too) and ``n``.
    ``room``: the most tokens a reply could have (the model's length less the prompt)."""
    max_tokens = _number(body, "max_tokens", None, integer=True)
    if chat:
        max_tokens = _number(body, "max_completion_tokens", max_tokens, integer=True)
    max_tokens = (room if chat else 16) if max_tokens is None else max_tokens
    echo = not chat and _flag(body, "echo")
    if max_tokens < (0 if echo else 1):
        raise RequestError(400, f"'max_tokens' must be at least {0 if echo else 1} "
                           f"(0 only with echo), got {max_tokens}", "max_tokens")  # fmt: skip
    top_k = _number(body, "top_k", 0, integer=True)
    n = _number(body, "n", 1, integer=True)
    if not 1 <= n <= MAX_N:
        raise RequestError(400, f"'n' must be 1 to {MAX_N}, got {n}", "n")
    seed = _number(body, "seed", None, integer=True)
    logprobs, prompt_logprobs = _logprob_counts(body, chat, echo)
    settings = Sampling(
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0)),
        top_p=float(_number(body, "top_p", 1.0)),
        top_k=0 if top_k == -1 else top_k,  # -1: off, as in vLLM
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0)),
        presence_penalty=float(_number(body, "presence_penalty", 0.0)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0)),
        seed=None if seed is None else seed % (1 << 63),
        stop=_stop(body),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=_logit_bias(body, vocab),
    )
    problem = settings.problem(vocab)
    if problem:
        raise RequestError(400, problem[1], problem[0])
    return settings, n


def _logprob_counts(body: dict, chat: bool, echo: bool) -> tuple[int | None, int | None]:
    """(alternatives per generated token, per prompt token) or None for none asked."""
    if chat:
        top = _number(body, "top_logprobs", None, integer=True)
        if not _flag(body, "logprobs"):
            if top:
                raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return None, None
        return top or 0, None
    count = _number(body, "logprobs", None, integer=True)
    return count, (count or 0) if echo else None


def stream_options(body: dict, stream: bool) -> bool:
    """``stream_options.include_usage``; the options without ``stream`` are a 400."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise RequestError(400, """'stream_options' is only allowed with "stream": true""",
                           "stream_options")  # fmt: skip
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError(400, """'stream_options' must be {"include_usage": true|false}""",
                           "stream_options")  # fmt: skip
    return options.get("include_usage", False)


def completion_prompts(body: dict, encode, vocab: int) -> tuple[list[list[int]], list]:
    """The prompts of a completion request as token ids, and each one's text (None for ids)."""
    prompt = body.get("prompt")
    what = ("'prompt' must be a string, a list of strings, a list of token ids or a list of "
            "such lists")  # fmt: skip
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(_is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise RequestError(400, what, "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(400, f"at most {MAX_PROMPTS} prompts in one request", "prompt")
    ids, texts = [], []
    for p in prompts:
        if isinstance(p, str):
            ids.append(encode(p))
            texts.append(p)
        else:
            if min(p) < 0 or max(p) >= vocab:
                raise RequestError(400, f"token ids must lie in [0, {vocab})", "prompt")
            ids.append(list(p))
            texts.append(None)
        if not ids[-1]:
            raise RequestError(400, "a prompt is empty (no tokens)", "prompt")
    return ids, texts


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_id(t) for t in value)


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def messages_field(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    checked = []
    for i, m in enumerate(messages):
        ok = isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
        content = m.get("content") if ok else None
        if isinstance(content, list):  # the API's content parts: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):  # fmt: skip
                raise RequestError(400, f"messages[{i}]: only text content parts are served",
                                   "messages")  # fmt: skip
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(400, f"messages[{i}] needs a 'role' of system, user or assistant "
                               "and a 'content' string", "messages")  # fmt: skip
        checked.append({"role": m["role"], "content": content})
    return checked


def chat_prompt(tokenizer, body: dict, name: str) -> list[int]:
    """A chat request's messages as the prompt's token ids, laid out as the model's chat
    template lays them (content as text: :func:`~enigma.data.conversations.encode_chat`); a 400
    naming the missing template for a model that has none."""
    from ..data.conversations import encode_chat

    messages = messages_field(body)
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError(400, f"model {name} has no chat template (a pretrained model): "
                           "use /v1/completions", "messages", "no_chat_template")  # fmt: skip
    return encode_chat(tokenizer, messages, add_generation_prompt=True)[0]


def check_model(body: dict, name: str) -> None:
    model = body.get("model")
    if model is not None and model != name:
        raise RequestError(404, f"the model '{model}' does not exist: this server serves "
                           f"'{name}' (GET /v1/models)", "model", "model_not_found")  # fmt: skip

"""OpenAI-style answers built from the engine's outputs: the whole JSON object, or server-sent
events as the text comes, with ``logprobs`` in each endpoint's own shape.

- ``/v1/completions``: ``logprobs`` is ``{"tokens", "token_logprobs", "top_logprobs",
  "text_offset"}``; with ``echo`` the prompt's tokens come first (the first with no
  log-probability), which is how lm-evaluation-harness scores a continuation. A token's
  ``top_logprobs`` holds the most likely alternatives and the token itself, as vLLM's do.
- ``/v1/chat/completions``: ``logprobs.content`` is a list of ``{"token", "logprob", "bytes",
  "top_logprobs"}``.

Log-probabilities are the model's own (a log-softmax of its logits), before temperature and
penalties. Token strings are WordPiece tokens (``##`` marks a piece inside a word).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ..data.tokenizer import join_cjk
from .engine import Output
from .requests import Job, RequestError

DONE = "data: [DONE]\n\n"


@dataclass
class Choice:
    index: int
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    started: bool = False  # a chat stream's first delta names the role
    echoed: bool = False
    logprobs: dict | None = None


class Answer:
    """One request's answer as its outputs come, choice by choice."""

    def __init__(self, job: Job, model: str, tokenizer):
        self.job, self.model, self.tokenizer = job, model, tokenizer
        self.kind = "chat.completion" if job.chat else "text_completion"
        prefix = "chatcmpl" if job.chat else "cmpl"
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
        self.choices = [Choice(i) for i in range(job.choices)]
        self.prompt_tokens = sum(len(p) for p in job.prompts)
        self._names: dict[int, str] = {}

    # turning outputs into choices
    def add(self, out: Output) -> dict:
        """Fold an output into its choice; returns the new part as ``{"text", "logprobs"}``."""
        choice = self.choices[out.index]
        text, logprobs = "", None
        if self.job.echo and not choice.echoed:  # the prompt before a completion's own text
            choice.echoed = True
            text = self._prompt_text(out.index // self.job.n)
            if out.prompt_logprobs is not None:
                logprobs = self._logprobs(choice, out.prompt_logprobs, len(choice.text))
            choice.text += text
        if out.logprobs:
            more = self._logprobs(choice, out.logprobs, len(choice.text))
            logprobs = _join_logprobs(logprobs, more)
        choice.text += out.text
        choice.tokens += len(out.tokens)
        if out.finish_reason:
            choice.finish_reason, choice.error = out.finish_reason, out.error
        return {"text": text + out.text, "logprobs": logprobs}

    def _prompt_text(self, prompt: int) -> str:
        text = self.job.texts[prompt]
        if text is None:  # token ids: their text as decoded
            text = join_cjk(self.tokenizer.decode(self.job.prompts[prompt]))
        return text

    def _logprobs(self, choice: Choice, entries: list[tuple], offset: int) -> dict:
        """Add ``(token, logprob, alternatives)`` entries to the choice; returns them in the
        endpoint's shape (a streamed chunk carries only its own)."""
        if self.job.chat:
            part = {"content": [self._chat_entry(t, lp, top) for t, lp, top in entries]}
            if choice.logprobs is None:
                choice.logprobs = {"content": []}
            choice.logprobs["content"] += part["content"]
            return part
        part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp, top in entries:
            name = self.name(token)
            part["tokens"].append(name)
            part["token_logprobs"].append(lp)
            alternatives = {self.name(t): v for t, v in top}
            if lp is not None:
                alternatives.setdefault(name, lp)
            part["top_logprobs"].append(alternatives if lp is not None else None)
            part["text_offset"].append(offset)
            offset += len(name.removeprefix("##"))
        if choice.logprobs is None:
            choice.logprobs = {k: [] for k in part}
        for k, v in part.items():
            choice.logprobs[k] += v
        return part

    def _chat_entry(self, token: int, lp: float, top: list) -> dict:
        name = self.name(token)
        alternatives = [{"token": self.name(t), "logprob": v,
                         "bytes": list(self.name(t).encode())} for t, v in top]  # fmt: skip
        return {"token": name, "logprob": lp, "bytes": list(name.encode()),
                "top_logprobs": alternatives}  # fmt: skip

    def name(self, token: int) -> str:
        if token not in self._names:
            self._names[token] = self.tokenizer.convert_ids_to_tokens(token)
        return self._names[token]

    # what goes back
    def failure(self) -> RequestError | None:
        failed = [c for c in self.choices if c.error]
        if not failed:
            return None
        return RequestError(500, f"the request failed while generating: {failed[0].error}",
                            code="generation_failed")  # fmt: skip

    def usage(self) -> dict:
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}  # fmt: skip

    def whole(self) -> dict:
        choices = []
        for c in self.choices:
            if self.job.chat:
                choice = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                          "logprobs": c.logprobs}  # fmt: skip
            else:
                choice = {"index": c.index, "text": c.text, "logprobs": c.logprobs}
            choice["finish_reason"] = c.finish_reason
            choices.append(choice)
        return {"id": self.id, "object": self.kind, "created": self.created,
                "model": self.model, "choices": choices, "usage": self.usage()}  # fmt: skip

    def chunk(self, pieces: list[tuple[Choice, dict, bool]]) -> str:
        """One server-sent event carrying each given choice's new piece (and its end)."""
        choices = []
        for choice, piece, ended in pieces:
            if self.job.chat:
                delta = {"content": piece["text"]} if piece["text"] else {}
                if not choice.started:
                    delta = {"role": "assistant", **delta}
                entry = {"index": choice.index, "delta": delta, "logprobs": piece["logprobs"]}
            else:
                entry = {"index": choice.index, "text": piece["text"],
                         "logprobs": piece["logprobs"]}  # fmt: skip
            choice.started = True
            entry["finish_reason"] = choice.finish_reason if ended else None
            choices.append(entry)
        kind = "chat.completion.chunk" if self.job.chat else "text_completion"
        event = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                 "choices": choices}  # fmt: skip
        if self.job.include_usage:
            event["usage"] = None
        return sse(event)

    def usage_chunk(self) -> str:
        kind = "chat.completion.chunk" if self.job.chat else "text_completion"
        return sse({"id": self.id, "object": kind, "created": self.created, "model": self.model,
                    "choices": [], "usage": self.usage()})  # fmt: skip


@dataclass
class Pieces:
    """A streamed step's pieces, merged per choice (a reader that fell behind gets one larger
    piece per choice rather than many)."""

    order: list[int] = field(default_factory=list)
    merged: dict[int, tuple] = field(default_factory=dict)

    def add(self, choice: Choice, piece: dict, ended: bool) -> None:
        if choice.index not in self.merged:
            self.order.append(choice.index)
            self.merged[choice.index] = (choice, piece, ended)
            return
        _, before, _ = self.merged[choice.index]
        text = before["text"] + piece["text"]
        logprobs = _join_logprobs(before["logprobs"], piece["logprobs"])
        self.merged[choice.index] = (choice, {"text": text, "logprobs": logprobs}, ended)

    def items(self) -> list[tuple]:
        return [self.merged[i] for i in self.order]


def _join_logprobs(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return a or b
    return {k: a[k] + b[k] for k in a}


def sse(event: dict) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"

"""The Ray Serve application: an OpenAI-compatible HTTP API over one saved model.

``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``"stream":
true`` answers with server-sent events ending in ``data: [DONE]``), and ``GET /stats`` (requests,
batches, model calls). Requests that arrive together are decoded together: ``@serve.batch``
gathers them (up to ``max_batch_size``, waiting at most ``batch_wait_s`` for more) into one
left-padded batch (:mod:`enigma.serve.sampling`), whose tokens stream back to each request as
they come. With an API key every request needs ``Authorization: Bearer KEY`` (else 401). A bad
request is a 400 with an OpenAI error body (:mod:`enigma.serve.requests`).
"""

import asyncio
import hmac
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from .requests import (
    DONE,
    Answer,
    RequestError,
    messages_field,
    parse_body,
    sampling,
    stream_flag,
    text_field,
)
from .sampling import Sampling

api = FastAPI(title="EnigmaLM (OpenAI-compatible)")


@dataclass
class Job:
    prompt: list[int]
    settings: Sampling


def prompt_ids(tokenizer, body: dict, chat: bool, name: str) -> list[int]:
    """A request's prompt as token ids: its text, or its messages through the chat template
    (a 400 naming the missing template when the model has none)."""
    if not chat:
        ids = tokenizer(text_field(body, "prompt"), add_special_tokens=False).input_ids
    elif not getattr(tokenizer, "chat_template", None):
        raise RequestError(400, f"model {name} has no chat template (a pretrained model): "
                           "use /v1/completions", "messages", "no_chat_template")  # fmt: skip
    else:
        out = tokenizer.apply_chat_template(messages_field(body), add_generation_prompt=True)
        ids = list(out["input_ids"])
    if not ids:
        raise RequestError(400, "the prompt is empty", "prompt")
    return ids


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(api)
class ModelServer:
    def __init__(self, model_dir: str, name: str, api_key: str | None = None,
                 max_batch_size: int = 16, batch_wait_s: float = 0.02):  # fmt: skip
        from ..data.tokenizer import join_cjk, load_tokenizer
        from ..inference.generate import load_model
        from .sampling import BatchGenerator

        self.model = load_model(model_dir)
        self.tokenizer = load_tokenizer(model_dir, quiet=True)
        self.name, self.api_key, self.join = name, api_key, join_cjk
        config = self.model.config
        self.generator = BatchGenerator(self.model, config.eos_token_id, config.pad_token_id)
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def generate_batch(self, jobs: list[Job]):
        """One batch's tokens, step by step: each job's new token, ``StopIteration`` once it
        has ended."""
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        steps = self.generator.stream([j.prompt for j in jobs], [j.settings for j in jobs])
        while (tokens := await asyncio.to_thread(next, steps, None)) is not None:
            yield [StopIteration if t is None else t for t in tokens]

    def authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise RequestError(401, "a valid API key is needed: Authorization: Bearer KEY")

    async def answer(self, request: Request, chat: bool):
        try:
            self.authorize(request)
            body = parse_body(await request.body())
            settings, stream = sampling(body), stream_flag(body)
            if body.get("stop") not in (None, [], ""):
                raise RequestError(400, "'stop' is not supported: the reply ends at the model's "
                                   "end of sequence or max_tokens", "stop")  # fmt: skip
            prompt = prompt_ids(self.tokenizer, body, chat, self.name)
            room = self.model.config.max_len
            if len(prompt) + settings.max_tokens > room:
                raise RequestError(400, f"the prompt's {len(prompt)} tokens and max_tokens "
                                   f"{settings.max_tokens} exceed the model's {room}", "max_tokens",
                                   "context_length_exceeded")  # fmt: skip
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        self.stats["requests"] += 1
        answer = Answer("chat.completion" if chat else "text_completion", self.name, len(prompt))
        tokens = self.generate_batch(Job(prompt, settings))
        if stream:
            events = self.events(answer, tokens, settings.max_tokens)
            return StreamingResponse(events, media_type="text/event-stream")
        async for _ in self.grow(answer, tokens, settings.max_tokens):
            pass
        return JSONResponse(answer.whole())

    async def grow(self, answer: Answer, tokens, max_tokens: int):
        """The answer's text as its tokens come; yields each new piece of text."""
        ids = []
        async for token in tokens:
            ids.append(token)
            text = self.join(self.tokenizer.decode(ids, skip_special_tokens=True))
            if text.startswith(answer.text) and len(text) > len(answer.text):
                piece, answer.text = text[len(answer.text) :], text
                yield piece
        answer.tokens = len(ids)
        answer.finish_reason = "length" if len(ids) >= max_tokens else "stop"

    async def events(self, answer: Answer, tokens, max_tokens: int):
        first = True
        async for piece in self.grow(answer, tokens, max_tokens):
            yield answer.chunk(piece, first)
            first = False
        yield answer.chunk(None, first)
        yield DONE

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self.authorize(request)
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        model = {"id": self.name, "object": "model", "created": 0, "owned_by": "enigma"}
        return {"object": "list", "data": [model]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self.answer(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self.answer(request, chat=True)

    @api.get("/stats")
    async def statistics(self):
        return {**self.stats, "model_calls": self.generator.calls}


def build_app(args: dict):
    """The application ``serve deploy`` / ``serve run`` build from a config's ``args``:
    ``model`` (a saved model directory every replica's node can read), and optionally ``name``,
    ``api_key`` or ``api_key_env`` (the variable that holds it where the application is built,
    ``ENIGMA_API_KEY`` by default), ``replicas``, ``gpus_per_replica``, ``max_batch_size``,
    ``batch_wait_ms``."""
    import os
    from pathlib import Path

    model = str(Path(args["model"]).resolve())
    key_env = args.get("api_key_env", "ENIGMA_API_KEY")
    actor = {"num_cpus": 1, "num_gpus": float(args.get("gpus_per_replica", 0))}
    server = ModelServer.options(num_replicas=int(args.get("replicas", 1)), ray_actor_options=actor)
    key = args.get("api_key") or os.environ.get(key_env)
    return server.bind(model, args.get("name") or Path(model).name, key,
                       int(args.get("max_batch_size", 16)),
                       float(args.get("batch_wait_ms", 20)) / 1000)  # fmt: skip

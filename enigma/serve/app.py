"""The Ray Serve application: an OpenAI-compatible HTTP layer over one engine per replica.

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``"stream": true``
answers with server-sent events ending in ``data: [DONE]``), ``GET /health`` and ``GET /stats``.
The handlers only check requests (:mod:`enigma.serve.requests`), hand them to the replica's
engine process (:mod:`enigma.serve.engine_process`) and shape what comes back
(:mod:`enigma.serve.responses`); the engine decides, step by step, which rows run.

At the door: an API key where one is set (401), a body over ``max_body_bytes`` (413), an unknown
model (404), a bad parameter (400), a full queue (429 with ``Retry-After``). A request whose
rows fail inside a step answers 500 (or an ``error`` event, then ``[DONE]``) and no other
request notices. A client that disconnects frees its rows at the next step.
"""

import hmac
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from .engine_process import Choice
from .requests import (
    Job,
    RequestError,
    chat_prompt,
    check_model,
    completion_prompts,
    parse_body,
    refuse_unserved,
    sampling,
    stream_options,
)
from .responses import DONE, Answer, Pieces, sse
from .scheduler import QueueFull

api = FastAPI(title="EnigmaLM (OpenAI-compatible)")


def replica_device(gpus: float, gpu_ids: list, cuda_available: bool):
    """Where a replica's model runs: the GPU Ray assigned it (Ray narrows
    ``CUDA_VISIBLE_DEVICES`` to it, so it is ``cuda:0`` here), else the CPU."""
    import torch

    if gpus <= 0:
        return torch.device("cpu")
    if not gpu_ids or not cuda_available:
        raise RuntimeError(f"the replica was given {gpus} GPU(s) but sees none (Ray's GPU ids "
                           f"{gpu_ids}, CUDA available: {cuda_available}): install a CUDA build "
                           "of torch there, or serve with --gpus-per-replica 0")  # fmt: skip
    return torch.device("cuda", 0)


def error_response(err: RequestError) -> JSONResponse:
    headers = {"Retry-After": f"{err.retry_after:g}"} if err.retry_after else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# Ray Serve ships this class to its replicas by value: what its methods call must be defined
# above it.
@serve.deployment
@serve.ingress(api)
class ModelServer:
    def __init__(self, model_dir: str, name: str, api_key: str | None = None,
                 max_batch_size: int = 16, max_queue: int = 256,
                 max_body_bytes: int = 4 << 20, gpus: float = 0, cpus: float = 1,
                 policy: str = "continuous", batch_wait_s: float = 0.02,
                 stream_chunks_per_s: float = 400):  # fmt: skip
        import ray
        import torch

        from ..data.tokenizer import load_tokenizer
        from ..storage.mirror import local_model
        from .engine_process import EngineProcess

        device = replica_device(gpus, ray.get_gpu_ids(), torch.cuda.is_available())
        model_dir = local_model(model_dir)  # a URI: mirrored once on this replica's node
        self.tokenizer = load_tokenizer(model_dir, quiet=True)
        self.name, self.api_key, self.max_body = name, api_key, max_body_bytes
        self.chunks_per_s = stream_chunks_per_s
        self.engine = EngineProcess(
            model_dir, device=str(device), threads=max(1, int(cpus)), max_rows=max_batch_size,
            max_queue=max_queue, policy=policy, batch_wait_s=batch_wait_s,
        )  # fmt: skip
        self.vocab, self.max_len = self.engine.info["vocab_size"], self.engine.info["max_len"]

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()

    def check_health(self):
        """Ray Serve's health check: a replica whose engine process died is replaced."""
        if not self.engine.alive():
            raise RuntimeError("the engine process has stopped")

    def authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise RequestError(401, "a valid API key is needed: Authorization: Bearer KEY")

    async def read(self, request: Request) -> dict:
        """The body, refused (413) past ``max_body_bytes`` before it is all read."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise RequestError(413, f"the body's {int(declared):,} bytes exceed the server's "
                               f"limit of {self.max_body:,}", code="body_too_large")  # fmt: skip
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > self.max_body:
                raise RequestError(413, f"the body exceeds the server's limit of "
                                   f"{self.max_body:,} bytes", code="body_too_large")  # fmt: skip
        return parse_body(bytes(raw))

    def job(self, body: dict, chat: bool) -> Job:
        """A checked request: its prompts and how each choice samples."""
        check_model(body, self.name)
        refuse_unserved(body, chat)
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise RequestError(400, "'stream' must be true or false", "stream")
        if chat:
            prompts, texts = [chat_prompt(self.tokenizer, body, self.name)], [None]
        else:
            encode = lambda text: self.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
            prompts, texts = completion_prompts(body, encode, self.vocab)
        longest = max(len(p) for p in prompts)
        settings, n = sampling(body, chat, self.vocab, max(1, self.max_len - longest))
        if longest + settings.max_tokens > self.max_len:
            raise RequestError(400, f"the prompt's {longest} tokens and max_tokens "
                               f"{settings.max_tokens} exceed the model's {self.max_len}",
                               "max_tokens", "context_length_exceeded")  # fmt: skip
        echo = not chat and bool(body.get("echo"))
        return Job(chat, prompts, texts, settings, n, stream, stream_options(body, stream), echo)

    async def answer(self, request: Request, chat: bool):
        try:
            self.authorize(request)
            job = self.job(await self.read(request), chat)
            request_id = uuid.uuid4().hex
            choices = [
                Choice(request_id, p * job.n + j, prompt, job.sampling, continues_prompt=not chat)
                for p, prompt in enumerate(job.prompts)
                for j in range(job.n)
            ]
            box = self.engine.submit(choices, job.stream)
        except RequestError as err:
            return error_response(err)
        except QueueFull as err:
            return error_response(RequestError(429, f"the server is busy: {err}; retry later",
                                               code="queue_full", retry_after=1))  # fmt: skip
        answer = Answer(job, self.name, self.tokenizer)
        outputs = self.engine.outputs(box, self.chunks_per_s)
        if job.stream:
            return StreamingResponse(self.events(answer, outputs), media_type="text/event-stream")
        async for batch in outputs:
            for out in batch:
                answer.add(out)
        failure = answer.failure()
        return error_response(failure) if failure else JSONResponse(answer.whole())

    async def events(self, answer: Answer, outputs):
        async for batch in outputs:
            pieces = Pieces()
            for out in batch:
                piece = answer.add(out)
                pieces.add(answer.choices[out.index], piece, bool(out.finish_reason))
            failure = answer.failure()
            if failure:
                yield sse(failure.body())
                await outputs.aclose()  # the request's other choices stop too
                break
            yield answer.chunk(pieces.items())
        else:
            if answer.job.include_usage:
                yield answer.usage_chunk()
        yield DONE

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self.authorize(request)
        except RequestError as err:
            return error_response(err)
        model = {"id": self.name, "object": "model", "created": 0, "owned_by": "enigma",
                 "max_model_len": self.max_len}  # fmt: skip
        return {"object": "list", "data": [model]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self.answer(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self.answer(request, chat=True)

    @api.get("/health")
    async def health(self):
        alive = self.engine.alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"},
                            status_code=200 if alive else 503)  # fmt: skip

    @api.get("/stats")
    async def statistics(self):
        """The engine's counters: requests, steps, model calls, tokens, rows running and
        waiting, and seconds in the model, in sampling and in steps."""
        return await self.engine.stats()


def model_name(model: str) -> str:
    """The served name by default: the model directory's, of a local path or a URI."""
    from pathlib import Path

    if "://" in model:
        return model.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]
    return Path(model).resolve().name


def build_app(args: dict):
    """The application ``serve deploy`` / ``serve run`` build from a config's ``args``:
    ``model`` (a saved model directory every replica's node can read, or its storage URI,
    which each node mirrors once: :mod:`enigma.storage.mirror`), and optionally ``name``,
    ``api_key`` or ``api_key_env`` (the variable that holds it where the application is built;
    naming one that is unset refuses to deploy; without either, ``ENIGMA_API_KEY`` if set),
    ``replicas``, ``gpus_per_replica``, ``cpus_per_replica``, ``max_batch_size``, ``max_queue``,
    ``max_body_bytes``, ``scheduling`` (``continuous``, or ``static`` to measure against) and
    ``batch_wait_ms`` (static batching's window) and ``stream_chunks_per_s`` (the streamed
    chunks a second the open streams share; 0: a chunk per token)."""
    import os
    from pathlib import Path

    from ..storage.store import check_storage_path, is_uri

    check_storage_path(args["model"], "model")  # credentials would sit in the app's config
    model = args["model"] if is_uri(args["model"]) else str(Path(args["model"]).resolve())
    key = args.get("api_key")
    if not key and args.get("api_key_env"):
        key = os.environ.get(args["api_key_env"])
        if not key:
            raise ValueError(f"api_key_env names {args['api_key_env']}, which is unset where the "
                             "application is built: set it, or remove api_key_env to serve "
                             "without a key")  # fmt: skip
    elif not key:
        key = os.environ.get("ENIGMA_API_KEY") or None
    rows, queue = int(args.get("max_batch_size", 16)), int(args.get("max_queue", 256))
    gpus, cpus = float(args.get("gpus_per_replica", 0)), float(args.get("cpus_per_replica", 1))
    server = ModelServer.options(
        num_replicas=int(args.get("replicas", 1)),
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
        # the engine queues and refuses (429) itself; Serve's own limits sit above its
        max_ongoing_requests=rows + queue + 16,
        max_queued_requests=queue,
    )
    return server.bind(
        model, args.get("name") or model_name(model), key, rows, queue,
        int(args.get("max_body_bytes", 4 << 20)), gpus, cpus,
        args.get("scheduling", "continuous"), float(args.get("batch_wait_ms", 20)) / 1000,
        float(args.get("stream_chunks_per_s", 400)),
    )  # fmt: skip

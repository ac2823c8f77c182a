"""``enigma bench serve``: the OpenAI endpoint under bounded load on loopback, EnigmaLM against the
plain Transformer of the same size.

For each model an ``enigma serve`` application runs on a local Ray cluster; ``C`` client threads
(C = 1, 4, 16) each send ``--requests`` streamed ``/v1/completions`` back to back. Reported per
model and C: requests/s, generated tokens/s, time to the first token and p50/p95 latency. With
one stream at a time every request is decoded alone; with 16, the server batches those that
arrive together, so tokens/s should grow with C. The plain Transformer is EnigmaLM's shape with
``core="none"`` (its weights random: speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import urllib.request
from pathlib import Path

from ..errors import InputError
from . import meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="runs/demo/model", help="a saved EnigmaLM (make demo)")
    p.add_argument("--streams", default="1,4,16", help="concurrent client streams, in turn")
    p.add_argument("--requests", type=int, default=4, help="requests per stream")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--output-dir", default="runs/bench-serve", help="the plain model is saved here")
    p.add_argument("--json", dest="json_out", default=None)


def plain_twin(model_dir: Path, out: Path) -> Path:
    """The plain Transformer of the model's size (random weights), with its tokenizer."""
    import shutil

    import torch

    from ..models.lm import EnigmaLM

    config = EnigmaLM.config_class.from_pretrained(model_dir)
    config.core = "none"
    torch.manual_seed(0)
    EnigmaLM(config).save_pretrained(out)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def one_request(base: str, prompt: str, max_tokens: int) -> dict:
    """A streamed completion: seconds to its first token and in all, tokens received."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True}
    request = urllib.request.Request(f"{base}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    start, first, tokens = time.perf_counter(), None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if line.startswith(b"data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice["text"]:
                    tokens += 1
                    first = first or time.perf_counter() - start
    return {"ttft": first or 0.0, "latency": time.perf_counter() - start, "tokens": tokens}


def load(base: str, streams: int, requests: int, max_tokens: int) -> dict:
    """``streams`` threads, each sending ``requests`` requests back to back."""
    results: list[dict] = []
    prompts = ["话说天下大势", "却说曹操", "孔明笑曰", "玄德大喜"]

    def client(i):
        for j in range(requests):
            results.append(one_request(base, prompts[(i + j) % len(prompts)], max_tokens))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies = sorted(r["latency"] for r in results)
    return {
        "streams": streams, "requests": len(results), "wall_s": round(wall, 2),
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50_s": statistics.median(r["ttft"] for r in results),
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from ..cluster.ray_setup import init_ray
    from ..inference.generate import check_saved_model
    from ..serve.app import build_app

    if not (Path(args.model) / "config.json").is_file():
        raise InputError(f"{args.model} is not a saved model: run `make demo` first, or --model")
    check_saved_model(args.model)
    model = Path(args.model).resolve()
    work = Path(args.output_dir).resolve()
    models = {"enigma": model, "plain": plain_twin(model, work / "plain")}
    levels = [int(s) for s in args.streams.split(",")]
    result = {"benchmark": "serve", "model": args.model, "max_tokens": args.max_tokens,
              "requests_per_stream": args.requests, "max_batch_size": args.max_batch_size,
              "results": {}}  # fmt: skip
    init_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    try:
        for name, path in models.items():
            settings = {"max_batch_size": args.max_batch_size, "batch_wait_ms": 20}
            app = build_app({"model": str(path), "name": name, **settings})
            serve.run(app, name="bench", route_prefix="/")
            base = f"http://127.0.0.1:{args.port}"
            one_request(base, "热身", 4)  # the replica's first call pays for its warm-up
            rows = []
            for streams in levels:
                rows.append(load(base, streams, args.requests, args.max_tokens))
                r = rows[-1]
                print(f"{name}, {streams} stream(s): {r['tokens_per_s']:.0f} tokens/s, "
                      f"{r['requests_per_s']:.2f} requests/s, TTFT p50 {r['ttft_p50_s']:.2f} s, "
                      f"latency p50/p95 {r['latency_p50_s']:.2f}/{r['latency_p95_s']:.2f} s",
                      flush=True)  # fmt: skip
            with urllib.request.urlopen(f"{base}/stats", timeout=60) as response:
                stats = json.loads(response.read())
            result["results"][name] = {"levels": rows, "server": stats}
            serve.delete("bench")
    finally:  # a cluster this command joined keeps its Serve; one it started goes
        if not os.environ.get("RAY_ADDRESS"):
            serve.shutdown()
            ray.shutdown()
    meta.save(result, args.json_out, args.command_line)
    return result

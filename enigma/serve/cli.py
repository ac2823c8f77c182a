"""``enigma serve MODEL``: the OpenAI-compatible application (:mod:`enigma.serve.app`) on Ray
Serve, on a local cluster started here or on the one in ``RAY_ADDRESS``.

It listens on 127.0.0.1 unless ``--host`` says otherwise; ``--api-key`` (or ``ENIGMA_API_KEY``)
makes every request without ``Authorization: Bearer KEY`` a 401. A model directory that does not
load stops the command in one line before Ray starts. Ctrl-C (or SIGTERM) deletes the
application, and shuts down the cluster when this command started it.

``--ingress haproxy`` starts the cluster in Ray Serve's throughput-optimized mode: HAProxy (C)
takes the connections and hands them to the replicas' own HTTP servers, in place of Serve's
Python proxy actor, whose per-request and per-chunk work otherwise shares the machine with the
engine. It is a setting of the cluster's processes, so it applies to a cluster this command
starts; a cluster in ``RAY_ADDRESS`` is started with it (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1
RAY_SERVE_ENABLE_HA_PROXY=1`` in its environment) or not at all.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

from ..errors import InputError

APP_NAME = "enigma"
# Ray Serve's throughput-optimized mode with HAProxy as the ingress (read by every process of
# the cluster when it starts).
HAPROXY_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a saved model directory every replica's node reads, or its "
                   "storage URI (s3://, gs://: mirrored once on each node)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every interface")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="the model's id in the API (its directory name)")
    p.add_argument("--api-key", default=None, help="default: $ENIGMA_API_KEY; none: no key")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--gpus-per-replica", type=float, default=0, help="the model runs on the GPU")
    p.add_argument("--cpus-per-replica", type=float, default=1, help="also the model's threads")
    p.add_argument("--max-batch-size", type=int, default=16, help="rows decoding at once")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a row; past it a new one is a 429")  # fmt: skip
    p.add_argument("--max-body-mb", type=float, default=4.0, help="larger bodies are a 413")
    p.add_argument(
        "--scheduling",
        choices=("continuous", "static"),
        default="continuous",
        help="static: a batch runs to its end before the next (to compare)",
    )
    p.add_argument(
        "--stream-chunks-per-s",
        type=float,
        default=400,
        help="streamed chunks a second, shared by the open streams (0: one per token)",
    )
    p.add_argument(
        "--ingress",
        choices=("proxy", "haproxy"),
        default="proxy",
        help="haproxy: Ray Serve's throughput-optimized ingress (for a cluster started here)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=20.0,
        help="static scheduling: how long an idle engine waits to fill a batch",
    )


def check(args: argparse.Namespace) -> None:
    from ..inference.generate import check_saved_model
    from ..storage.mirror import local_model

    check_saved_model(local_model(args.model))  # a URI: each replica's node mirrors it too
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port} is not a port")
    if args.replicas < 1 or args.max_batch_size < 1 or args.max_queue < 1:
        raise InputError("--replicas, --max-batch-size and --max-queue must be at least 1")
    if min(args.batch_wait_ms, args.stream_chunks_per_s) < 0 or args.max_body_mb <= 0:
        raise InputError(
            "--batch-wait-ms and --stream-chunks-per-s must be >= 0, --max-body-mb > 0"
        )
    if args.cpus_per_replica < 1:
        raise InputError("--cpus-per-replica must be at least 1 (the model's threads)")
    cluster_has_it = all(os.environ.get(k) == v for k, v in HAPROXY_ENV.items())
    if args.ingress == "haproxy" and os.environ.get("RAY_ADDRESS") and not cluster_has_it:
        raise InputError(
            "--ingress haproxy sets up a cluster this command starts; the one at RAY_ADDRESS "
            "keeps its own ingress: start it with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 "
            "RAY_SERVE_ENABLE_HA_PROXY=1 in its environment (and here), or unset RAY_ADDRESS"
        )


def haproxy_environment() -> dict[str, str]:
    """What a cluster needs for the HAProxy ingress, with free ports for HAProxy's statistics
    and metrics where they are not set (their fixed defaults would collide with a second
    server on the machine)."""
    env = dict(HAPROXY_ENV)
    # A replica behind it waits this long for outside balancers to see it go; the only
    # balancer here is the cluster's own HAProxy, and 30 s would hold up Ctrl-C.
    drain = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
    env[drain] = os.environ.get(drain, "2")
    for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        if not os.environ.get(name):
            with socket.socket() as s:  # HAProxy binds these on every interface
                s.bind(("", 0))
                env[name] = str(s.getsockname()[1])
    return env


def start(args: argparse.Namespace) -> bool:
    """Deploy the application; True when this call started the Ray cluster."""
    import ray
    from ray import serve

    from ..cluster.ray_setup import init_ray
    from .app import build_app

    started = not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()
    init_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app({
        "model": args.model, "name": args.name, "replicas": args.replicas,
        "gpus_per_replica": args.gpus_per_replica, "cpus_per_replica": args.cpus_per_replica,
        "max_batch_size": args.max_batch_size, "max_queue": args.max_queue,
        "max_body_bytes": int(args.max_body_mb * (1 << 20)), "scheduling": args.scheduling,
        "batch_wait_ms": args.batch_wait_ms, "stream_chunks_per_s": args.stream_chunks_per_s,
        "api_key": args.api_key,
    })  # fmt: skip
    serve.run(app, name=APP_NAME, route_prefix="/")
    return started


def run(args: argparse.Namespace) -> int:
    check(args)
    if not os.environ.get("RAY_ADDRESS"):
        # before Ray Serve is imported here and before the cluster starts: every process reads
        # it (and a shell that exports it does not put HAProxy behind `--ingress proxy`)
        if args.ingress == "haproxy":
            os.environ.update(haproxy_environment())
        else:
            for name in HAPROXY_ENV:
                os.environ.pop(name, None)
    import ray
    from ray import serve

    args.api_key = args.api_key or os.environ.get("ENIGMA_API_KEY") or None
    key = "an API key (Authorization: Bearer KEY)" if args.api_key else "no API key"
    started = start(args)
    base = f"http://{args.host}:{args.port}/v1"
    from .app import model_name

    name = args.name or model_name(args.model)
    print(f"serving {name} at {base} (OpenAI API: /models, /completions, /chat/completions), "
          f"{key}, {args.scheduling} batching of up to {args.max_batch_size} rows, "
          f"{'HAProxy' if args.ingress == 'haproxy' else 'the Serve proxy'} in front; "
          "Ctrl-C stops", flush=True)  # fmt: skip
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        print("stopping", flush=True)
    finally:
        serve.delete(APP_NAME)
        if started:
            serve.shutdown()
            ray.shutdown()
    return 0

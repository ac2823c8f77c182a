"""``enigma serve MODEL``: the OpenAI-compatible application (:mod:`enigma.serve.app`) on Ray
Serve, on a local cluster started here or on the one in ``RAY_ADDRESS``.

It listens on 127.0.0.1 unless ``--host`` says otherwise; ``--api-key`` (or ``ENIGMA_API_KEY``)
makes every request without ``Authorization: Bearer KEY`` a 401. A model directory that does not
load stops the command in one line before Ray starts. Ctrl-C (or SIGTERM) deletes the
application, and shuts down the cluster when this command started it.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..errors import InputError

APP_NAME = "enigma"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a saved model directory (every replica's node must read it)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every interface")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="the model's id in the API (its directory name)")
    p.add_argument("--api-key", default=None, help="default: $ENIGMA_API_KEY; none: no key")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--gpus-per-replica", type=float, default=0)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=20.0)


def check(args: argparse.Namespace) -> None:
    from ..inference.generate import check_saved_model

    check_saved_model(args.model)
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port} is not a port")
    if args.replicas < 1 or args.max_batch_size < 1 or args.batch_wait_ms < 0:
        raise InputError("--replicas and --max-batch-size must be at least 1, --batch-wait-ms >= 0")


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
        "gpus_per_replica": args.gpus_per_replica, "max_batch_size": args.max_batch_size,
        "batch_wait_ms": args.batch_wait_ms, "api_key": args.api_key,
    })  # fmt: skip
    serve.run(app, name=APP_NAME, route_prefix="/")
    return started


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    check(args)
    args.api_key = args.api_key or os.environ.get("ENIGMA_API_KEY") or None
    key = "an API key (Authorization: Bearer KEY)" if args.api_key else "no API key"
    started = start(args)
    base = f"http://{args.host}:{args.port}/v1"
    name = args.name or Path(args.model).resolve().name
    print(f"serving {name} at {base} (OpenAI API: /models, /completions, /chat/completions), "
          f"{key}; Ctrl-C stops", flush=True)  # fmt: skip
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

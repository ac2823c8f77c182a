"""``enigma eval MODEL [MODEL ...]``: lm-evaluation-harness tasks, or perplexity at lengths
beyond training, for one saved model or several (``--ray``: one Ray task each, on whatever
cluster ``RAY_ADDRESS`` names or a local one). A model named by a storage URI is mirrored once on
each node that reads it (:mod:`enigma.storage.mirror`).

    enigma eval runs/demo/model --tasks my_task --include-path tasks/
    enigma eval runs/a/model runs/b/model --perplexity text.jsonl --lengths 1,2,4,8 --ray
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+",
                   help="saved model directories or their storage URIs")  # fmt: skip
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated")
    what.add_argument("--perplexity", metavar="SOURCE",
                      help="a .txt, .jsonl or .parquet file, or a prepared data directory "
                      "(its test split), or either at a storage URI")  # fmt: skip
    p.add_argument("--include-path", default=None, help="a directory of local task YAML files")
    p.add_argument("--limit", type=float, default=None, help="rows per task (a count or share)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-chat-template", action="store_true",
                   help="score a fine-tuned model without its chat template")  # fmt: skip
    p.add_argument("--lengths", default="1,2,4,8",
                   help="perplexity windows, in multiples of the training length")  # fmt: skip
    p.add_argument("--length", type=int, default=None,
                   help="the training length (default: the one the model recorded)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=None, help="score only the text's start")
    p.add_argument("--ray", action="store_true", help="one Ray task per model")
    p.add_argument("--cpus-per-model", type=float, default=1)
    p.add_argument("--json", dest="json_out", default=None)


def training_length(model_dir: str, given: int | None) -> int:
    if given:
        return given
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("train_seq_len"):
        return int(config["train_seq_len"])
    raise InputError(f"{model_dir} does not record its training length (exported before "
                     "enigma recorded it): give --length, e.g. --length 128")  # fmt: skip


def perplexity_at_lengths(model_dir: str, source: str, multiples: list[int], length: int,
                          max_tokens: int | None, threads: int = 0) -> dict:  # fmt: skip
    """Perplexity of ``source`` under ``model_dir`` at each multiple of ``length``."""
    import torch

    from ..data.tokenizer import load_tokenizer
    from ..inference.generate import load_model
    from .perplexity import perplexity, token_stream

    if threads:
        torch.set_num_threads(threads)
    model = load_model(model_dir)
    stream = token_stream(source, load_tokenizer(model_dir, quiet=True))
    rows = []
    for m in multiples:
        window = m * length
        if window > model.config.max_len and not model.config.use_alibi:
            raise InputError(f"a window of {window} tokens exceeds {model_dir}'s learned "
                             f"positions ({model.config.max_len}); lower --lengths")  # fmt: skip
        rows.append({"multiple": m, **perplexity(model, stream, window, max_tokens=max_tokens)})
    return {"model": str(model_dir), "source": str(source), "train_length": length,
            "stream_tokens": len(stream), "lengths": rows}  # fmt: skip


def evaluate_one(args: argparse.Namespace, model: str, threads: int = 0) -> dict:
    """One model's results, named as given; a URI is mirrored on the node this runs on."""
    from ..storage.mirror import local_model

    model_dir = local_model(model)
    if args.perplexity:
        multiples = [int(m) for m in args.lengths.split(",")]
        length = training_length(model_dir, args.length)
        result = perplexity_at_lengths(model_dir, args.perplexity, multiples, length,
                                       args.max_tokens, threads)  # fmt: skip
    else:
        from .harness import evaluate_tasks

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        chat = False if args.no_chat_template else None
        result = evaluate_tasks(model_dir, tasks, args.include_path, args.limit,
                                args.num_fewshot, args.batch_size, chat)  # fmt: skip
    return {**result, "model": model}


def check(args: argparse.Namespace) -> None:
    from ..inference.generate import check_saved_model
    from ..storage.mirror import local_model

    local = [local_model(model, "eval") for model in args.models]
    for model in local:
        check_saved_model(model)
    if args.perplexity and "://" not in args.perplexity and not Path(args.perplexity).exists():
        raise InputError(f"--perplexity {args.perplexity} does not exist")
    if args.perplexity:
        if not all(m.strip().isdigit() and int(m) > 0 for m in args.lengths.split(",")):
            raise InputError(f"--lengths {args.lengths}: positive whole multiples, e.g. 1,2,4,8")
        for model in local:
            training_length(model, args.length)
    else:
        from .harness import check_tasks, offline

        offline()
        check_tasks([t.strip() for t in args.tasks.split(",") if t.strip()], args.include_path)


def run(args: argparse.Namespace) -> list[dict]:
    check(args)
    if args.ray and len(args.models) > 1:
        import ray

        from ..cluster.ray_setup import init_ray

        init_ray()
        threads = max(1, int(args.cpus_per_model))
        task = ray.remote(num_cpus=args.cpus_per_model)(evaluate_one)
        results = ray.get([task.remote(args, m, threads) for m in args.models])
    else:
        results = [evaluate_one(args, m) for m in args.models]
    for result in results:
        show(result)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return results


def show(result: dict) -> None:
    print(f"{result['model']}:")
    if "lengths" in result:
        for row in result["lengths"]:
            print(f"  {row['window']:>6} tokens ({row['multiple']}x training): perplexity "
                  f"{row['perplexity']:.2f} (nll {row['nll']:.4f}, {row['tokens']:,} tokens)",
                  flush=True)  # fmt: skip
        return
    for task, metrics in result["results"].items():
        shown = [f"{k.removesuffix(',none')} {v:.4g}" + (
                 f" ± {metrics[k.replace(',', '_stderr,')]:.2g}"
                 if isinstance(metrics.get(k.replace(",", "_stderr,")), float) else "")
                 for k, v in metrics.items() if "," in k and "_stderr" not in k]  # fmt: skip
        print(f"  {task}: {', '.join(shown)}")
    sys.stdout.flush()

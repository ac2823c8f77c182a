"""``enigma bench data-scale``: ``enigma data prepare`` on a large generated corpus.

Writes ``--mb`` megabytes of Chinese text (三国演义 sentences shuffled into ~2,000-character
documents, one per line), runs ``enigma data prepare`` on it in a child process, and samples that
process and all of its descendants (driver, raylet, Ray workers) every second (CPU times every
0.25 s):

- memory: the sum of RSS, where shared pages (libraries, the object store) count once per
  process that maps them, so it errs high, and the sum of PSS, which splits each shared page among
  its mappers and so is the tree's real footprint;
- CPU time: the driver's own, and the Ray task workers' (the ``ray::`` processes), each process's
  last reading kept: the driver's share is what would stop N nodes preparing N times as fast.

In the same run, before and after the prepare (a shared machine's speed drifts), the tokenizer's
own limit: the fast tokenizer's ``encode_batch`` on one thread over the corpus's first
``--probe-mb`` MB, times the CPUs; ``encode_batch_fast`` (what the tasks call) beside it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mb", type=float, default=200.0, help="corpus size in MB")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--workdir", default=None, help="default: a temporary directory")
    p.add_argument("--probe-mb", type=float, default=20.0, help="text timed for the limit")
    p.add_argument("--json", dest="json_out", default=None)


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    from enigma.data.sources import sanguo_path

    docs = json.loads(sanguo_path().read_text(encoding="utf-8"))
    sentences = [s for d in docs for s in re.split(r"(?<=[。！？])", d.replace("\n", "")) if s]
    rng = random.Random(seed)
    target, written = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            doc = "".join(rng.choice(sentences) for _ in range(60))
            f.write(doc + "\n")
            written += len(doc.encode("utf-8")) + 1
    return written


class TreeSampler:
    """Peak memory of a process tree, and each process's last CPU time."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.peak_rss = self.peak_pss = 0
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, user + system seconds)

    def sample(self, memory: bool = True) -> None:
        """``memory``: also read every process's PSS (its smaps: the costly part, ~15 % of a
        core at four readings a second)."""
        import psutil

        rss = pss = 0
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                self.cpu[p.pid] = ("driver" if p.pid == self.root.pid else p.name(),
                                   t.user + t.system)  # fmt: skip
                m = p.memory_full_info() if memory else None
            except psutil.Error:
                continue
            if m is not None:
                rss, pss = rss + m.rss, pss + m.pss
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def seconds(self, role) -> float:
        return sum(t for r, t in self.cpu.values() if role(r))


def tokenizer_limit(corpus: Path, megabytes: float) -> dict:
    """MB/s of the fast tokenizer alone, one thread, on the corpus's first ``megabytes``: with
    ``encode_batch`` (offsets and all: the limit as defined) and ``encode_batch_fast`` (the same
    ids without offsets: what the prepare's tasks call)."""
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from enigma.data.prepare import TOKENIZE_CHUNK, worker_tokenizer
    from enigma.data.sources import normalize
    from enigma.data.tokenizer import load_tokenizer

    tok = worker_tokenizer(load_tokenizer(quiet=True).backend_tokenizer.to_str())
    texts, size = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            texts.append(normalize(line))
            size += len(texts[-1].encode("utf-8"))
            if size >= megabytes * 1e6:
                break
    rates = {}
    for name in ("encode_batch", "encode_batch_fast"):
        encode = getattr(tok, name, None)
        if encode is None:
            continue
        start = time.perf_counter()
        for i in range(0, len(texts), TOKENIZE_CHUNK):
            encode(texts[i : i + TOKENIZE_CHUNK], add_special_tokens=False)
        rates[name] = size / 1e6 / (time.perf_counter() - start)
    return rates


def prepare_sampled(corpus: Path, out: Path, seq_len: int) -> tuple[TreeSampler, float]:
    """``enigma data prepare`` of ``corpus`` in a child process, its tree sampled; seconds."""
    cmd = [sys.executable, "-m", "enigma.cli", "data", "prepare", f"--source=text:{corpus}"]
    cmd += ["--out", str(out), "--seq-len", str(seq_len), "--force"]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree, readings = TreeSampler(child.pid), 0
    while child.poll() is None:
        tree.sample(memory=readings % 4 == 0)  # CPU times 4 times a second, memory once
        readings += 1
        time.sleep(0.25)
    seconds = time.perf_counter() - start
    output = child.stdout.read()
    if child.returncode != 0:
        raise RuntimeError(f"prepare failed:\n{output[-2000:]}")
    return tree, seconds


def run(args: argparse.Namespace) -> dict:
    import os

    work = Path(args.workdir or tempfile.mkdtemp(prefix="enigma-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    size = write_corpus(corpus, args.mb)
    # Timed before and after the prepare, and averaged: a shared machine's speed drifts.
    before = tokenizer_limit(corpus, min(args.probe_mb, args.mb))
    cpus = os.cpu_count() or 1
    tree, seconds = prepare_sampled(corpus, work / "shards", args.seq_len)
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    after = tokenizer_limit(corpus, min(args.probe_mb, args.mb))
    per_core = (before["encode_batch"] + after["encode_batch"]) / 2
    fast = {k: round(v, 2) for k, v in after.items()}
    driver = tree.seconds(lambda role: role == "driver")
    tasks = tree.seconds(lambda role: role.startswith("ray::"))
    tokens = sum(s["tokens"] + s["separators"] for s in manifest["splits"].values())
    stored = sum(x["bytes"] for s in manifest["splits"].values() for x in s["shards"])
    limit = per_core * cpus
    result = {
        "benchmark": "data-scale",
        "corpus_mb": round(size / 1e6, 1),
        "seq_len": args.seq_len,
        "units": manifest["units"],
        "wall_seconds": round(seconds, 1),
        "mb_per_sec_wall": round(size / 1e6 / seconds, 2),
        "mb_per_sec_pipeline": round(size / 1e6 / manifest["seconds"], 2),
        "tokenizer_mb_per_sec_per_core": round(per_core, 2),
        "tokenizer_per_core_before": {k: round(v, 2) for k, v in before.items()},
        "tokenizer_per_core_after": fast,
        "tokenizer_limit_mb_per_sec": round(limit, 2),
        "cpus": cpus,
        "ratio_wall": round(size / 1e6 / seconds / limit, 3),
        "ratio_pipeline": round(size / 1e6 / manifest["seconds"] / limit, 3),
        "driver_cpu_seconds": round(driver, 1),
        "task_cpu_seconds": round(tasks, 1),
        "driver_share": round(driver / max(tasks, 1e-9), 4),
        "peak_rss_mb": round(tree.peak_rss / 2**20, 1),
        "peak_pss_mb": round(tree.peak_pss / 2**20, 1),
        "shard_bytes_per_token": round(stored / tokens, 3),
        "ids_dtype": manifest["ids_dtype"],
        "duplicates": manifest["duplicates"],
        "blocks": {k: v["blocks"] for k, v in manifest["splits"].items()},
    }
    print(
        f"prepared {result['corpus_mb']} MB in {seconds:.1f} s: {result['mb_per_sec_wall']} MB/s "
        f"wall, {result['mb_per_sec_pipeline']} MB/s after start-up, against the tokenizer's "
        f"limit {limit:.2f} MB/s (encode_batch, {per_core:.2f} a core x {cpus}; before / after "
        f"{before['encode_batch']:.2f} / {after['encode_batch']:.2f}; encode_batch_fast "
        f"{after.get('encode_batch_fast', 0):.2f}): {result['ratio_wall']:.2f} / "
        f"{result['ratio_pipeline']:.2f}; driver CPU {driver:.1f} s = "
        f"{100 * result['driver_share']:.2f}% of the tasks' {tasks:.0f} s; process tree peak: "
        f"RSS sum {result['peak_rss_mb']:,.0f} MB, PSS sum {result['peak_pss_mb']:,.0f} MB; "
        f"{result['shard_bytes_per_token']} shard bytes a token"
    )
    from . import meta

    meta.save(result, args.json_out, args.command_line)
    return result

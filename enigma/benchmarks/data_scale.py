"""``enigma bench data-scale``: ``enigma data prepare`` on a large generated corpus.

Writes ``--mb`` megabytes of Chinese text (三国演义 sentences shuffled into ~2,000-character
documents, one per line), runs ``enigma data prepare`` on it in a child process, and samples the
memory of that process and all of its descendants (driver, raylet, Ray workers) every 0.25 s: the
sum of RSS, where shared pages (libraries, the object store) count once per process that maps
them, so it errs high, and the sum of PSS, which splits each shared page among its mappers and so
is the tree's real footprint.
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


def tree_memory_bytes(proc) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) over ``proc`` and its descendants."""
    import psutil

    rss = pss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            m = p.memory_full_info()
        except psutil.Error:
            continue
        rss, pss = rss + m.rss, pss + m.pss
    return rss, pss


def run(args: argparse.Namespace) -> dict:
    import psutil

    work = Path(args.workdir or tempfile.mkdtemp(prefix="enigma-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    size = write_corpus(corpus, args.mb)
    cmd = [sys.executable, "-m", "enigma.cli", "data", "prepare", f"--source=text:{corpus}"]
    cmd += ["--out", str(work / "shards"), "--seq-len", str(args.seq_len), "--force"]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc, peak_rss, peak_pss = psutil.Process(child.pid), 0, 0
    while child.poll() is None:
        rss, pss = tree_memory_bytes(proc)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.25)
    seconds = time.perf_counter() - start
    output = child.stdout.read()
    if child.returncode != 0:
        raise RuntimeError(f"prepare failed:\n{output[-2000:]}")
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    result = {
        "benchmark": "data-scale",
        "corpus_mb": round(size / 1e6, 1),
        "seq_len": args.seq_len,
        "wall_seconds": round(seconds, 1),
        "mb_per_sec_wall": round(size / 1e6 / seconds, 2),
        "mb_per_sec_pipeline": round(size / 1e6 / manifest["seconds"], 2),
        "peak_rss_mb": round(peak_rss / 2**20, 1),
        "peak_pss_mb": round(peak_pss / 2**20, 1),
        "blocks": {k: v["blocks"] for k, v in manifest["splits"].items()},
    }
    print(
        f"prepared {result['corpus_mb']} MB in {seconds:.1f} s ({result['mb_per_sec_wall']} MB/s "
        f"wall, {result['mb_per_sec_pipeline']} MB/s after start-up); process tree peak: "
        f"RSS sum {result['peak_rss_mb']:,.0f} MB, PSS sum {result['peak_pss_mb']:,.0f} MB"
    )
    from . import meta

    meta.save(result, args.json_out, args.command_line)
    return result

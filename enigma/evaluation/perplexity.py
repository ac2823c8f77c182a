"""Sliding-window perplexity of any text, at lengths beyond the one a model trained on.

ALiBi's promise (Press et al., 2022) is that a model trained on ``L`` tokens reads longer
contexts without learned positions to run out of: the perplexity at ``2L``, ``4L``, ``8L`` says
whether it holds. The text is tokenized as the training corpus was (the same normalisation,
[SEP] after every document, and one before the first: the start of a text) into one stream;
windows of ``W`` tokens advance by ``W / 2``, and each scores only the tokens no window before
it scored, so every scored token but the first window's sees at least ``W / 2`` tokens of
context and each is scored once (the strided evaluation of transformers' perplexity guide).

The text comes from a file (``.txt``: one document per non-empty line; ``.jsonl``: each record's
``text``; ``.parquet``: the ``text`` column) or from a prepared directory (``enigma data
prepare``'s), whose test split is read as the token stream it was packed from; either may be
named by a storage URI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError


def read_documents(path: str) -> list[str]:
    """The documents of a ``.txt``, ``.jsonl`` or ``.parquet`` file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path} does not exist (a .txt, .jsonl or .parquet file, or a "
                         "prepared data directory)")  # fmt: skip
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        if "text" not in table.column_names:
            raise InputError(f"{path} has no 'text' column (it has {table.column_names})")
        return [t for t in table.column("text").to_pylist() if t and t.strip()]
    if p.suffix == ".jsonl":
        docs = []
        with open(p, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line).get("text")
                except (json.JSONDecodeError, AttributeError):
                    raise InputError(f"{path}:{number}: not a JSON object with 'text'") from None
                if isinstance(text, str) and text.strip():
                    docs.append(text)
        return docs
    return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def token_stream(source: str, tokenizer) -> np.ndarray:
    """The text of ``source`` as one stream of token ids, [SEP] before the first document and
    after each."""
    from ..data.sources import normalize

    sep = tokenizer.sep_token_id
    if "://" in source:  # a prepared directory in a bucket is read there; a file, mirrored
        from ..data.shards import has_manifest
        from ..storage.mirror import local_file

        if not has_manifest(source):
            source = local_file(source, "--perplexity")
    if "://" in source or Path(source).is_dir():
        from ..data.shards import read_blocks

        blocks = read_blocks(source, "test")
        return np.concatenate([[sep], blocks.reshape(-1)]).astype(np.int64)
    docs = [normalize(d) for d in read_documents(source)]
    stream = [sep]
    for ids in tokenizer(docs, add_special_tokens=False).input_ids:
        stream += ids + [sep]
    if len(stream) < 3:
        raise InputError(f"{source} holds no text")
    return np.asarray(stream, dtype=np.int64)


def windows(length: int, window: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first scored)`` of each window over a stream of ``length`` tokens: a stride
    of half the window, every token after the first scored once."""
    stride, done, found = max(1, window // 2), 1, []
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        if end > done:
            found.append((begin, end, done))
            done = end
        if end == length:
            break
    return found


@torch.no_grad()
def perplexity(model, stream: np.ndarray, window: int, batch: int = 4,
               max_tokens: int | None = None) -> dict:  # fmt: skip
    """The mean negative log-likelihood (nats a token) and perplexity of ``stream`` read in
    windows of ``window`` tokens; ``max_tokens`` scores only the stream's start."""
    if max_tokens:
        stream = stream[: max_tokens + 1]
    spans = windows(len(stream), window)
    by_width: dict[int, list] = {}
    for span in spans:  # every window is ``window`` wide but perhaps the last
        by_width.setdefault(span[1] - span[0], []).append(span)
    total, count = 0.0, 0
    for width, group in by_width.items():
        for i in range(0, len(group), batch):
            part = group[i : i + batch]
            ids = torch.from_numpy(np.stack([stream[b:e] for b, e, _ in part]))
            logits = model(ids).logits.float()
            for row, (begin, _, first) in enumerate(part):
                predicted = logits[row, first - begin - 1 : width - 1]  # of the new tokens
                targets = ids[row, first - begin :]
                nll = torch.nn.functional.cross_entropy(predicted, targets, reduction="sum")
                total, count = total + float(nll), count + len(targets)
    return {"window": window, "tokens": count, "nll": total / count,
            "perplexity": math.exp(total / count)}  # fmt: skip

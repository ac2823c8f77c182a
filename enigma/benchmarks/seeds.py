"""Figures over seeds: mean ± standard deviation, and the difference to the plain Transformer
taken seed by seed (the same seed gives both models the same batches)."""

from __future__ import annotations

import statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(per_seed: list[dict], keys: tuple[str, ...], plain: list[dict] | None) -> dict:
    """``{key: mean, key_std: std}`` for each of ``keys`` over the runs ``per_seed``, plus
    ``{first key}_vs_transformer`` (and ``_std``) when ``plain`` holds the plain Transformer's
    runs of the same seeds, and the mean training seconds."""
    out: dict = {}
    for key in keys:
        out[key], out[f"{key}_std"] = mean_std([r[key] for r in per_seed])
    if plain is not None:
        first = keys[0]
        deltas = [r[first] - p[first] for r, p in zip(per_seed, plain, strict=True)]
        out[f"{first}_vs_transformer"], out[f"{first}_vs_transformer_std"] = mean_std(deltas)
    out["train_seconds"] = round(statistics.fmean(r["train_seconds"] for r in per_seed), 1)
    return out

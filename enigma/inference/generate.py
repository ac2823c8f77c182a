"""``enigma generate``: a saved model continues a prompt, streamed to the terminal."""

from __future__ import annotations

import argparse
import os

import torch
from transformers import TextStreamer

from ..data.tokenizer import join_cjk
from ..errors import InputError


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a directory written by save_pretrained")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)


def load_model(path: str):
    """``EnigmaLM.from_pretrained(path)`` in eval mode; a missing or damaged directory is one
    line naming the file, not a loader traceback."""
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    from ..models.lm import EnigmaLM

    hf_logging.disable_progress_bar()  # a bar for loading a few tensors is noise

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"{path} is not a saved model directory (no config.json in it)")
    try:
        return EnigmaLM.from_pretrained(path).eval()
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path} holds a damaged model ({first}); export it again") from None


def generate(args: argparse.Namespace) -> str:
    from ..data.tokenizer import load_tokenizer

    model = load_model(args.model)
    saved = os.path.isfile(os.path.join(args.model, "tokenizer_config.json"))
    tokenizer = load_tokenizer(args.model if saved else None)
    text, _ = continue_text(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        streamer=ChineseStreamer(tokenizer),
    )
    return text


class ChineseStreamer(TextStreamer):
    """Streams decoded text to the terminal without WordPiece's spaces between characters."""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(join_cjk(text), flush=True, end="" if not stream_end else None)


def continue_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.95,
    seed: int = 0,
    streamer=None,
) -> tuple[str, torch.Tensor]:
    """Sample a continuation of ``prompt`` (greedy when ``temperature`` is 0); returns the decoded
    text and the ids."""
    torch.manual_seed(seed)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise InputError("the prompt is empty after tokenisation")
    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=top_k,
        top_p=top_p,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id,
    )
    return join_cjk(tokenizer.decode(out[0], skip_special_tokens=True)), out

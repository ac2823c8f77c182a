"""``enigma generate``: a saved model continues a prompt, streamed to the terminal."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import InputError


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a directory written by save_pretrained, or its storage URI")  # fmt: skip
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)


def check_saved_model(path: str) -> None:
    """A saved model directory as ``from_pretrained`` needs it: ``config.json`` an EnigmaLM's,
    every weights file whole (its header parses and its tensors fit in it). What is wrong is
    bad input, one line naming the file; a loader error after this check is a bug."""
    import json

    from ..models.lm_config import EnigmaConfig

    config = Path(path) / "config.json"
    if not config.is_file():
        raise InputError(f"{path} is not a saved model directory (no config.json in it)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise InputError(f"{config} is damaged ({err}); export the model again") from None
    if model_type != EnigmaConfig.model_type:
        raise InputError(f"{path} holds a {model_type!r} model, not EnigmaLM")
    weights = sorted(Path(path).glob("*.safetensors"))
    if not weights:
        raise InputError(f"{path} has no weights (*.safetensors); export the model again")
    for f in weights:
        problem = _safetensors_problem(f)
        if problem:
            raise InputError(f"{path} holds a damaged model ({f.name}: {problem}); export it again")


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file (its 8-byte header length, JSON header, and the
    tensors' byte ranges against the file's size), or None."""
    import json

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "shorter than its header"
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            return f"a {length:,}-byte header in a {size:,}-byte file"
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return f"its header is not JSON ({err})"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if 8 + length + max(ends, default=0) > size:
        return f"truncated: its tensors need {8 + length + max(ends):,} bytes, it has {size:,}"
    return None


def load_model(path: str):
    """``EnigmaLM.from_pretrained(path)`` in eval mode, after :func:`check_saved_model` (and,
    when an export was killed between its renames, its copy set aside put back)."""
    from transformers.utils import logging as hf_logging

    from ..models.lm import EnigmaLM
    from ..storage.atomic import readable

    hf_logging.disable_progress_bar()  # a bar for loading a few tensors is noise
    readable(Path(path))
    check_saved_model(path)
    return EnigmaLM.from_pretrained(path).eval()


def generate(args: argparse.Namespace) -> str:
    from ..data.tokenizer import load_tokenizer
    from ..storage.mirror import local_model

    args.model = local_model(args.model)
    model = load_model(args.model)
    saved = os.path.isfile(os.path.join(args.model, "tokenizer_config.json"))
    tokenizer = load_tokenizer(args.model if saved else None)
    print(args.prompt, end="", flush=True)
    text = continue_text(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        show=lambda piece: print(piece, end="", flush=True),
    )
    print(flush=True)
    return text


def sampling_from_flags(model, max_new_tokens: int, prompt_tokens: int, **settings):
    """The engine's :class:`~enigma.serve.sampling.Sampling` from command-line values; a bad
    one is one line naming its flag."""
    from ..serve.sampling import Sampling

    sampling = Sampling(max_tokens=max_new_tokens, **settings)
    problem = sampling.problem(model.config.vocab_size)
    if problem:
        flag = "--" + problem[0].replace("_", "-").replace("max-tokens", "max-new-tokens")
        raise InputError(f"{flag}: {problem[1]}")
    if max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    room = model.config.max_len - prompt_tokens
    if max_new_tokens > room:
        raise InputError(f"the prompt's {prompt_tokens} tokens and --max-new-tokens "
                         f"{max_new_tokens} exceed the model's max_len {model.config.max_len}: "
                         f"ask for at most {max(room, 0)}")  # fmt: skip
    return sampling


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
    show=None,
) -> str:
    """``prompt`` and a sampled continuation of it (greedy when ``temperature`` is 0), through
    the serving engine (:mod:`enigma.serve.engine`); ``show(piece)`` sees the text as it
    comes."""
    from ..serve.engine import Engine

    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if not ids:
        raise InputError("the prompt is empty after tokenisation")
    sampling = sampling_from_flags(model, max_new_tokens, len(ids), temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=seed)  # fmt: skip
    engine = Engine(model, tokenizer, max_rows=1)
    pieces = []
    for out in engine.generate(ids, sampling):
        pieces.append(out.text)
        if show is not None:
            show(out.text)
    return prompt + "".join(pieces)

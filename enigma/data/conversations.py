"""Instruction and chat data for fine-tuning, and the chat template that turns it into token ids.

Rows come in the original project's format (``instruction``, optional ``input``, ``output``) or
as chat ``messages`` (``role`` of system, user or assistant, and ``content``), mixed in one JSONL
or parquet file if need be. Each becomes a list of messages.

The chat template lives in the tokenizer, as transformers expects (``chat_template``), and is
built from what the BERT-Chinese vocabulary has: a role's name in Chinese and a full-width colon
before each turn (``系统：``, ``用户：``, ``助手：``) and ``[SEP]``, the model's end-of-sequence
token, after it. ``apply_chat_template(messages, add_generation_prompt=True)`` therefore gives
the ids a conversation had in training up to ``助手：``, and generation stops at ``[SEP]``. The
assistant's turns (their text and their ``[SEP]``) are the template's ``{% generation %}``
blocks: the tokens the loss is taken on.

The project itself encodes conversations with :func:`encode_chat`, turn by turn, rather than
through the template: the template renders a conversation to one string and the tokenizer then
reads any ``[SEP]`` in it as the control token, so a user who writes ``[SEP]助手：`` would end
their own turn and speak for the assistant. :func:`encode_chat` encodes each turn's content as
text (special-token names become ordinary characters) and puts the control tokens in itself;
for content without such names its ids are the template's, token for token.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError

ROLES = ("system", "user", "assistant")
ROLE_NAMES = {"system": "系统", "user": "用户", "assistant": "助手"}
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}系统：{{ message['content'] }}[SEP]"
    "{%- elif message['role'] == 'user' -%}用户：{{ message['content'] }}[SEP]"
    "{%- elif message['role'] == 'assistant' -%}助手："
    "{% generation %}{{ message['content'] }}[SEP]{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}助手：{%- endif -%}"
)
IGNORE = -100  # labels the loss skips


def with_chat_template(tokenizer):
    """``tokenizer`` carrying the chat template (saved with it by ``save_pretrained``)."""
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def to_messages(row, where: str) -> list[dict]:
    """One row as chat messages; a row that is neither format is one line naming ``where``
    (``FILE:LINE``) and what is missing."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: a row must be a JSON object, not {type(row).__name__}")
    if "messages" in row:
        return _checked_messages(row["messages"], where)
    missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
    if missing:
        raise InputError(
            f"{where}: a row needs 'messages', or 'instruction' and 'output' as text; "
            f"{' and '.join(repr(k) for k in missing)} missing (it has {sorted(row) or 'no keys'})"
        )
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise InputError(f"{where}: 'input' must be text")
    prompt = row["instruction"] + (f"\n{extra}" if extra else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def _checked_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: 'messages' must be a non-empty list of turns")
    for i, turn in enumerate(messages):
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in ROLES or not isinstance(turn.get("content"), str):
            raise InputError(
                f"{where}: turn {i} needs a 'role' of {', '.join(ROLES)} and a 'content' text"
            )
    if not any(t["role"] == "assistant" for t in messages):
        raise InputError(f"{where}: no assistant turn to learn from")
    return [{"role": t["role"], "content": t["content"]} for t in messages]


def read_conversations(path: str) -> list[list[dict]]:
    """Every row of a ``.jsonl`` or ``.parquet`` file as messages."""
    return [messages for _, messages in read_located(path)]


def read_located(path: str) -> list[tuple[str, list[dict]]]:
    """Every row of a ``.jsonl`` or ``.parquet`` file as messages, with where it is
    (``FILE:LINE``, or ``FILE: row N``)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path} does not exist (a .jsonl or .parquet file of rows)")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(p).to_pylist()
        located = [(f"{path}: row {i + 1}", row) for i, row in enumerate(rows)]
        return [(where, to_messages(row, where)) for where, row in located]
    if p.suffix not in (".jsonl", ".json"):
        raise InputError(f"{path}: expected a .jsonl or .parquet file")
    conversations = []
    with open(p, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}: not JSON ({err.msg})") from None
            conversations.append((f"{path}:{number}", to_messages(row, f"{path}:{number}")))
    if not conversations:
        raise InputError(f"{path} has no rows")
    return conversations


class EmptyTurn(ValueError):
    """An assistant turn whose text gives no token: it would teach an empty reply."""

    def __init__(self, turn: int, content: str):
        super().__init__(f"turn {turn}: the assistant's text {content[:40]!r} gives no token "
                         "this tokenizer knows, so the model would learn an empty reply; fix "
                         "or remove the row")  # fmt: skip


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False
                ) -> tuple[list[int], list[bool]]:  # fmt: skip
    """A conversation's token ids as the chat template lays them out, and which of them are the
    assistant's (its turns' text and their ``[SEP]``: what the loss is taken on). Content is
    encoded as text: ``[SEP]`` written by a user is the characters, not the control token."""
    ids: list[int] = []
    learn: list[bool] = []

    def text(value: str) -> list[int]:
        return tokenizer(value, add_special_tokens=False, split_special_tokens=True).input_ids

    for i, message in enumerate(messages):
        head = text(f"{ROLE_NAMES[message['role']]}：")
        content = text(message["content"])
        if message["role"] == "assistant" and message["content"].strip() and not content:
            raise EmptyTurn(i, message["content"])
        body = content + [tokenizer.sep_token_id]
        ids += head + body
        learn += [False] * len(head) + [message["role"] == "assistant"] * len(body)
    if add_generation_prompt:
        head = text(f"{ROLE_NAMES['assistant']}：")
        ids += head
        learn += [False] * len(head)
    return ids, learn


def encode(tokenizer, conversations: list[list[dict]], seq_len: int,
           where: list[str] | None = None) -> tuple[dict, int]:  # fmt: skip
    """Token ids, labels (every token of the assistant's turns, their [SEP] included; the rest
    ``IGNORE``) and attention masks, right-padded to ``seq_len``, one row per conversation;
    conversations longer than that are left out. Returns the arrays and how many were left
    out. A row whose assistant text gives no token is refused, named by ``where`` (its
    ``FILE:LINE``) or its place."""
    ids, labels, masks, dropped = [], [], [], 0
    for n, messages in enumerate(conversations):
        try:
            row, learn = encode_chat(tokenizer, messages)
        except EmptyTurn as err:
            raise InputError(f"{where[n] if where else f'conversation {n + 1}'}: {err}") from None
        if len(row) > seq_len:
            dropped += 1
            continue
        pad = seq_len - len(row)
        ids.append(row + [tokenizer.pad_token_id] * pad)
        learn = np.array(learn, dtype=bool)
        labels.append(np.where(learn, row, IGNORE).tolist() + [IGNORE] * pad)
        masks.append([1] * len(row) + [0] * pad)
    arrays = {
        "input_ids": np.array(ids, dtype=np.int32).reshape(-1, seq_len),
        "labels": np.array(labels, dtype=np.int32).reshape(-1, seq_len),
        "attention_mask": np.array(masks, dtype=np.int8).reshape(-1, seq_len),
    }
    return arrays, dropped


def split_held_out(conversations: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded ``fraction`` of the conversations held out (at least one when there are two)."""
    order = np.random.default_rng(seed).permutation(len(conversations))
    held = min(max(1, round(fraction * len(conversations))), len(conversations) - 1)
    chosen = set(order[:held].tolist())
    train = [c for i, c in enumerate(conversations) if i not in chosen]
    return train, [c for i, c in enumerate(conversations) if i in chosen]


def prepare_conversations(
    data: str, out: Path, tokenizer, seq_len: int, val_fraction: float, val_data: str, seed: int
) -> dict:
    """Tokenize ``data`` (and ``val_data``, or a held-out fraction) into a prepared directory
    like ``enigma data prepare``'s (``train``/``val`` shards with ``input_ids``, ``labels`` and
    ``attention_mask``, the tokenizer with its chat template, the manifest last), unless ``out``
    already holds exactly this; returns its manifest."""
    from ..storage.atomic import file_sha256
    from .shards import MANIFEST, publish, read_manifest, staging_directory
    from .shards import write_columns as write
    from .tokenizer import vocab_hash

    tokenizer = with_chat_template(tokenizer)
    files = {"train": data, **({"val": val_data} if val_data else {})}
    wanted = {
        "kind": "conversations",
        "source": {name: str(Path(f).resolve()) for name, f in files.items()},
        "source_sha256": {name: file_sha256(Path(f)) for name, f in files.items()},
        "seq_len": seq_len, "val_fraction": 0.0 if val_data else val_fraction, "seed": seed,
        "chat_template": CHAT_TEMPLATE,
        "tokenizer": {"name": getattr(tokenizer, "enigma_source", tokenizer.name_or_path),
                      "vocab_hash": vocab_hash(tokenizer), "vocab_size": len(tokenizer)},
    }  # fmt: skip
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if all(manifest.get(k) == v for k, v in wanted.items()):
            return manifest
    train = read_located(data)
    if val_data:
        val = read_located(val_data)
    else:
        train, val = split_held_out(train, val_fraction, seed)
    staging = staging_directory(out)
    splits = {}
    for name, rows in (("train", train), ("val", val)):
        arrays, dropped = encode(tokenizer, [m for _, m in rows], seq_len, [w for w, _ in rows])
        if not len(arrays["input_ids"]):
            raise InputError(f"no {name} conversation fits seq_len={seq_len}; raise seq_len")
        shard = write(staging / f"{name}-00000.parquet", arrays)
        tokens = int(arrays["attention_mask"].sum())
        learned = int((arrays["labels"] != IGNORE).sum())
        splits[name] = {"documents": len(rows), "blocks": shard["blocks"], "tokens": tokens,
                        "assistant_tokens": learned, "too_long": dropped,
                        "shards": [shard]}  # fmt: skip
    tokenizer.save_pretrained(staging / "tokenizer")
    publish(staging, out, {**wanted, "format": 1, "splits": splits})
    return read_manifest(out)

"""``enigma chat MODEL``: a conversation in the terminal, each reply streamed token by token.

A fine-tuned model carries the chat template in its tokenizer: the conversation is kept as
messages and encoded as the template lays them out (:func:`~enigma.data.conversations.encode_chat`:
what a user types is text, ``[SEP]`` in it included), and when it outgrows the model's
``max_len`` (with room for the reply) its oldest turns are dropped, the system message kept. A
pretrained model has no template: each line then continues the transcript as plain text, and the
chat says so. ``/reset`` starts over; ``/exit``, Ctrl-D or Ctrl-C ends. Replies come from the
serving engine (:mod:`enigma.serve.engine`), as ``enigma serve``'s do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError

HELP = "/reset starts over, /exit (or Ctrl-D) ends"


class TurnTooLong(Exception):
    """The last message cannot fit with the system message and room for a reply."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a saved model directory (enigma finetune's OUT/model)")
    p.add_argument("--system", default=None, help="a system message that opens the chat")
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)


class Conversation:
    """The turns so far and how each reply is made from them."""

    def __init__(self, model, tokenizer, args: argparse.Namespace):
        from ..serve.engine import Engine
        from .generate import sampling_from_flags

        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.max_len = model.config.max_len
        self.engine = Engine(model, tokenizer, max_rows=1)
        self.sampling = sampling_from_flags(
            model, args.max_new_tokens, 1, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        )  # fmt: skip
        self.reset()

    def reset(self) -> None:
        system = [{"role": "system", "content": self.args.system}] if self.args.system else []
        self.messages = system if self.templated else []
        self.transcript = self.args.system or ""

    def prompt_ids(self) -> list[int]:
        from ..data.conversations import encode_chat

        if self.templated:
            return encode_chat(self.tokenizer, self.messages, add_generation_prompt=True)[0]
        return self.tokenizer(self.transcript, add_special_tokens=False).input_ids

    def fit(self) -> list[int]:
        """The prompt's ids, the oldest turns dropped until it and the reply fit ``max_len``.
        A conversation that cannot fit even as the system message and the last turn raises
        :class:`TurnTooLong`: cutting that turn would answer something the user did not write,
        and dropping the system message would answer as someone else. A plain-text transcript
        (no template) keeps its latest text."""
        room = self.max_len - self.args.max_new_tokens
        ids = self.prompt_ids()
        while len(ids) > room:
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if not self.templated:
                return ids[-room:]
            if len(self.messages) - first <= 1:
                raise TurnTooLong(
                    f"(that message is too long: with the conversation's start it takes "
                    f"{len(ids)} tokens, and a reply of up to {self.args.max_new_tokens} must fit "
                    f"in the model's {self.max_len}; shorten it, or lower --max-new-tokens)"
                )
            del self.messages[first : first + 2]  # the oldest user turn and its reply
            print(f"(the oldest turn was dropped: the conversation outgrew {self.max_len} tokens)")
            ids = self.prompt_ids()
        return ids

    def reply(self, line: str) -> str:
        before = (list(self.messages), self.transcript)
        if self.templated:
            self.messages.append({"role": "user", "content": line})
        else:
            self.transcript += line
        try:
            text = self.generate(self.fit())
        except (KeyboardInterrupt, TurnTooLong):  # no half turn is left behind
            self.messages, self.transcript = before
            raise
        if self.templated:
            self.messages.append({"role": "assistant", "content": text})
        else:
            self.transcript += text
        return text

    def generate(self, ids: list[int]) -> str:
        """The reply to ``ids``, printed as it comes."""
        pieces = []
        for out in self.engine.generate(ids, self.sampling, continues_prompt=not self.templated):
            pieces.append(out.text)
            print(out.text, end="", flush=True)
        print(flush=True)
        return "".join(pieces)


def run(args: argparse.Namespace) -> None:
    from ..data.tokenizer import load_tokenizer
    from ..storage.mirror import local_model
    from .generate import load_model

    if args.max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    args.model = local_model(args.model)
    model = load_model(args.model)
    saved = (Path(args.model) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(args.model if saved else None, quiet=True)
    chat = Conversation(model, tokenizer, args)
    if not chat.templated:
        print(f"note: {args.model} has no chat template (a pretrained model): each line "
              "continues the conversation as plain text")  # fmt: skip
    print(f"enigma chat with {args.model}: {HELP}", flush=True)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line == "/exit":
            return
        if line == "/reset":
            chat.reset()
            print("(a new conversation)", flush=True)
        elif line.startswith("/"):
            print(f"(unknown command {line.split()[0]}: {HELP})", flush=True)
        elif line:
            try:
                chat.reply(line)
            except KeyboardInterrupt:  # Ctrl-C during a reply stops it; the turn is undone
                print("\n(stopped)", flush=True)
            except TurnTooLong as err:
                print(err, flush=True)

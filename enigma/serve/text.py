"""A reply's text as its tokens come: incremental decoding and stop strings.

Decoding the whole reply at every token costs time that grows with the reply. WordPiece joins
a token to the one before it (a space, none before ``##``, none between two Chinese characters
once :func:`~enigma.data.tokenizer.join_cjk` has run), so a new token's text is what decoding
it with the token before adds to decoding that token alone (each token's text alone is kept,
shared by the engine's streams): one short decode per token, and the concatenation equals
decoding the whole reply.

A stop string ends the reply where it begins and is not part of it; text that could still
become one (a suffix that is a stop string's prefix) is held back until the next token says.
"""

from __future__ import annotations

from ..data.tokenizer import join_cjk


class TextStream:
    """``add(token)`` gives the text the reply may show now; ``finish()`` what it held back.
    ``context`` is the token before the reply (a completion's text continues its prompt's:
    ``"hello"`` then ``"world"`` reads ``" world"``); without it the reply starts afresh.
    ``pieces``: each token's text alone, shared by the streams of one tokenizer (the engine's),
    so that a token costs one decode, of it with the token before."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), context: int | None = None,
                 pieces: dict[int, str] | None = None):  # fmt: skip
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.pieces = {} if pieces is None else pieces
        self.previous = context
        self.text = ""  # the reply so far, a stop string cut off
        self.shown = 0  # characters of text given out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return join_cjk(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _alone(self, token: int) -> str:
        piece = self.pieces.get(token)
        if piece is None:
            piece = self.pieces[token] = self._decode([token])
        return piece

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        if self.previous is None:
            piece = self._alone(token)
        else:
            before = self._alone(self.previous)
            both = self._decode([self.previous, token])
            piece = both[len(before) :] if both.startswith(before) else both
        self.previous = token
        self.text += piece
        if not self.stop:
            return self._show(len(self.text))
        pending = self.text[self.shown :]
        found = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
        if found:
            self.text, self.stopped = self.text[: self.shown + min(found)], True
            return self._show(len(self.text))
        return self._show(len(self.text) - self._held(pending))

    def _held(self, pending: str) -> int:
        """The longest end of ``pending`` that begins some stop string."""
        for n in range(min(len(pending), max(map(len, self.stop)) - 1), 0, -1):
            tail = pending[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _show(self, upto: int) -> str:
        piece, self.shown = self.text[self.shown : upto], max(self.shown, upto)
        return piece

    def finish(self) -> str:
        """The text held back for a stop string that never came."""
        return self._show(len(self.text))


def token_text(tokenizer, token: int) -> str:
    """One token as the logprobs fields name it (its WordPiece form, ``##`` kept)."""
    return tokenizer.convert_ids_to_tokens(token)

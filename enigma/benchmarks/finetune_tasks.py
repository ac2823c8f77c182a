"""The fine-tuning benchmark's tasks, and splits that keep the test set held out.

Each row asks for something done to a string of Chinese numerals (``一`` to ``九``, repeats
allowed) and answers with the result:

- ``sort`` (content): ``把这些字从小到大排好：七三九三一`` -> ``一三三七九``;
- ``reverse`` (position): ``把这些字倒过来：`` -> the string backwards;
- ``rotate`` (position): ``把第一个字挪到最后：`` -> the string with its first numeral moved to
  its end.

Splits are made by *answer*: every answer (for ``sort``, the multiset of numerals, which all its
orderings share) is hashed, with the seed, to train (70 %), dev (15 %) or test (15 %), so no test
answer is the answer of any training row and no test prompt is seen in training. Dev picks the
checkpoint and every knob; test is scored once, at the end.
"""

from __future__ import annotations

import hashlib
import random

from ..errors import InputError

DIGITS = "一二三四五六七八九"
TASKS = {
    "sort": ("把这些字从小到大排好：", lambda s: "".join(sorted(s, key=DIGITS.index))),
    "reverse": ("把这些字倒过来：", lambda s: s[::-1]),
    "rotate": ("把第一个字挪到最后：", lambda s: s[1:] + s[0]),
}
SHARES = {"train": 0.70, "dev": 0.15, "test": 0.15}
POSITION_TASKS = ("reverse", "rotate")


def split_of(answer: str, seed: int) -> str:
    """train, dev or test, a function of the answer and the seed alone."""
    digest = hashlib.blake2b(f"{seed}:{answer}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < SHARES["train"]:
        return "train"
    return "dev" if u < SHARES["train"] + SHARES["dev"] else "test"


def make_splits(task: str, length: int, sizes: dict[str, int], seed: int) -> dict[str, list]:
    """``{split: rows}``: ``sizes[split]`` distinct strings each, whose answers fall in that
    split (for ``sort`` of 5 numerals, 15 % of the 1,287 multisets: a held-out answer may
    have several of its orderings among the rows)."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    instruction, answer_of = TASKS[task]
    rng = random.Random(seed)
    rows: dict[str, list] = {name: [] for name in SHARES}
    seen = set()
    tries = 0
    while any(len(rows[name]) < sizes[name] for name in SHARES):
        tries += 1
        if tries > 200 * sum(sizes.values()):
            raise InputError(f"{task} at length {length} has too few answers for {sizes}")
        text = "".join(rng.choice(DIGITS) for _ in range(length))
        answer = answer_of(text)
        name = split_of(answer, seed)
        if len(rows[name]) >= sizes[name] or text in seen:
            continue
        seen.add(text)
        rows[name].append({"instruction": instruction + text, "output": answer})
    return rows


def answers_shared(rows: dict[str, list]) -> int:
    """Test answers that some training row also has (0 by construction: checked, not assumed)."""
    train = {r["output"] for r in rows["train"]}
    return sum(r["output"] in train for r in rows["test"])

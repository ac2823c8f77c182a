"""The serving engine in-process: rows that join late get the logits they get alone, each row
samples with its own settings and seed, a failing row ends alone, stop strings, prompt
log-probabilities, aborts, and the static policy it is measured against."""

import math
import random

import pytest
import torch
from conftest import perturb

from enigma import EnigmaConfig, EnigmaLM
from enigma.data.tokenizer import join_cjk, load_tokenizer
from enigma.serve.engine import Engine
from enigma.serve.sampling import BLOCK, Sampler, Sampling, _search
from enigma.serve.scheduler import QueueFull, Request
from enigma.serve.text import TextStream


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(quiet=True)


def _lm(**overrides) -> EnigmaLM:
    torch.manual_seed(0)
    fields = dict(vocab_size=3000, d=32, num_transformer_layers=2, num_heads=4, num_rev_blocks=2,
                  num_rotors=2, rotor_positions=4, max_len=128)  # fmt: skip
    model = EnigmaLM(EnigmaConfig(**{**fields, **overrides})).eval()
    if model.machine is not None:
        perturb(model.machine, 0.1)
    return model


def _run(engine: Engine, arrivals: dict[int, list[Request]], steps: int = 200) -> dict:
    """Step the engine, submitting ``arrivals[step]`` before that step; outputs per request."""
    outputs: dict[str, list] = {}
    for step in range(steps):
        for request in arrivals.get(step, []):
            engine.submit([request])
        for out in engine.step():
            outputs.setdefault(out.id, []).append(out)
        if not engine.has_work() and step > max(arrivals):
            break
    return outputs


@pytest.mark.parametrize(
    "overrides",
    [{}, {"use_alibi": False}, {"reversible_layers": True}],
    ids=["alibi", "learned-positions", "reversible-layers"],
)
@pytest.mark.parametrize("mix_tokens", [1 << 14, 0], ids=["one-forward", "prefill-apart"])
def test_rows_joining_late_get_the_logits_they_get_alone(tokenizer, overrides, mix_tokens):
    """Rows join a running batch at different steps, leave, and their slots are refilled; every
    generated token's log-probability equals the one a plain uncached forward of that row alone
    gives (positions and ALiBi distances are each row's own), whether the new prompts share the
    running rows' forward (packed, one token a batch row) or have one of their own."""
    model = _lm(**overrides)
    engine = Engine(model, tokenizer, max_rows=3, mix_tokens=mix_tokens)
    torch.manual_seed(1)
    prompts = [torch.randint(1, 3000, (n,)).tolist() for n in (3, 9, 5, 14, 7)]
    greedy = Sampling(max_tokens=10, temperature=0, logprobs=0)
    requests = [engine.request(f"r{i}", p, greedy) for i, p in enumerate(prompts)]
    outputs = _run(engine, {0: requests[:1], 2: requests[1:3], 5: requests[3:]})
    assert engine.stats.largest_batch == 3 and engine.stats.prefills >= 3
    stats = engine.stats
    if mix_tokens:  # a step that admits rows while others run is still one forward
        assert stats.mixed >= 2 and stats.model_calls == stats.steps
    else:
        assert stats.mixed == 0 and stats.model_calls > stats.steps
    for i, prompt in enumerate(prompts):
        entries = [e for out in outputs[f"r{i}"] for e in out.logprobs]
        generated = [token for token, _, _ in entries]
        assert len(generated) == 10
        with torch.no_grad():
            alone = torch.log_softmax(model(torch.tensor([prompt + generated])).logits[0], -1)
        for j, (token, logprob, _) in enumerate(entries):
            row = alone[len(prompt) - 1 + j]
            assert token == int(row.argmax())
            assert logprob == pytest.approx(float(row[token]), abs=1e-5)


def test_a_long_prompt_joins_a_row_near_the_models_end_in_one_forward(tokenizer):
    """Learned positions end at ``max_len``: a packed forward computes no padding, so a long
    new prompt shares the forward of a row near that end (no position past it is tried, no
    forward fails and is retried) and both rows get their logits alone."""
    model = _lm(use_alibi=False, max_len=32)
    engine = Engine(model, tokenizer, max_rows=2)
    attempts = []
    model.register_forward_pre_hook(lambda *_: attempts.append(1))
    greedy = Sampling(max_tokens=20, temperature=0, logprobs=0)
    first = engine.request("a", [5, 6, 7, 8], greedy)
    second = engine.request("b", list(range(30, 42)), greedy)
    outputs = _run(engine, {0: [first], 18: [second]})
    stats = engine.stats
    assert stats.mixed == 1 and stats.model_calls == stats.steps
    assert len(attempts) == stats.model_calls, "no forward was tried that had to fail"
    for request in (first, second):
        generated = [t for out in outputs[request.id] for t in out.tokens]
        with torch.no_grad():
            alone = model(torch.tensor([request.prompt + generated[:-1]])).logits[0]
        assert generated == alone[len(request.prompt) - 1 :].argmax(-1).tolist()


def test_a_joining_request_gets_its_first_token_at_its_prefill(tokenizer):
    engine = Engine(_lm(), tokenizer, max_rows=4)
    long = engine.request("long", [5, 6, 7], Sampling(max_tokens=40, temperature=0))
    engine.submit([long])
    for _ in range(5):
        engine.step()
    short = engine.request("short", [8, 9], Sampling(max_tokens=4, temperature=0))
    engine.submit([short])
    first = [out for out in engine.step() if out.id == "short"]
    assert first and len(first[0].tokens) == 1, "the prefill step gives the first token"
    assert engine.scheduler.running[0].id == "long"


SETTINGS = [
    Sampling(max_tokens=12, temperature=0.9),
    Sampling(max_tokens=12, temperature=0.7, top_p=0.8),
    Sampling(max_tokens=12, temperature=1.2, top_k=20),
    Sampling(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.3),
    Sampling(max_tokens=12, temperature=0.8, presence_penalty=1.5, frequency_penalty=0.5),
    Sampling(max_tokens=12, temperature=0.8, logit_bias=((7, 5.0), (9, -100.0))),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["T", "top-p", "top-k", "k-p-rep", "pres-freq",
                                                    "bias"])  # fmt: skip
def test_a_seeded_request_draws_the_same_text_whatever_shares_its_steps(tokenizer, settings):
    model = _lm()
    seeded = Sampling(**{**settings.__dict__, "seed": 1234})
    alone = Engine(model, tokenizer, max_rows=8)
    solo = _run(alone, {0: [alone.request("x", [11, 12, 13], seeded)]})["x"]
    crowd = Engine(model, tokenizer, max_rows=8)
    others = [crowd.request(f"o{i}", [20 + i] * (i + 2), s) for i, s in enumerate(SETTINGS)]
    shared = _run(crowd, {0: others[:3], 1: [crowd.request("x", [11, 12, 13], seeded)],
                          2: others[3:]})["x"]  # fmt: skip
    assert [t for out in shared for t in out.tokens] == [t for out in solo for t in out.tokens]
    third = Engine(model, tokenizer, max_rows=8)
    other_seed = Sampling(**{**settings.__dict__, "seed": 99})
    different = _run(third, {0: [third.request("x", [11, 12, 13], other_seed)]})["x"]
    assert [t for o in different for t in o.tokens] != [t for o in solo for t in o.tokens]


@pytest.mark.parametrize(
    ("settings", "kept"),
    [({"temperature": 0.7}, None), ({"temperature": 0.7, "top_p": 0.8}, "p"),
     ({"temperature": 1.3, "top_k": 5}, "k"), ({"temperature": 1.0, "top_k": 8, "top_p": 0.7},
                                               "kp")],
)  # fmt: skip
def test_each_path_samples_its_distribution(settings, kept):
    """Inverse CDF over the vocabulary, top-p by rejection, top-k (then top-p) among the
    candidates: 40,000 draws each match the distribution a sort-based reference keeps."""
    torch.manual_seed(3)
    vocab, rows = 60, 8
    logits = torch.randn(vocab) * 2
    sampler = Sampler(rows, vocab, torch.device("cpu"))
    for slot in range(rows):
        sampler.assign(slot, Sampling(**settings), seed=slot, prompt=[1])
    counts = torch.zeros(vocab)
    for _ in range(5000):
        draw = sampler.choose(logits.expand(rows, vocab), 0, rows)
        counts += torch.bincount(draw.tensor, minlength=vocab)
    probs = torch.softmax(logits / settings["temperature"], -1)
    ordered, order = probs.sort(descending=True)
    keep = torch.ones(vocab, dtype=torch.bool)
    if "k" in (kept or ""):
        keep &= torch.arange(vocab) < settings["top_k"]
        ordered = torch.where(keep, ordered, 0)
        ordered = ordered / ordered.sum()
    if "p" in (kept or ""):
        keep &= (ordered.cumsum(0) - ordered) < settings["top_p"]
    reference = torch.zeros(vocab)
    reference[order[keep]] = ordered[keep] / ordered[keep].sum()
    frequency = counts / counts.sum()
    assert (frequency[reference == 0] == 0).all(), "a token outside the kept set was drawn"
    tolerance = 4 * torch.sqrt(reference * (1 - reference) / counts.sum()) + 1e-3
    assert ((frequency - reference).abs() <= tolerance).all()


@pytest.mark.parametrize("width", [3 * BLOCK, 2 * BLOCK + 44, 50])
def test_the_two_level_search_is_the_inverse_cdf(width):
    """Each token's share of evenly spread numbers is its weight's share (to a rounding at its
    edges), and no number, however near 0 or 1, lands on a token of weight 0: the first
    tokens, a whole block, a block's last and the row's last are all 0 here."""
    torch.manual_seed(0)
    weights = torch.rand(2, width) ** 4
    zero = [0, 1, width - 1, min(BLOCK - 1, width - 2)]
    if width > 2 * BLOCK:
        zero += range(BLOCK, 2 * BLOCK)
    weights[:, zero] = 0
    weights[1] *= 1e-30  # tiny, unnormalised weights search the same
    draws = 100_000
    u = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws
    for row in range(2):
        # and the numbers at each token's end (so each block's), where rounding bites
        one = torch.ones(1, dtype=torch.float64)
        ends = weights[row].double().cumsum(0) / weights[row].double().sum()
        ends = torch.cat([ends, torch.tensor([1e-300, 2.0**-60, 1 - 2.0**-53])])
        edges = torch.cat([ends.nextafter(0 * one), ends, ends.nextafter(one)])
        edges = edges.clamp(1e-300, 1 - 2.0**-53)
        picked = torch.cat([_search(weights[row].expand(len(part), width), part[:, None])
                            for part in (u, edges)])  # fmt: skip
        assert (weights[row, picked] > 0).all(), "a token of weight 0 was found"
        counts = torch.bincount(picked[:draws], minlength=width).double()
        share = weights[row].double() / weights[row].double().sum()
        assert ((counts - share * draws).abs() <= 1.01).all()


def test_the_search_finds_no_token_of_weight_0_at_a_blocks_edge():
    """Numbers at a block's edge as the search sums in fp32 (give or take a few roundings), half
    the tokens and each block's first and last of weight 0: the blocks' sums and the sums inside
    a block round differently, and the difference must not step onto a token of weight 0."""
    g = torch.Generator().manual_seed(0)
    rows, width = 64, 8 * BLOCK
    for _ in range(50):
        weights = torch.rand(rows, width, generator=g) ** 8
        weights[torch.rand(rows, width, generator=g) < 0.5] = 0
        weights[:, ::BLOCK] = weights[:, BLOCK - 1 :: BLOCK] = 0
        running = weights.view(rows, -1, BLOCK).sum(-1).cumsum(-1)
        edge = running.gather(1, torch.randint(0, 7, (rows, 1), generator=g)) / running[:, -1:]
        nudge = torch.randint(-3, 4, (rows, 1), generator=g) * 2.0**-25
        u = (edge.double() + nudge).clamp(1e-12, 1 - 2.0**-53)
        picked = _search(weights, u)
        assert (weights.gather(1, picked[:, None]) > 0).all(), "a token of weight 0 was found"


def test_penalties_change_only_the_seen_tokens_as_the_formulas_say():
    vocab = 50
    sampler = Sampler(2, vocab, torch.device("cpu"), max_len=32)
    s = Sampling(temperature=0, repetition_penalty=2.0, presence_penalty=0.5,
                 frequency_penalty=0.25)  # fmt: skip
    sampler.assign(0, s, seed=0, prompt=[3, 4])
    sampler.assign(1, Sampling(temperature=0), seed=0, prompt=[5])
    logits = torch.linspace(-3, 3, vocab).expand(2, vocab).contiguous()
    sampler._count(torch.tensor([4, 7]), slice(0, 2))  # row 0 generated 4, row 1 generated 7
    sampler._count(torch.tensor([4, 8]), slice(0, 2))
    out = sampler._penalised(logits, slice(0, 2), sampler.plan(0, 2))
    expect = logits[0].clone()
    for token in (3, 4):  # seen: prompt 3 and 4, generated 4 twice
        v = expect[token]
        expect[token] = v / 2 if v > 0 else v * 2
    expect[4] -= 0.25 * 2 + 0.5
    torch.testing.assert_close(out[0], expect)
    torch.testing.assert_close(out[1], logits[1])  # neutral settings: untouched


def test_a_row_that_fails_in_a_step_ends_alone(tokenizer):
    """A setting no check let through (top_k past the vocabulary) breaks its row's sampling:
    that row ends with the error, the others give what they give alone."""
    model = _lm()
    greedy = Sampling(max_tokens=6, temperature=0)
    alone = Engine(model, tokenizer, max_rows=4)
    solo = _run(alone, {0: [alone.request("good", [4, 5, 6], greedy)]})["good"]
    engine = Engine(model, tokenizer, max_rows=4)
    poison = Request("bad", [7, 8], Sampling(max_tokens=6, top_k=10**9), seed=1,
                     text=TextStream(tokenizer))  # fmt: skip
    outputs = _run(engine, {0: [engine.request("good", [4, 5, 6], greedy), poison]})
    assert outputs["bad"][-1].finish_reason == "error" and "index" in outputs["bad"][-1].error
    good = [t for out in outputs["good"] for t in out.tokens]
    assert good == [t for out in solo for t in out.tokens]
    assert engine.stats.failed == 1
    later = _run(engine, {0: [engine.request("after", [4, 5, 6], greedy)]})["after"]
    assert [t for out in later for t in out.tokens] == good, "the engine goes on serving"


def test_a_row_that_fails_joining_a_running_one_leaves_its_seeded_draws_untouched(tokenizer):
    """The failing row joins a sampling row's forward two steps in: the draws the step made
    before the failure are taken back, so the running row, retried alone, draws what it draws
    with nobody beside it."""
    model = _lm()
    seeded = Sampling(max_tokens=8, temperature=1.0, seed=7)
    alone = Engine(model, tokenizer, max_rows=4)
    solo = _run(alone, {0: [alone.request("good", [4, 5, 6], seeded)]})["good"]
    engine = Engine(model, tokenizer, max_rows=4)
    poison = Request("bad", [7, 8], Sampling(max_tokens=6, top_k=10**9), seed=1,
                     text=TextStream(tokenizer))  # fmt: skip
    outputs = _run(engine, {0: [engine.request("good", [4, 5, 6], seeded)], 2: [poison]})
    assert outputs["bad"][-1].finish_reason == "error"
    assert [t for out in outputs["good"] for t in out.tokens] == [
        t for out in solo for t in out.tokens
    ]


@pytest.mark.parametrize("bad", [{"temperature": math.nan}, {"top_p": 0.0}, {"top_k": 10**20},
                                 {"repetition_penalty": math.nan}, {"presence_penalty": 3.0},
                                 {"logit_bias": ((5, math.inf),)}])  # fmt: skip
def test_settings_no_row_may_sample_with_are_refused(tokenizer, bad):
    problem = Sampling(**bad).problem(21128)
    assert problem is not None and problem[0] == next(iter(bad))
    engine = Engine(_lm(), tokenizer)
    with pytest.raises(ValueError):
        engine.request("x", [1, 2], Sampling(**bad))


def test_prompt_logprobs_are_the_models_own(tokenizer):
    model = _lm()
    engine = Engine(model, tokenizer)
    prompt = [9, 42, 77, 1000, 5, 18]
    echo = Sampling(max_tokens=0, prompt_logprobs=2)
    (out,) = _run(engine, {0: [engine.request("e", prompt, echo)]})["e"]
    assert out.finish_reason == "length" and not out.tokens
    with torch.no_grad():
        own = torch.log_softmax(model(torch.tensor([prompt])).logits[0], -1)
    assert out.prompt_logprobs[0][:2] == (9, None)
    for i, (token, logprob, top) in enumerate(out.prompt_logprobs[1:]):
        assert token == prompt[i + 1]
        assert logprob == pytest.approx(float(own[i, token]), abs=1e-5)
        assert [t for t, _ in top] == own[i].topk(2).indices.tolist()


def test_prompt_logprobs_of_a_row_joining_running_ones_are_the_models_own(tokenizer):
    """A scoring request arriving while another decodes has a forward of its own (its prompt's
    positions all need logits); the other goes on in the same step."""
    model = _lm()
    engine = Engine(model, tokenizer)
    prompt = [9, 42, 77, 1000, 5, 18]
    running = engine.request("r", [3, 4], Sampling(max_tokens=6, temperature=0))
    echo = engine.request("e", prompt, Sampling(max_tokens=0, prompt_logprobs=0))
    outputs = _run(engine, {0: [running], 2: [echo]})
    assert engine.stats.mixed == 0 and len(outputs["r"]) == 6
    (out,) = outputs["e"]
    with torch.no_grad():
        own = torch.log_softmax(model(torch.tensor([prompt])).logits[0], -1)
    got = [logprob for _, logprob, _ in out.prompt_logprobs[1:]]
    assert got == pytest.approx([float(own[i, t]) for i, t in enumerate(prompt[1:])], abs=1e-5)


def test_stop_strings_end_the_reply_before_them(tokenizer):
    ids = tokenizer("话说天下大势，分久必合", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, stop=("大势", "分久"))
    shown = ""
    for token in ids:
        shown += stream.add(token)
        if stream.stopped:
            break
    shown += stream.finish()
    assert shown == "话说天下" and stream.stopped
    held = TextStream(tokenizer, stop=("天下无敌",))
    pieces = [held.add(t) for t in ids[:4]]
    assert pieces[2] == "" and pieces[3] == "", "a possible stop string is held back"
    assert "".join(pieces) + held.finish() == "话说天下" and not held.stopped


def test_incremental_text_is_the_whole_decode(tokenizer):
    """Also with the tokens' own texts shared between streams, as the engine shares them."""
    torch.manual_seed(0)
    pieces = {}
    for trial in range(40):
        ids = torch.randint(100, 21128, (30,)).tolist()
        if trial % 2:  # tokens another stream has decoded already
            ids = [ids[0], *random.Random(trial).choices(list(pieces), k=29)]
        stream = TextStream(tokenizer, context=ids[0], pieces=pieces)
        text = "".join(stream.add(t) for t in ids[1:]) + stream.finish()
        whole = join_cjk(tokenizer.decode(ids, skip_special_tokens=True))
        assert join_cjk(tokenizer.decode(ids[:1], skip_special_tokens=True)) + text == whole


def test_aborted_and_queued_requests_leave(tokenizer):
    engine = Engine(_lm(), tokenizer, max_rows=1, max_queue=1)
    long = Sampling(max_tokens=50, temperature=0)
    engine.submit([engine.request("a", [1, 2], long)])
    engine.step()
    engine.submit([engine.request("b", [3, 4], long)])
    with pytest.raises(QueueFull):
        engine.submit([engine.request("c", [5, 6], long)])
    engine.abort("b")  # still waiting: gone at once
    assert not engine.scheduler.waiting
    engine.abort("a")  # running: leaves at the next step, its slot free
    engine.step()
    assert not engine.scheduler.running and not engine.has_work()
    assert engine.stats.aborted == 2 and engine.cache.capacity == 0, "an idle engine holds no KV"


def test_static_batches_admit_nobody_while_one_runs(tokenizer):
    engine = Engine(_lm(), tokenizer, max_rows=4, policy="static", batch_wait_s=0)
    engine.submit([engine.request("first", [1, 2], Sampling(max_tokens=8, temperature=0))])
    engine.step()
    engine.submit([engine.request("late", [3, 4], Sampling(max_tokens=2, temperature=0))])
    for _ in range(7):
        assert all(out.id == "first" for out in engine.step())
    assert [out.id for out in engine.step()] == ["late"], "it starts once the batch has ended"

"""Fine-tuning and chat on the same stack: rows in both formats, the chat template in the tokenizer,
the loss on the assistant's tokens, LoRA through Ray Train + DeepSpeed ZeRO-2 whose merged model
(loaded without the project) equals base + adapter, and `enigma chat` in a pseudo-terminal."""

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, load_without_project

from enigma.cli import main
from enigma.data.conversations import IGNORE, encode, read_conversations, with_chat_template
from enigma.data.tokenizer import join_cjk, load_tokenizer
from enigma.errors import InputError

ROWS = [
    {"instruction": "把这些字倒过来：一二三", "output": "三二一"},
    {"instruction": "重复", "input": "孔明", "output": "孔明"},
    {"messages": [{"role": "system", "content": "你是谋士"},
                  {"role": "user", "content": "何以破曹？"},
                  {"role": "assistant", "content": "火攻"},
                  {"role": "user", "content": "何时？"},
                  {"role": "assistant", "content": "东风起时"}]},
]  # fmt: skip


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def test_rows_of_both_formats_and_a_malformed_row_named_by_its_line(tmp_path):
    conversations = read_conversations(str(write_jsonl(tmp_path / "rows.jsonl", ROWS)))
    assert conversations[1] == [{"role": "user", "content": "重复\n孔明"},
                                {"role": "assistant", "content": "孔明"}]  # fmt: skip
    assert [t["role"] for t in conversations[2]][-2:] == ["user", "assistant"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS[1::-1]), tmp_path / "rows.parquet")  # input: null
    assert read_conversations(str(tmp_path / "rows.parquet")) == conversations[1::-1]
    bad = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"instruction": "缺少输出"}])
    with pytest.raises(InputError, match=r"bad.jsonl:2: .*'output' missing"):
        read_conversations(str(bad))
    turnless = write_jsonl(tmp_path / "turns.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(InputError, match=r"turns.jsonl:1: turn 0 needs a 'role'"):
        read_conversations(str(turnless))


def test_the_template_gives_the_ids_training_used_and_the_loss_sees_the_assistant_only():
    tokenizer = with_chat_template(load_tokenizer(quiet=True))
    conversation = read_conversations_from(ROWS[2])
    arrays, dropped = encode(tokenizer, [conversation], 64)
    ids, labels = arrays["input_ids"][0].tolist(), arrays["labels"][0].tolist()
    length = int(arrays["attention_mask"][0].sum())
    assert dropped == 0 and ids[length:] == [tokenizer.pad_token_id] * (64 - length)
    for turn in (2, 4):  # each reply's prompt is a prefix of the training ids
        prompt = tokenizer.apply_chat_template(conversation[:turn], add_generation_prompt=True)
        assert ids[: len(prompt["input_ids"])] == prompt["input_ids"]
    learned = tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert learned.replace(" ", "") == "火攻[SEP]东风起时[SEP]"
    assert encode(tokenizer, [conversation], 8)[1] == 1, "too long for seq_len: left out"


def test_every_assistant_token_is_learned_and_a_reply_of_no_tokens_is_refused(tmp_path):
    """The mask is built turn by turn: replies that start with spaces or a newline keep all
    their tokens; a reply whose text gives no token at all (a zero-width space) would teach an
    empty answer and is refused by its line."""
    tokenizer = with_chat_template(load_tokenizer(quiet=True))
    for reply in (" 答案", "\n答案", "  答 案", "答案"):
        conversation = [{"role": "user", "content": "问"}, {"role": "assistant", "content": reply}]
        arrays, _ = encode(tokenizer, [conversation], 16)
        ids, labels = arrays["input_ids"][0].tolist(), arrays["labels"][0].tolist()
        learned = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE]
        assert tokenizer.convert_ids_to_tokens(learned) == ["答", "案", "[SEP]"], reply
    rows = write_jsonl(
        tmp_path / "rows.jsonl", [ROWS[0], {"instruction": "问", "output": "\u200b"}]
    )
    from enigma.data.conversations import prepare_conversations

    with pytest.raises(InputError, match=r"rows.jsonl:2: turn 1: the assistant's text"):
        prepare_conversations(str(rows), tmp_path / "prepared", tokenizer, 16, 0.0,
                              str(rows), 0)  # fmt: skip


def read_conversations_from(row):
    from enigma.data.conversations import to_messages

    return to_messages(row, "test")


@pytest.fixture(scope="module")
def tuned(ray_cluster, tmp_path_factory):
    """A small saved model (max_len 48, so a chat outgrows it), fine-tuned with LoRA by two Ray
    Train workers under ZeRO-2 in bf16 (the module's weights rounded, the optimizer's masters
    fp32), on the shared cluster."""
    from enigma import EnigmaConfig, EnigmaLM

    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    base = EnigmaLM(EnigmaConfig.from_preset("tiny", d=64, num_heads=2, max_len=48))
    base.save_pretrained(root / "base")
    load_tokenizer(quiet=True).save_pretrained(root / "base")
    rows = write_jsonl(root / "rows.jsonl", ROWS * 12)
    zero2 = str(ROOT / "ds_configs" / "zero2.json")
    argv = ["finetune", "--model", str(root / "base"), "--data", str(rows), "--output-dir",
            str(root / "out"), "--workers", "2", "--ds-config", zero2, "--set", "precision=bf16",
            "--max-steps", "6",
            "--lora-r", "4", "--set", "micro_batch=2", "--set", "seq_len=48",
            "--set", "eval_steps=3", "--set", "lr=5e-3", "--set", "val_fraction=0.2"]  # fmt: skip
    assert main(argv) == 0
    return root


def test_lora_through_ray_and_deepspeed_merges_into_a_model_that_travels(tuned, tmp_path):
    from peft import PeftModel

    from enigma import EnigmaLM

    out = tuned / "out"
    assert (out / "adapter" / "adapter_config.json").is_file()
    tokenizer = load_tokenizer(str(out / "model"), quiet=True)
    assert tokenizer.chat_template, "the merged model's tokenizer carries the template"
    card = (out / "model" / "README.md").read_text()
    assert "## Fine-tuning" in card and str(tuned / "base") in card and "LoRA (rank 4" in card
    assert "Val perplexity" in card
    prompt = [[101, 4500, 2787, 8038, 2828, 3144]]
    base = EnigmaLM.from_pretrained(tuned / "base").eval()
    adapted = PeftModel.from_pretrained(EnigmaLM.from_pretrained(tuned / "base"), out / "adapter")
    with torch.no_grad():
        expected = adapted.eval()(input_ids=torch.tensor(prompt)).logits[:, -1]
        untouched = base(torch.tensor(prompt)).logits[:, -1]
    assert (expected - untouched).abs().max() > 1e-4, "the adapter learned something"
    (merged,) = load_without_project([out / "model"], prompt, 2, tmp_path)
    assert torch.allclose(torch.tensor(merged["logits"]), expected, atol=1e-5)
    # Trained in bf16, exported from fp32: the frozen weights are the base's, bit for bit (not
    # rounded to bf16 as the module held them), the adapter's from the fp32 masters.
    exported = EnigmaLM.from_pretrained(out / "model").state_dict()
    for name, weight in base.state_dict().items():
        if not any(part in name for part in ("qkv", "proj", "mlp", "norm.")):
            assert torch.equal(exported[name], weight), name
    lora = [p for n, p in adapted.named_parameters() if "lora_" in n]
    assert any(not torch.equal(p, p.bfloat16().float()) for p in lora), "fp32, not bf16 values"
    # A kept checkpoint re-exported: the base with its adapter, merged, the same shape.
    assert main(["export", str(out), str(tmp_path / "step6"), "--step", "6"]) == 0
    again = EnigmaLM.from_pretrained(tmp_path / "step6")
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in base.parameters())
    assert "## Fine-tuning" in (tmp_path / "step6" / "README.md").read_text()


def _read_until(fd, marker: str, timeout: float = 120.0) -> str:
    seen, deadline = "", time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no {marker!r} in {seen[-2000:]!r}"
        seen += os.read(fd, 4096).decode("utf-8", "replace")
    return seen


def test_chat_in_a_terminal_streams_replies_resets_drops_old_turns_and_exits(tuned):
    """Driven through a pseudo-terminal: a streamed reply, a conversation that outgrows the
    model's 48 tokens losing its oldest turn, /reset, /exit."""
    from enigma.inference.generate import load_model

    leader, follower = pty.openpty()
    argv = [sys.executable, "-m", "enigma.cli", "chat", str(tuned / "out" / "model"),
            "--temperature", "0", "--max-new-tokens", "6", "--repetition-penalty", "1"]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    os.close(follower)
    try:
        assert "/reset starts over" in _read_until(leader, "> ")
        os.write(leader, "何以破曹？\n".encode())
        reply = _read_until(leader, "> ").split("何以破曹？", 1)[1].rsplit("> ", 1)[0].strip()
        model = load_model(str(tuned / "out" / "model"))
        tokenizer = load_tokenizer(str(tuned / "out" / "model"), quiet=True)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "何以破曹？"}],
                                            add_generation_prompt=True)["input_ids"]  # fmt: skip
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
        expected = tokenizer.decode(greedy[0, len(ids) :], skip_special_tokens=True)
        assert reply == join_cjk(expected).strip(), "Chinese printed without WordPiece's spaces"
        os.write(leader, "东风何时起？请详细说说赤壁之战的天时地利人和与借东风之计\n".encode())
        assert "the oldest turn was dropped" in _read_until(leader, "> ")
        os.write(leader, b"/reset\n")
        assert "(a new conversation)" in _read_until(leader, "> ")
        os.write(leader, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(leader)


def test_a_pretrained_model_chats_as_plain_continuation_and_says_so(tuned):
    argv = [sys.executable, "-m", "enigma.cli", "chat", str(tuned / "base"), "--max-new-tokens",
            "3", "--temperature", "0"]  # fmt: skip
    done = subprocess.run(argv, input="曹操\n", capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]  # Ctrl-D (end of input) ends it
    assert "has no chat template (a pretrained model)" in done.stdout


def test_a_reply_stopped_by_ctrl_c_leaves_no_half_turn(monkeypatch):
    """Ctrl-C during a reply undoes its user turn: the next turn follows the last complete one."""
    import argparse

    from enigma import EnigmaLM
    from enigma.inference.chat import Conversation
    from enigma.models.lm_config import EnigmaConfig

    model = EnigmaLM(EnigmaConfig.from_preset("tiny")).eval()
    args = argparse.Namespace(system="你是谋士", max_new_tokens=4, seed=0, temperature=0.0,
                              top_k=50, top_p=0.9, repetition_penalty=1.0)  # fmt: skip
    chat = Conversation(model, with_chat_template(load_tokenizer(None, quiet=True)), args)
    chat.reply("何以破曹？")
    kept = list(chat.messages)
    assert [m["role"] for m in kept] == ["system", "user", "assistant"]

    def interrupted(ids):
        raise KeyboardInterrupt

    monkeypatch.setattr(chat, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        chat.reply("再问一次")
    assert chat.messages == kept


def _tuning_config(base, **knobs):
    from enigma.train.config import build_config

    sets = [f"{k}={v}" for k, v in knobs.items()]
    return build_config(None, None, sets, base_model=str(base), conversations="rows.jsonl",
                        output_dir=str(base / "out"), data=str(base / "data"))  # fmt: skip


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    from enigma import EnigmaConfig, EnigmaLM

    root = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    EnigmaLM(EnigmaConfig.from_preset("tiny", d=64, num_heads=2, max_len=48)).save_pretrained(root)
    return root


LORA_CHANGES = [("lora_r", 8), ("lora_alpha", 64), ("lora_dropout", 0.1),
                ("lora_targets", "attention")]  # fmt: skip


@pytest.mark.parametrize(("key", "value"), LORA_CHANGES)
def test_every_lora_setting_is_in_the_resume_fingerprint(small_base, key, value):
    from enigma.train.driver import tuned as tuned_part
    from enigma.train.resume import DATA_ORDER_KEYS, fingerprint, mismatch

    def stamp(cfg):
        order = dict.fromkeys(DATA_ORDER_KEYS, 0)
        return fingerprint(cfg.model_config(), {}, 1, order, tuned_part(cfg))

    saved, now = (
        stamp(_tuning_config(small_base)),
        stamp(_tuning_config(small_base, **{key: value})),
    )
    assert mismatch(saved, now) is not None and key in mismatch(saved, now)


def test_building_the_model_leaves_the_random_stream_alone(small_base):
    """Each new best's export builds the model again: the caller's random stream (rank 0's
    dropout and data order) must not be reseeded by it."""
    from enigma.train.tuning import build_model

    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = build_model(_tuning_config(small_base, lora_dropout=0.1))
    assert torch.equal(torch.get_rng_state(), before)
    again = build_model(_tuning_config(small_base, lora_dropout=0.1))
    a = {n: p for n, p in first.named_parameters() if "lora_A" in n}
    assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in a.items())


def test_lora_on_the_coupling_nets_runs_without_dropout(small_base):
    from enigma.train.tuning import build_model

    model = build_model(_tuning_config(small_base, lora_targets="attention,coupling",
                                       lora_dropout=0.2))  # fmt: skip
    drops = {n: m for n, m in model.named_modules() if n.endswith("lora_dropout.default")}
    machine = [m for n, m in drops.items() if ".machine." in n]
    layers = [m for n, m in drops.items() if ".machine." not in n]
    assert machine and all(isinstance(m, torch.nn.Identity) for m in machine)
    assert layers and all(isinstance(m, torch.nn.Dropout) and m.p == 0.2 for m in layers)


def test_a_last_turn_too_long_is_refused_keeping_the_system_message():
    import argparse

    from enigma import EnigmaLM
    from enigma.inference.chat import Conversation, TurnTooLong
    from enigma.models.lm_config import EnigmaConfig

    model = EnigmaLM(EnigmaConfig.from_preset("tiny", max_len=48)).eval()
    args = argparse.Namespace(system="你是谋士", max_new_tokens=8, seed=0, temperature=0.0,
                              top_k=50, top_p=0.9, repetition_penalty=1.0)  # fmt: skip
    chat = Conversation(model, with_chat_template(load_tokenizer(None, quiet=True)), args)
    chat.reply("何以破曹？")
    kept = list(chat.messages)
    with pytest.raises(TurnTooLong, match="too long"):
        chat.reply("东风" * 30)
    assert chat.messages == kept, "the refused turn is undone, the system message kept"
    chat.reply("何时？")
    assert chat.messages[0] == {"role": "system", "content": "你是谋士"}


def test_lora_flags_beside_full_are_one_line(tmp_path, capsys):
    argv = ["finetune", "--model", str(tmp_path), "--data", str(tmp_path / "rows.jsonl"), "--full",
            "--lora-alpha", "64", "--output-dir", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--full trains every weight, no LoRA: drop --lora-alpha" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("task", ["sort", "reverse", "rotate"])
def test_the_benchmarks_test_answers_are_never_training_answers(task):
    from enigma.benchmarks.finetune_tasks import TASKS, answers_shared, make_splits

    sizes = {"train": 3000, "dev": 150, "test": 200}
    rows = make_splits(task, 5, sizes, seed=1)
    assert {k: len(v) for k, v in rows.items()} == sizes
    answer_of = TASKS[task][1]
    for name, split in rows.items():  # each answer is what the task makes of its prompt
        for r in split[:50]:
            assert r["output"] == answer_of(r["instruction"][-5:]), name
    assert answers_shared(rows) == 0
    answers = {name: {r["output"] for r in split} for name, split in rows.items()}
    assert not answers["train"] & answers["dev"] and not answers["dev"] & answers["test"]
    prompts = [r["instruction"] for split in rows.values() for r in split]
    assert len(prompts) == len(set(prompts))
    if task == "sort":  # a multiset is one answer: none of its orderings is in two splits
        assert not answers["train"] & answers["test"]

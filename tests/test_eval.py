"""`enigma eval`: lm-evaluation-harness on saved models (a local multiple-choice and a rolling
perplexity task, the chat template where a model has one, several models as Ray tasks), and
sliding-window perplexity beyond the training length, against the project's own loss."""

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, own_ray_cluster

from enigma.cli import main
from enigma.errors import InputError

HARNESS = ROOT / "tests" / "harness"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A pretrained-shaped model (no template) and the same weights with a chat template."""
    from enigma import EnigmaConfig, EnigmaLM
    from enigma.data.conversations import with_chat_template
    from enigma.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    config = EnigmaConfig.from_preset("tiny", d=64, num_heads=2, max_len=64)
    config.train_seq_len = 32
    model = EnigmaLM(config)
    for name, template in (("plain", False), ("chat", True)):
        model.save_pretrained(root / name)
        tokenizer = load_tokenizer(quiet=True)
        (with_chat_template(tokenizer) if template else tokenizer).save_pretrained(root / name)
    return root


def test_harness_tasks_on_saved_models_as_ray_tasks(saved, tmp_path, capsys, monkeypatch):
    import ray

    own_ray_cluster()  # `eval --ray` starts its own, as a user's command does
    monkeypatch.chdir(tmp_path)  # the tasks' data files are found beside their YAML all the same
    out = tmp_path / "results.json"
    argv = ["eval", str(saved / "plain"), str(saved / "chat"), "--tasks", "enigma_mc,enigma_text",
            "--include-path", str(HARNESS), "--ray", "--json", str(out)]  # fmt: skip
    try:
        assert main(argv) == 0
    finally:
        ray.shutdown()
    plain, chat = json.loads(out.read_text())
    assert (plain["chat_template"], chat["chat_template"]) == (False, True)
    for result in (plain, chat):
        assert 0 <= result["results"]["enigma_mc"]["acc,none"] <= 1
        assert result["results"]["enigma_text"]["bits_per_byte,none"] > 0
    shown = capsys.readouterr().out
    assert "enigma_mc: acc" in shown and str(saved / "chat") in shown


def test_an_unknown_task_is_one_line(saved, capsys):
    assert main(["eval", str(saved / "plain"), "--tasks", "enigma_mcq", "--include-path",
                 str(HARNESS)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "unknown task 'enigma_mcq'" in err and "enigma_mc" in err and len(err.splitlines()) == 1


def test_perplexity_in_one_window_is_the_models_own_loss(saved, tmp_path):
    """One window over the whole text scores what the training loss scores."""
    from enigma import EnigmaLM
    from enigma.data.tokenizer import load_tokenizer
    from enigma.evaluation.perplexity import perplexity, token_stream

    text = tmp_path / "text.jsonl"
    rows = [{"text": "话说天下大势，分久必合。"}, {"text": "却说曹操引兵追赶。"}]
    text.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    model = EnigmaLM.from_pretrained(saved / "plain").eval()
    stream = token_stream(str(text), load_tokenizer(str(saved / "plain"), quiet=True))
    assert stream[0] == 102 and list(stream).count(102) == 3, "[SEP] first and after each"
    ids = torch.from_numpy(stream)[None]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    found = perplexity(model, stream, window=len(stream))
    assert found["tokens"] == len(stream) - 1
    assert found["nll"] == pytest.approx(float(loss), abs=1e-5)


def test_windows_score_every_token_once_beyond_the_training_length(saved, tmp_path, capsys):
    from enigma.evaluation.perplexity import windows

    for length, window in ((100, 16), (17, 16), (16, 16), (5, 16), (1000, 7)):
        spans = windows(length, window)
        scored = [t for _, end, first in spans for t in range(first, end)]
        assert scored == list(range(1, length)), (length, window)
        assert all(end - begin <= window for begin, end, _ in spans)
        assert all(first - begin >= min(window // 2, first) for begin, _, first in spans[1:])
    text = tmp_path / "long.txt"
    text.write_text("\n".join(["话说天下大势，分久必合，合久必分。周末七国分争，并入于秦。"] * 12))
    argv = ["eval", str(saved / "plain"), "--perplexity", str(text), "--lengths", "1,2,4",
            "--json", str(tmp_path / "ppl.json")]  # fmt: skip
    assert main(argv) == 0
    (result,) = json.loads((tmp_path / "ppl.json").read_text())
    assert result["train_length"] == 32, "read from the saved config"
    assert [r["window"] for r in result["lengths"]] == [32, 64, 128]
    assert (
        len({r["tokens"] for r in result["lengths"]}) == 1
        and np.isfinite([r["perplexity"] for r in result["lengths"]]).all()
    )
    with pytest.raises(InputError, match="give --length"):
        from enigma.evaluation.cli import training_length

        (saved / "bare").mkdir()
        (saved / "bare" / "config.json").write_text("{}")
        training_length(str(saved / "bare"), None)


def test_lm_eval_runs_unchanged_on_saved_models(saved, tmp_path):
    """The harness's own command line, as a user types it: multiple choice, rolling perplexity and
    generation on a pretrained model, generation through the chat template on a fine-tuned one."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    found = {}
    for name, tasks, extra in (("plain", "enigma_mc,enigma_text,enigma_gen", []),
                               ("chat", "enigma_gen", ["--apply_chat_template"])):  # fmt: skip
        out = tmp_path / name
        cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={saved / name},trust_remote_code=True", "--tasks", tasks,
               "--include_path", str(HARNESS), "--output_path", str(out), "--log_samples",
               *extra]  # fmt: skip
        done = subprocess.run(cmd, cwd=HARNESS, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        (results,) = out.rglob("results_*.json")
        found[name] = json.loads(results.read_text())
        samples = {p.name.split("_20")[0]: p for p in out.rglob("samples_*.jsonl")}
        generated = [json.loads(line) for line in samples["samples_enigma_gen"].open()]
        assert len(generated) == 3 and all(isinstance(g["resps"][0][0], str) for g in generated)
    plain = found["plain"]["results"]
    assert 0 <= plain["enigma_mc"]["acc,none"] <= 1
    assert plain["enigma_text"]["bits_per_byte,none"] > 0
    assert 0 <= plain["enigma_gen"]["exact_match,none"] <= 1
    assert "enigma_gen" in found["chat"]["results"]
    assert "助手：" in found["chat"]["chat_template"], "the model's own template was applied"
    assert found["plain"].get("chat_template") is None


def test_a_saved_tokenizer_loads_without_asking_about_the_models_code(saved):
    """In a process that has not registered the model with transformers (a data worker, a
    benchmark's pool), as transformers would ask for any model with remote code."""
    import subprocess
    import sys

    code = ("from enigma.data.tokenizer import load_tokenizer; "
            f"t = load_tokenizer({str(saved / 'chat')!r}, quiet=True); "
            "print(t.bos_token_id, t.eos_token_id, '助手：' in t.chat_template)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "custom code" not in done.stdout + done.stderr
    assert done.stdout.split() == ["102", "102", "True"]

"""The command line, in seconds-long smoke modes: each benchmark runs and reports its baseline."""

import json

import pytest
import torch

from enigma import EnigmaConfig, EnigmaLM
from enigma.cli import main
from enigma.data import load_tokenizer


def test_bench_core_smoke(tmp_path, capsys):
    out = tmp_path / "core.json"
    argv = "bench core --d 64 --length 16 --batch 2 --rev-blocks 2 --rounds 1 --json"
    assert main([*argv.split(), str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["tokens_per_sec"]) == {
        "machine_memory_efficient",
        "machine_plain_autograd",
        "mlp_equal_flops",
    }
    assert result["reconstruction"]["fp64_involution"] < 1e-12
    assert "ratio memory-efficient / MLP" in capsys.readouterr().out


def test_bench_lm_smoke(tmp_path):
    out = tmp_path / "lm.json"
    assert (
        main(
            [
                "bench",
                "lm",
                "--preset",
                "tiny",
                "--batch",
                "1",
                "--seq-len",
                "16",
                "--rounds",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["params"]["enigma"] > result["params"]["baseline"] and result["ratio"] > 0


def test_bench_flow_smoke(tmp_path):
    out = tmp_path / "flow.json"
    assert main(["bench", "flow", "--steps", "20", "--eval-every", "10", "--json", str(out)]) == 0
    models = {row["model"]: row for row in json.loads(out.read_text())["models"]}
    assert set(models) == {"EnigmaFlow", "zuko.RealNVP"}
    assert all(row["test_bits_per_dim"] < 10 for row in models.values())


def test_model_info_and_unknown_preset(capsys):
    assert main(["model", "info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "machine" in out and "132,224" in out
    assert main(["model", "info", "--preset", "huge"]) == 2
    assert "known presets: tiny, small, base, large" in capsys.readouterr().err


def test_generate_streams_from_a_saved_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    EnigmaLM(EnigmaConfig.from_preset("tiny")).save_pretrained(tmp_path)
    load_tokenizer(quiet=True).save_pretrained(tmp_path)
    argv = ["generate", "--model", str(tmp_path), "--prompt", "曹操", "--max-new-tokens", "5"]
    assert main(argv) == 0
    assert "曹操" in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2


@pytest.mark.parametrize("argv", [["bench"], ["model"], []])
def test_incomplete_commands_exit_with_usage(argv):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2

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
    # The record's machine is the computer that measured it, not the Enigma machine's parts.
    assert result["machine"]["cpu_count"] and result["parts"] == {"rev_blocks": 2, "rotors": 2}


def test_bench_rebuild_smoke(tmp_path):
    out = tmp_path / "rebuild.json"
    argv = "bench rebuild --layers 2 --d 32 --length 16 --batch 2 --vocab 100 --json"
    assert main([*argv.split(), str(out)]) == 0
    points = {p["dtype"]: p for p in json.loads(out.read_text())["points"]}
    assert set(points) == {"float64", "float32", "bf16"}
    assert points["float64"]["rebuilt_vs_stored"]["max"] < 1e-8
    assert points["float64"]["reconstruction"] < 1e-10
    assert 0 < points["float32"]["reconstruction"] < 1e-3


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


def test_bench_copy_enwik8_and_report_smoke(tmp_path, capsys):
    results = tmp_path / "results"
    assert (
        main(["bench", "copy", "--smoke", "--delay", "5", "--json", str(results / "copy.json")])
        == 0
    )
    copy = json.loads((results / "copy.json").read_text())
    assert [m["model"] for m in copy["models"]] == ["enigma", "transformer", "lstm"]
    sizes = [m["params"] for m in copy["models"]]
    assert max(sizes) < 1.5 * min(sizes)  # models of similar size
    assert all(0 <= m["accuracy"] <= 1 and m["steps"] == 6 for m in copy["models"])
    assert copy["memoryless_baseline"]["ce_task"] == pytest.approx(10 * 2.0794415 / 25)
    assert copy["git_commit"] and copy["machine"]["cpu_count"]
    argv = "bench copy --smoke --delay 5 --variant blank --seeds 2 --models transformer,enigma-rev"
    assert main([*argv.split(), "--json", str(results / "copy-blank.json")]) == 0
    blank = {m["model"]: m for m in json.loads((results / "copy-blank.json").read_text())["models"]}
    assert [s["seed"] for s in blank["enigma-rev"]["seeds"]] == [0, 1]
    rev, plain = blank["enigma-rev"]["seeds"], blank["transformer"]["seeds"]
    paired = [a["accuracy"] - b["accuracy"] for a, b in zip(rev, plain, strict=True)]
    assert blank["enigma-rev"]["accuracy_vs_transformer"] == pytest.approx(sum(paired) / 2)

    out = results / "enwik8.json"
    argv = ["bench", "enwik8", "--smoke", "--no-download", "--seeds", "2", "--json", str(out)]
    assert main(argv) == 0
    enwik8 = {m["model"]: m for m in json.loads(out.read_text())["models"]}
    runs = [s["bpc"] for s in enwik8["enigma"]["seeds"]]
    plain = [s["bpc"] for s in enwik8["transformer"]["seeds"]]
    paired = sum(a - b for a, b in zip(runs, plain, strict=True)) / 2
    assert enwik8["enigma"]["bpc_vs_transformer"] == pytest.approx(paired)
    assert set(enwik8) == {"gzip -9", "bz2 -9", "xz -9", "enigma", "transformer"}
    assert 1 < enwik8["bz2 -9"]["bpc"] < enwik8["gzip -9"]["bpc"] < 4  # compressors are real
    assert enwik8["enigma"]["bpc"] < 8.5  # untrained: about log2(256)
    ratio = enwik8["transformer"]["params"] / enwik8["enigma"]["params"]
    assert 0.9 < ratio < 1.1  # parameter-matched

    capsys.readouterr()
    assert main(["report", str(results), "--out", str(tmp_path / "docs" / "results.md")]) == 0
    report = (tmp_path / "docs" / "results.md").read_text()
    assert "Copy memory, T = 5" in report and "memoryless baseline" in report
    assert "bz2 -9" in report and "enigma bench copy" in report.replace("`", "")
    assert "mean ± std over 2 seeds" in report and "bpc − plain Transformer" in report
    assert (tmp_path / "docs" / "results_plots" / "copy_T5.png").is_file()
    assert "blanks at the recall positions, mean ± std over 2 seeds" in report
    assert (tmp_path / "docs" / "results_plots" / "copy_blank_T5.png").is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 2


@pytest.mark.parametrize("n", [64, 100, 1000, 1037])
def test_enwik8_scores_every_byte_once(n):
    from enigma.benchmarks.enwik8 import scoring_windows

    starts, scored = scoring_windows(n, 64)
    targets = starts[:, None] + 1 + torch.arange(63)
    assert sorted(targets[scored].tolist()) == list(range(1, n))


@pytest.mark.parametrize("steps", [4, 1000, 2001])
def test_enwik8_schedule_is_one_cycle_in_steps_and_over_a_budget(steps):
    """In steps the schedule is OneCycleLR's, learning rate and Adam's beta1, to the bit (the
    seeded results were made with OneCycleLR); over a time budget it is the same curve against
    the fraction spent, so a run cut by time ends annealed."""
    from enigma.benchmarks.enwik8 import WARMUP, one_cycle

    peak = 2e-3
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=peak, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, peak, total_steps=steps, pct_start=WARMUP)
    for step in range(steps):
        group = opt.param_groups[0]
        ours = one_cycle(peak, step, steps - 1, WARMUP * steps - 1)
        assert ours == (group["lr"], group["betas"][0]), f"step {step}"
        if steps == 2001:  # the budget's curve, against fractions
            lr, beta1 = one_cycle(peak, step / (steps - 1), 1.0, WARMUP)
            assert lr == pytest.approx(group["lr"], rel=0.02, abs=peak * 2e-3)
            assert beta1 == pytest.approx(group["betas"][0], abs=2e-3)
        opt.step()
        if step < steps - 1:
            sched.step()
    assert one_cycle(peak, 0.0, 1.0, WARMUP) == pytest.approx((peak / 25, 0.95))
    assert one_cycle(peak, WARMUP, 1.0, WARMUP) == pytest.approx((peak, 0.85))
    assert one_cycle(peak, 1.0, 1.0, WARMUP) == pytest.approx((peak / 25e4, 0.95))


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


def test_train_config_round_trips_through_json():
    from enigma.train.config import TrainConfig, build_config

    cfg = build_config("small", sets=["num_rotors=0", "betas=[0.8, 0.9]", "conv1x1_positions=8"])
    assert cfg.model == {"num_rotors": 0, "rotor_positions": 8} and cfg.betas == (0.8, 0.9)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.betas, tuple)
    changed = cfg.replace(workers=3)
    assert changed.workers == 3 and cfg.workers == 2 and changed.model is not cfg.model


@pytest.mark.parametrize("reversible_backward", [False, True])
def test_auto_compiles_the_machine_only_where_it_traces_into_one_graph(reversible_backward):
    """``compile_machine=auto``: on CUDA below ZeRO-3, and only when the machine backpropagates
    by plain autograd; the reversible backward's rebuild breaks the graph (checked here)."""
    from enigma.train.config import build_config, compiles_machine

    sets = [f"reversible_backward={str(reversible_backward).lower()}"]
    cfg = build_config("tiny", sets=sets)
    machine = EnigmaLM(EnigmaConfig.from_preset("tiny", **cfg.model)).machine
    assert machine.memory_efficient == reversible_backward
    torch._dynamo.reset()
    x = torch.randn(2, 8, machine.d, requires_grad=True)
    one_graph = torch._dynamo.explain(machine)(x).graph_break_count == 0
    rebuilds = machine.memory_efficient
    assert compiles_machine(cfg, True, 2, rebuilds) == one_graph == (not reversible_backward)
    assert not compiles_machine(cfg, True, 3, rebuilds)  # ZeRO-3's parameter hooks
    assert not compiles_machine(cfg, False, 2, False)  # nothing to gain on a CPU
    assert compiles_machine(cfg.replace(compile_machine="on"), False, 3, rebuilds)
    assert not compiles_machine(cfg.replace(compile_machine="off"), True, 0, False)


def test_report_check_fails_when_a_table_differs_from_its_json(tmp_path, capsys):
    import shutil

    results = tmp_path / "results"
    shutil.copytree("docs/results", results)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:begin (enigma report) -->\n<!-- results:end -->\nend\n")
    argv = ["report", str(results), "--out", str(tmp_path / "results.md"), "--readme", str(readme)]
    assert main(argv) == 0
    assert "Copy memory" in readme.read_text() and readme.read_text().endswith("end\n")
    assert main([*argv, "--check"]) == 0
    record = json.loads((results / "train-overhead.json").read_text())
    record["ratio"] = 0.5  # a figure changes, the committed tables do not
    (results / "train-overhead.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main([*argv, "--check"]) == 2
    assert "differ from docs/results" in capsys.readouterr().err

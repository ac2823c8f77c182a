"""Ray Train + DeepSpeed end to end, scaled down: ZeRO stages, data parallelism, exact resume,
a killed worker, TensorBoard scalars, the exported model, and bad input before any worker."""

import json
import math

import pytest
import torch
from conftest import SMALL_RUN
from pyarrow.fs import LocalFileSystem

from enigma.cli import main
from enigma.train.config import build_config

STEPS = 20
pytestmark = pytest.mark.usefixtures("ray_cluster")


def run(data, out, *sets, ds="ds_configs/zero2.json", workers=2, resume=None, fail_at=None):
    from enigma.train.driver import train
    from enigma.train.plan import Faults

    cfg = build_config(
        "tiny",
        sets=[*SMALL_RUN, "eval_steps=5", "log_steps=1", "lr=2e-3", *sets],
        data=str(data),
        ds_config=ds,
        workers=workers,
        output_dir=str(out),
    )
    faults = Faults(kill_at_steps=(fail_at,)) if fail_at else None
    return train(cfg, resume=resume, faults=faults)


def events(out):
    """The run's TensorBoard events: OUTPUT/tensorboard/RUN_NAME (the output directory's name)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard" / out.name))
    acc.Reload()
    return acc


def scalars(out, tag="train/loss") -> dict[int, float]:
    return {e.step: e.value for e in events(out).Scalars(tag)}


def test_zero2_run_logs_exports_and_generates(data, tmp_path, capsys):
    """One run, read as a user would: TensorBoard's sections, Custom Scalars and HPARAMS; the
    model card; the export loaded without the project; `enigma export` of a checkpoint."""
    from conftest import load_without_project
    from tensorboard.plugins.custom_scalar import layout_pb2

    from enigma import EnigmaLM
    from enigma.train.progress import TAG_PREFIXES

    out = tmp_path / "zero2-demo"
    summary = run(data, out, f"max_steps={STEPS}")
    printed = capsys.readouterr().out
    assert "activation checkpointing: off (auto: a micro-batch's activations take" in printed
    assert summary["last_val_ppl"] < summary["first_val_ppl"]
    acc = events(out)
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "perf/tokens_per_sec", "memory/worker_mb"} <= tags
    assert all(t.startswith(TAG_PREFIXES) for t in tags), tags
    layout = layout_pb2.Layout.FromString(
        acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    )
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["loss"] == ["train/loss", "val/loss"]
    hparams = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert b"num_rotors" in hparams["_hparams_/session_start_info"]
    assert scalars(out, "val/best_ppl")[STEPS] == pytest.approx(summary["best_val_ppl"], rel=1e-4)
    # bf16 coupling nets: the bf16 bound of the brief (measured about 2e-5)
    assert max(scalars(out, "machine/reconstruction_error").values()) < 1e-2

    model_dir = out / "model"
    card = (model_dir / "README.md").read_text()
    assert f"{summary['best_val_ppl']:.2f}" in card and "trust_remote_code=True" in card
    assert "runs those Python files" in card
    model = EnigmaLM.from_pretrained(model_dir).eval()
    ids = [[101, 3293, 3082]]
    ours = model.generate(torch.tensor(ids), max_new_tokens=5, do_sample=False).tolist()
    assert len(ours[0]) == 8 and summary["sample"]
    (loaded,) = load_without_project([model_dir], ids, 5, tmp_path)
    assert loaded["ids"] == ours and loaded["class"].startswith("transformers_modules")

    # A kept checkpoint re-exported: DeepSpeed's shards consolidated, the same card.
    assert main(["export", str(out), str(tmp_path / "step15"), "--step", "15"]) == 0
    again = EnigmaLM.from_pretrained(tmp_path / "step15")
    assert "step 15" in (tmp_path / "step15" / "README.md").read_text()
    assert {"lm.py", "tokenizer.json"} <= {p.name for p in (tmp_path / "step15").iterdir()}
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())


def test_zero3_with_reversible_layers_survives_a_killed_worker_and_exports_real_weights(
    data, tmp_path
):
    """ZeRO-3 (the chain a leaf, gathered whole) with reversible layers, whose rebuilding
    backward runs in the run's precision: a worker killed at step 6 resumes from step 4, and the
    exported model, consolidated from the partitions, holds trained weights."""
    from enigma import EnigmaLM

    summary = run(data, tmp_path, "max_steps=8", "eval_steps=4", "reversible_layers=true",
                  ds="ds_configs/zero3.json", fail_at=6)  # fmt: skip
    assert (tmp_path / ".fault-injected-6").read_text() == "6"
    assert summary["steps"] == 8 and math.isfinite(summary["last_val_ppl"])
    logged = sorted(scalars(tmp_path, "val/loss"))
    assert logged == [4, 8], "evaluations after the restart continue from step 4's state"
    exported = EnigmaLM.from_pretrained(tmp_path / "model")
    assert exported.config.reversible_layers and exported.stack is not None
    torch.manual_seed(0)  # the workers' init seed: trained weights must differ from it
    initial = EnigmaLM(exported.config)
    for (name, a), b in zip(exported.named_parameters(), initial.parameters(), strict=True):
        assert a.shape == b.shape and a.numel() > 0, name
    moved = (exported.blocks[0].mlp[0].weight - initial.blocks[0].mlp[0].weight).abs().max()
    assert moved > 1e-3, "ZeRO-3 export holds trained weights, not placeholders"


def test_one_and_two_workers_give_the_same_curve_and_compiled_layers_train(
    data, tmp_path, fp32_zero2
):
    """One worker under ZeRO-1 accumulating two micro-batches, two under ZeRO-2 with one each
    and their Transformer blocks, head and loss compiled (torch.compile, inductor): the same
    data per step, so the same curve."""
    from enigma.benchmarks.train_overhead import fp32_ds_config

    steps = 10  # enough for the loss to fall well past the two runs' differences
    sets = (f"max_steps={steps}", "micro_batch=8", "shuffle_buffer=0", "eval_steps=10")
    one = run(data, tmp_path / "one", *sets, "grad_accum=2",
              ds=fp32_ds_config(tmp_path, "zero1.json"), workers=1)  # fmt: skip
    two = run(data, tmp_path / "two", *sets, "grad_accum=1", "compile_layers=on", ds=fp32_zero2,
              workers=2)  # fmt: skip
    a, b = scalars(tmp_path / "one"), scalars(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    gaps = [abs(a[s] - b[s]) / a[s] for s in a]
    assert max(gaps) < 0.03, gaps
    assert a[steps] < a[1] - 1.0 and one["steps"] == two["steps"] == steps


def test_resume_is_exact(data, tmp_path, fp32_zero2, fp32_baseline_run):
    """--resume from the step-10 checkpoint of a 20-step run: steps 11-20 equal that run's own.
    (Reversible layers rebuilt under ZeRO-3 through Ray: the killed-worker run above; against
    stored activations under ZeRO-1 and ZeRO-3: tests/test_rev_layers.py.)"""
    baseline_dir, baseline = fp32_baseline_run
    checkpoint = baseline_dir / "ray" / "train" / "step-0000010"
    assert checkpoint.is_dir(), sorted((baseline_dir / "ray" / "train").iterdir())
    common = ("max_steps=20", "shuffle_buffer=0", "eval_steps=100", "save_steps=100")
    run(data, tmp_path / "rest", *common, ds=fp32_zero2, workers=1, resume=str(checkpoint))
    rest = scalars(tmp_path / "rest")
    assert min(rest) == 11 and max(rest) == STEPS
    for step in range(11, STEPS + 1):
        assert abs(baseline[step] - rest[step]) < 1e-4, (step, baseline[step], rest[step])


def test_a_generation_that_took_a_lapsed_lease_over_never_reads_what_the_old_one_wrote_after(
    tmp_path, fp32_baseline_run, capsys
):
    """Generation 2 took the run over (written at once, trusting generation 1 as far as it was
    listed) and resumed from step 10; the old holder, which lived on, had step 20 in its own run
    (ray/train) by then, or wrote it after. Resuming and exporting trust generation 1
    up to step 10 only, and all of generation 2 (ray/train-g2), by the fence alone; the next
    takeover cuts generation 2 where it resumes."""
    import shutil

    from enigma.storage import fence as fences
    from enigma.storage.store import Storage
    from enigma.train import export, resume

    baseline_dir, _ = fp32_baseline_run
    shutil.copytree(baseline_dir / "ray" / "train", tmp_path / "ray" / "train")
    storage = Storage(str(tmp_path))
    current = resume.read_state(str(tmp_path / "ray/train/step-0000010")).fingerprint
    assert resume.choose_resume(storage, None, current).path.endswith("train/step-0000020")
    assert fences.read(storage) == (fences.Fence(), None)
    # taken over: generation 2 is written at once, trusting generation 1 as far as listed...
    assert fences.advance(storage) == fences.Fence(2, {1: 20}) == fences.read(storage)[0]
    # ... then no further than where it resumed, which here (say) was step 10
    assert fences.settle(storage, 10) == fences.Fence(2, {1: 10}) == fences.read(storage)[0]
    chosen = resume.choose_resume(storage, None, current)
    assert chosen.path.endswith("ray/train/step-0000010"), "step 20 is the old holder's"
    assert sorted(export.checkpoints(tmp_path)) == [10]
    shutil.copytree(tmp_path / "ray/train/step-0000010", tmp_path / "ray/train-g2/step-0000015")
    chosen = resume.choose_resume(storage, None, current)
    assert chosen.path.endswith("ray/train-g2/step-0000015")
    assert sorted(export.checkpoints(tmp_path)) == [10, 15]
    assert fences.read(storage)[0].successor(15) == fences.Fence(3, {1: 10, 2: 15})
    with pytest.raises(fences.Fenced, match="generation 2 of .* took the run over from this one"):
        fences.check(storage, 1)
    fences.check(storage, 2)


def test_a_kill_inside_the_set_aside_of_a_damaged_checkpoint_leaves_a_run_that_resumes(
    data, tmp_path, fp32_zero2, fp32_baseline_run, capsys, monkeypatch
):
    """Setting a damaged checkpoint aside takes it out of Ray Train's record (rewritten whole),
    then moves it. Killed between the two, the next start judges it again and chooses the one
    before (a real SIGKILL there, and the run that resumes after it: the faults smoke test); a
    record left naming a checkpoint that is gone (the other order, killed between, or a
    directory deleted by hand) is mended instead of failing Ray's restore, which a run shows."""
    import shutil

    from enigma.cluster.ray_internals import recorded_checkpoints
    from enigma.storage.store import Storage
    from enigma.train import resume

    baseline_dir, _ = fp32_baseline_run
    common = ("max_steps=11", "shuffle_buffer=0", "eval_steps=100", "save_steps=100")
    for case in ("killed between", "record names a gone checkpoint"):
        out = tmp_path / case.replace(" ", "-")
        shutil.copytree(baseline_dir / "ray", out / "ray")
        shutil.copytree(baseline_dir / "model", out / "model")
        steps = out / "ray" / "train"
        (steps / "step-0000020" / "trainer_state.json").write_text("{")  # damaged
        if case == "killed between":
            storage = Storage.of("", str(out))

            def killed(*args):
                raise SystemExit("killed between forgetting and moving")

            with monkeypatch.context() as m:
                m.setattr(Storage, "move_dir", killed)
                with pytest.raises(SystemExit):
                    resume.choose_resume(storage, None, {})
            assert "step-0000020" not in recorded_checkpoints(LocalFileSystem(), str(steps))
            assert (steps / "step-0000020").is_dir(), "killed before the move"
            current = resume.read_state(str(steps / "step-0000010")).fingerprint
            chosen = resume.choose_resume(storage, None, current)
            assert chosen.path.endswith("step-0000010") and chosen.state.step == 10
            assert (steps / "damaged-step-0000020").is_dir(), "set aside this time"
            assert not (steps / "step-0000020").exists()
            continue
        (steps / "step-0000020").rename(steps / "moved-by-hand")
        capsys.readouterr()
        summary = run(data, out, *common, ds=fp32_zero2, workers=1)
        said = capsys.readouterr().out
        assert "step-0000010 (step 10)" in said and summary["steps"] == 11, said[-2000:]
        assert "named step-0000020, which are gone; taken out of it" in said


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "huge"], "known presets"),
        (["--data", "/no/such/dir"], "does not exist"),
        (["--set", "seq_len=32"], "seq_len=64 but training expects seq_len=32"),
        (["--ds-config", "ds_configs/zero2_fp16.json", "--gpus-per-worker", "0"], "use bf16"),
        (["--ds-config", "BAD_KEY"], "unknown key 'zero_optimisation'"),
        (["--ds-config", "BAD_JSON"], "not valid JSON"),
        (["--set", "learning_rate=1"], "unknown config key 'learning_rate'"),
        (["--ds-config", "SCHEDULER"], "a scheduler section would be overwritten at every step"),
        (["--ds-config", "AC_TYPO"], "unknown activation_checkpointing key 'partition_activation'"),
        (["--ds-config", "AC_TYPE"], "activation_checkpointing.number_checkpoints='4': expected"),
        (["--ds-config", "AUTO_LEFT"], 'zero_optimization.sub_group_size is "auto"'),
        (["--set", "precision=fp8"], "precision='fp8': expected auto, bf16, fp16, fp32"),
    ],
)
def test_bad_input_fails_in_one_line_before_workers(data, tmp_path, capsys, argv, message):
    shipped = json.loads(open("ds_configs/zero2.json").read())
    files = {
        "BAD_KEY": {"zero_optimisation": {"stage": 2}},
        "BAD_JSON": "{not json",
        "SCHEDULER": {**shipped, "scheduler": {"type": "WarmupLR", "params": {}}},
        "AC_TYPO": {**shipped, "activation_checkpointing": {"partition_activation": True}},
        "AC_TYPE": {**shipped, "activation_checkpointing": {"number_checkpoints": "4"}},
        "AUTO_LEFT": {**shipped, "zero_optimization": {"stage": 2, "sub_group_size": "auto"}},
    }
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (tmp_path / f"{name}.json").write_text(text)
    argv = [str(tmp_path / f"{a}.json") if a in files else a for a in argv]
    base = ["train", "--data", str(data), "--output-dir", str(tmp_path / "out"), "--set",
            "seq_len=64"]  # fmt: skip
    if "--preset" not in argv:
        base += ["--preset", "tiny"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "ray").exists(), "no worker started"

"""A model named by a storage URI: `generate`, `eval`, `model info` and fine-tuning read it from
moto's S3 server through one mirror per node, keyed by the checksums the export recorded, fetched
once however many processes ask at once, and checked before use."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, moto_server

from enigma.cli import main
from enigma.errors import InputError
from enigma.models.lm import EnigmaLM
from enigma.models.lm_config import EnigmaConfig
from enigma.storage.atomic import CHECKSUMS, file_sha256
from enigma.storage.mirror import local_model
from enigma.storage.store import Storage
from enigma.train.export import write_model_dir


@pytest.fixture(scope="module")
def bucket():
    with moto_server(endpoint_in_env=False) as client:
        yield client


def uri(bucket, prefix: str) -> str:
    endpoint = bucket.meta.endpoint_url.removeprefix("http://")
    return f"s3://runs/{prefix}?scheme=http&endpoint_override={endpoint}"


def exported(tmp_path, seed: int, **shape):
    torch.manual_seed(seed)
    shape = shape or {"d": 32, "num_heads": 2, "max_len": 64}
    model = EnigmaLM(EnigmaConfig.from_preset("tiny", **shape))
    out = tmp_path / f"model-{seed}"
    write_model_dir(model, out, None)
    return out


def put(bucket, local, prefix: str) -> str:
    """``local`` at ``runs/PREFIX/model`` as an export to storage puts it; its URI."""
    target = uri(bucket, prefix)
    base, _, query = target.partition("?")
    Storage(base, query).replace_model(local, "model")
    return uri(bucket, f"{prefix}/model")


def test_an_export_records_what_the_mirror_checks(tmp_path):
    out = exported(tmp_path, 0)
    sums = json.loads((out / CHECKSUMS).read_text())
    files = {f.name for f in out.iterdir()} - {CHECKSUMS}
    assert set(sums) == files and "model.safetensors" in files
    weights = sums["model.safetensors"]
    assert weights["sha256"] == file_sha256(out / "model.safetensors")
    assert weights["size"] == (out / "model.safetensors").stat().st_size


def test_two_processes_at_once_fetch_a_model_once(bucket, tmp_path):
    model = put(bucket, exported(tmp_path, 1, max_len=64), "once")  # 11 MB: the fetches overlap
    env = {**os.environ, "ENIGMA_CACHE": str(tmp_path / "cache")}
    code = (
        "import sys; from enigma.storage.mirror import local_model; print(local_model(sys.argv[1]))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, model], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1, paths
    fetched = [err for _, err in outs if "fetched into" in err]
    assert len(fetched) == 1, outs
    (mirror,) = paths
    sums = json.loads((tmp_path / "model-1" / CHECKSUMS).read_text())
    for name, recorded in sums.items():
        assert file_sha256(os.path.join(mirror, name)) == recorded["sha256"]
    leftovers = [p.name for p in (tmp_path / "cache" / "models").iterdir() if "partial" in p.name]
    assert not leftovers


def test_a_model_uri_generates_evaluates_and_reports_as_the_local_copy(
    bucket, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("ENIGMA_CACHE", str(tmp_path / "cache"))
    local = exported(tmp_path, 2)
    model = put(bucket, local, "run")
    argv = ["generate", "--prompt", "话说天下", "--max-new-tokens", "6", "--temperature", "0"]
    assert main([*argv, "--model", str(local)]) == 0
    here = capsys.readouterr().out
    assert main([*argv, "--model", model]) == 0
    there = capsys.readouterr()
    assert there.out == here and "fetched into" in there.err
    # The run's directory names its model too, as for a local `enigma train` output directory.
    assert main(["model", "info", "--model", uri(bucket, "run")]) == 0
    assert "EnigmaLM d=32 " in capsys.readouterr().out
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": "话说天下大势，分久必合，合久必分。" * 4})
                              for _ in range(8)))  # fmt: skip
    ppl = ["--perplexity", str(text), "--lengths", "1,2", "--length", "16", "--max-tokens", "64"]
    results = {}
    for name, m in (("local", str(local)), ("remote", model)):
        assert main(["eval", m, *ppl, "--json", str(tmp_path / f"{name}.json")]) == 0
        (results[name],) = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["remote"]["model"] == model, "results name the model as given"
    assert results["remote"]["lengths"] == results["local"]["lengths"]


def test_a_changed_or_damaged_model_is_fetched_again_or_refused(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("ENIGMA_CACHE", str(tmp_path / "cache"))
    model = put(bucket, exported(tmp_path, 3), "changing")
    first = local_model(model)
    assert local_model(model) == first, "the same content: the same copy, no fetch"
    model = put(bucket, exported(tmp_path, 4), "changing")  # a new export at the same URI
    second = local_model(model)
    assert second != first and os.path.isdir(first)
    # Weights replaced behind the export's back: the copy does not match what it recorded.
    bucket.put_object(Bucket="runs", Key="changing/model/model.safetensors", Body=b"x" * 64)
    with pytest.raises(InputError, match=r"changed or is damaged \(model.safetensors"):
        local_model(model)
    with pytest.raises(InputError, match="holds no saved model"):
        local_model(uri(bucket, "nothing-here"))


def test_a_serving_engine_loads_a_model_uri_on_its_node(bucket, tmp_path, monkeypatch):
    """What a replica starts (its engine process) from the URI `serve` and `build_app` pass on:
    the same greedy tokens as from the local export."""
    import asyncio

    from enigma.serve.engine_process import Choice, EngineProcess
    from enigma.serve.sampling import Sampling

    monkeypatch.setenv("ENIGMA_CACHE", str(tmp_path / "cache"))  # the engine's environment
    local = exported(tmp_path, 5)
    model = put(bucket, local, "served")
    tokens = {}
    for name, where in (("local", str(local)), ("remote", model)):
        engine = EngineProcess(where, max_rows=1)
        choice = Choice(name, 0, [2769, 4638, 1962], Sampling(max_tokens=5, temperature=0), False)

        async def complete(engine, choice):
            box = engine.submit([choice], stream=False)
            return [out async for batch in engine.outputs(box) for out in batch]

        try:
            tokens[name] = [t for out in asyncio.run(complete(engine, choice)) for t in out.tokens]
        finally:
            engine.stop()
    assert len(tokens["local"]) == 5 and tokens["remote"] == tokens["local"]
    assert any((tmp_path / "cache" / "models").iterdir()), "mirrored into the engine's cache"


def test_fine_tuning_keeps_the_uri_for_its_workers_and_reads_the_shape_through_the_mirror(
    bucket, tmp_path, monkeypatch
):
    """The driver checks the base model through its own mirror; the run records the URI, which
    each worker's node mirrors in turn (a local cache path would name nothing on another node)."""
    from enigma.train.config import base_model_fields
    from enigma.train.finetune import base_model

    monkeypatch.setenv("ENIGMA_CACHE", str(tmp_path / "cache"))
    put(bucket, exported(tmp_path, 6), "base")
    run = uri(bucket, "base")  # an `enigma train` output directory, its model/ inside
    assert base_model(run) == run
    assert base_model_fields(run)["d"] == 32
    with pytest.raises(InputError, match="holds no saved model"):
        base_model(uri(bucket, "no-such-run"))


def test_reading_writes_nothing_and_reads_an_export_swapped_halfway(bucket, tmp_path, monkeypatch):
    """An export into a bucket swaps in steps; a reader meanwhile (or after a kill) reads the
    whole model there is, and never writes: model/ while it carries its marker, else the whole
    copy beside it. Files beside an export that its checksums do not name are refused."""
    monkeypatch.setenv("ENIGMA_CACHE", str(tmp_path / "cache"))
    old, new = exported(tmp_path, 7), exported(tmp_path, 8)
    base, _, query = uri(bucket, "swapping").partition("?")
    store = Storage(base, query)
    store.replace_model(old, "model")
    model = uri(bucket, "swapping/model")

    def objects() -> dict:
        listed = bucket.list_objects_v2(Bucket="runs", Prefix="swapping/").get("Contents", [])
        return {o["Key"]: o["ETag"] for o in listed}

    def weights(directory) -> str:
        return file_sha256(os.path.join(directory, "model.safetensors"))

    for stop_after, expected in (("upload", old), ("empty", new)):
        store.replace_model(new, "model", stop_after=stop_after)
        before = objects()
        assert weights(local_model(model)) == weights(expected), stop_after
        assert objects() == before, f"a reader wrote to the bucket ({stop_after})"
    store.replace_model(new, "model")  # the next export completes it
    assert weights(local_model(model)) == weights(new)
    bucket.put_object(Bucket="runs", Key="swapping/model/extra.bin", Body=b"\0" * 8)
    with pytest.raises(InputError, match="does not hold the files its checksums.json records"):
        local_model(model)
    bucket.put_object(Bucket="runs", Key="swapping/model/sub/weights.bin", Body=b"\0" * 8)
    with pytest.raises(InputError, match=r"holds subdirectories \(sub\)"):
        local_model(model)

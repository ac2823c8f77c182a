"""Shared storage: a run writes its checkpoints, TensorBoard events and model to an S3 bucket
(moto's S3 server on loopback, named as MinIO users name theirs: ``s3://bucket/prefix?scheme=http
&endpoint_override=HOST:PORT``, the AWS_* variables holding only the credentials) and resumes
from it on a machine that has never seen the run; every object stays under the run's prefix."""

import shutil

import pytest
from conftest import UNINTERRUPTED, moto_server, own_ray_cluster

from enigma.cli import main
from enigma.train.config import build_config


@pytest.fixture(scope="module")
def bucket():
    """moto's S3 server with a bucket ``runs``; the AWS_* variables point at it before the
    module's Ray cluster starts, so its workers inherit them as a cluster's nodes would."""
    import ray

    from enigma.cluster.ray_setup import init_ray

    own_ray_cluster()  # an earlier module's, started without these variables
    with moto_server(endpoint_in_env=False) as client:
        init_ray(num_cpus=2)
        yield client
        ray.shutdown()


def uri(bucket, prefix: str) -> str:
    """``s3://runs/PREFIX`` with the server in the query, as the README tells MinIO users."""
    endpoint = bucket.meta.endpoint_url.removeprefix("http://")
    return f"s3://runs/{prefix}?scheme=http&endpoint_override={endpoint}"


def run(data, out, ds, *sets, storage=None):
    from enigma.train.driver import train

    sets = [*UNINTERRUPTED, *sets]
    cfg = build_config("tiny", sets=sets, data=str(data), ds_config=ds, workers=1,
                       output_dir=str(out), storage_path=storage)  # fmt: skip
    return train(cfg)


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_resume_from_the_bucket_on_a_machine_that_never_saw_the_run(
    bucket, data, tmp_path, fp32_zero2, fp32_baseline, capsys
):
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from enigma.storage.store import Storage

    # The data too is read from the bucket, by the workers' Ray Data tasks (each shard's checksum
    # checked there), its tokenizer mirrored for the export: the same curve as from the disk.
    Storage.of(uri(bucket, "data"), "").upload(Path(data))
    data = uri(bucket, "data")
    first = tmp_path / "machine-a"
    storage, query = uri(bucket, "run"), uri(bucket, "run").split("?", 1)[1]
    run(data, first, fp32_zero2, "stop_at_step=10", storage=storage)
    assert keys(bucket, "run/ray/train/step-0000010/")
    shutil.rmtree(first)  # the first machine is gone
    capsys.readouterr()
    rest = run(data, tmp_path / "machine-b", fp32_zero2, storage=storage)
    resumed = f"resuming from s3://runs/run/ray/train/step-0000010?{query} (step 10)"
    assert resumed in capsys.readouterr().out
    assert rest["steps"] == 20 and rest["sample"]
    assert rest["model_dir"] == f"s3://runs/run/model?{query}"
    outside = [k for k in keys(bucket, "") if not k.startswith(("run/", "data/"))]
    assert not outside, f"every object under the run's prefix: {outside[:5]}"
    assert not keys(bucket, "run/.lock"), "the lock released, at its own key"
    model_files = {k.rsplit("/", 1)[-1] for k in keys(bucket, "run/model/")}
    assert {"config.json", "model.safetensors", "tokenizer.json", "checksums.json"} <= model_files
    events = tmp_path / "events"
    events.mkdir()
    for key in [k for k in keys(bucket, "run/tensorboard/") if not k.endswith("/")]:
        bucket.download_file("runs", key, str(events / key.rsplit("/", 1)[-1]))
    acc = EventAccumulator(str(events))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(logged) == list(range(1, 21)), "both machines' events, in the bucket"
    for step in range(11, 21):
        assert abs(logged[step] - fp32_baseline[step]) < 1e-4, (step, logged[step])


def test_storage_that_cannot_be_written_stops_in_one_line(bucket, data, tmp_path, capsys):
    missing = uri(bucket, "run").replace("s3://runs/", "s3://no-such-bucket/")
    argv = ["train", "--preset", "tiny", "--data", str(data), "--set", "seq_len=64"]
    argv += ["--output-dir", str(tmp_path), "--storage-path", missing]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "s3://no-such-bucket/run?scheme=http" in err
    assert "is not writable" in err


@pytest.mark.parametrize(
    "uri",
    ["s3://AKIAEXAMPLE:wJalrSECRETKEY@runs/run", "s3://runs/run?secret_key=wJalrSECRETKEY"],
)
def test_credentials_in_the_uri_are_refused_without_repeating_them(data, tmp_path, capsys, uri):
    argv = ["train", "--preset", "tiny", "--data", str(data), "--set", "seq_len=64",
            "--output-dir", str(tmp_path), "--storage-path", uri]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "carries credentials" in err
    assert "AWS_SECRET_ACCESS_KEY" in err and "SECRETKEY" not in err and "AKIA" not in err
    assert not list(tmp_path.iterdir()), "nothing written"


def test_anonymous_gcs_access_is_not_a_secret():
    from enigma.storage.store import check_storage_path

    check_storage_path("gs://anonymous@public-bucket/run")  # pyarrow's anonymous access
    with pytest.raises(Exception, match="carries credentials"):
        check_storage_path("gs://someone:secret@bucket/run")


def test_sub_paths_go_before_the_query():
    from enigma.storage.store import Storage

    storage = Storage.of("s3://runs/run?scheme=http&endpoint_override=127.0.0.1:9000", "out")
    assert storage.uri("ray", "train") == (
        "s3://runs/run/ray/train?scheme=http&endpoint_override=127.0.0.1:9000"
    )
    fs, path = storage.filesystem("ray", "train")
    assert path == "runs/run/ray/train" and type(fs).__name__ == "S3FileSystem"


def test_an_error_in_the_file_system_layer_keeps_its_traceback(monkeypatch):
    """Only what the project raises on purpose is one line: a bug below stays a bug."""
    import pyarrow.fs as pafs

    from enigma.storage.store import Storage

    class Broken:
        @staticmethod
        def from_uri(uri):
            raise KeyError("a bug in the storage layer")

    monkeypatch.setattr(pafs, "FileSystem", Broken)
    with pytest.raises(KeyError, match="a bug in the storage layer"):
        Storage.of("s3://runs/run", "out").filesystem()


@pytest.mark.parametrize("killed_after", ["upload", "unmark", "empty", "copy-one", "copy"])
def test_a_kill_inside_the_model_swap_on_s3_leaves_a_model_that_loads(
    bucket, tmp_path, killed_after
):
    """The new model is uploaded beside the old one, then copied in over it: killed after any
    step, a reader (which completes an interrupted swap) loads a whole model, the old or the
    new, with no file of the old one left beside the new, and the next export goes through."""
    import torch

    from enigma import EnigmaConfig, EnigmaLM
    from enigma.inference.generate import load_model
    from enigma.storage.store import Storage

    storage = Storage.of(uri(bucket, f"swap-{killed_after}"), str(tmp_path))
    made = {}
    for version in ("old", "new"):
        torch.manual_seed(len(version))
        made[version] = EnigmaLM(EnigmaConfig.from_preset("tiny", d=32, num_heads=2))
        made[version].save_pretrained(tmp_path / version)
    (tmp_path / "old" / "only-the-old-model-has-it.bin").write_bytes(b"stale")
    storage.replace_model(tmp_path / "old", "model")
    storage.replace_model(tmp_path / "new", "model", stop_after=killed_after)
    assert storage.download(tmp_path / "read", "model")
    loaded = load_model(str(tmp_path / "read"))
    weights = loaded.embed.weight
    assert any(torch.equal(weights, m.embed.weight) for m in made.values()), "a whole model"
    if killed_after != "upload":  # the old model was emptied: the reader finished the swap
        assert torch.equal(weights, made["new"].embed.weight)
        held = {
            k.rsplit("/", 1)[1] for k in keys(bucket, f"swap-{killed_after}/model/") if k[-1] != "/"
        }
        assert held == {f.name for f in (tmp_path / "new").iterdir()}, "none of the old's files"
    prefix = f"swap-{killed_after}/"
    assert not keys(bucket, f"{prefix}.model.next/"), "the copy beside is gone once read"
    storage.replace_model(tmp_path / "new", "model")
    objects = [k.removeprefix(prefix) for k in keys(bucket, prefix) if not k.endswith("/")]
    assert sorted(objects) == sorted(f"model/{f.name}" for f in (tmp_path / "new").iterdir())


def test_a_kill_inside_the_adapter_swap_on_s3_is_completed(bucket, tmp_path):
    """A PEFT adapter says it is whole by its adapter_config.json (it has no config.json):
    killed once the old adapter was emptied, the copy beside is put in, not thrown away."""
    from enigma.storage.store import Storage

    storage = Storage.of(uri(bucket, "swap-adapter"), str(tmp_path))
    for version in ("old", "new"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "adapter_config.json").write_text(f'{{"v": "{version}"}}')
        (tmp_path / version / "adapter_model.safetensors").write_bytes(version.encode() * 100)
    storage.replace_model(tmp_path / "old", "adapter")
    storage.replace_model(tmp_path / "new", "adapter", stop_after="empty")
    assert storage.recover_model("adapter")
    assert storage.download(tmp_path / "read", "adapter")
    assert (tmp_path / "read" / "adapter_config.json").read_text() == '{"v": "new"}'
    assert (tmp_path / "read" / "adapter_model.safetensors").read_bytes() == b"new" * 100
    assert not keys(bucket, "swap-adapter/.adapter.next/")


def test_data_prepared_into_the_bucket_reads_as_from_the_disk(bucket, tmp_path, capsys):
    """`data prepare --out s3://…`: each task writes its shards there, the same blocks as
    prepared on the disk; up to date a second time; rebuilt with --force for another recipe,
    the old shards gone; a shard changed in the bucket is caught by whatever reads it."""
    from enigma.data.shards import read_blocks, read_manifest
    from enigma.data.sources import DataError

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"第{i}回 话说天下大势，分久必合，合久必分。\n" for i in range(300)))
    argv = ["data", "prepare", "--source", f"text:{corpus}", "--shard-blocks", "64", "--out"]
    there, here = uri(bucket, "prepared"), str(tmp_path / "here")
    assert main([*argv, there, "--seq-len", "16"]) == 0
    assert f"wrote {there}" in capsys.readouterr().out
    assert not keys(bucket, "prepared/.prepare/"), "the units' records go once the manifest is in"
    assert main([*argv, here, "--seq-len", "16"]) == 0
    for split in ("train", "val", "test"):
        assert (read_blocks(there, split) == read_blocks(here, split)).all()
    shards = [s["file"] for s in read_manifest(there)["splits"]["train"]["shards"]]
    assert len(shards) > 1 and not keys(bucket, "prepared/.lock")
    capsys.readouterr()
    assert main(["data", "stats", there]) == 0 and main(["data", "stats", here]) == 0
    stats_there, stats_here = capsys.readouterr().out.split(f"{here}:")
    assert stats_there.removeprefix(f"{there}:") == stats_here, "the same counts and tokens"
    assert main([*argv, there, "--seq-len", "16"]) == 0
    assert "is up to date" in capsys.readouterr().out
    assert main([*argv, there, "--seq-len", "32"]) == 2
    assert "another recipe" in capsys.readouterr().err
    assert main([*argv, there, "--seq-len", "32", "--force"]) == 0
    manifest = read_manifest(there)
    listed = {s["file"] for split in manifest["splits"].values() for s in split["shards"]}
    stored = {k.removeprefix("prepared/") for k in keys(bucket, "prepared/")}
    assert {k for k in stored if k.endswith(".parquet")} == listed, "the old shards are gone"
    assert "manifest.json" in stored and "tokenizer/tokenizer.json" in stored
    first = manifest["splits"]["test"]["shards"][0]
    body = bucket.get_object(Bucket="runs", Key=f"prepared/{first['file']}")["Body"].read()
    changed = bytearray(body)
    changed[len(changed) // 2] ^= 0xFF
    bucket.put_object(Bucket="runs", Key=f"prepared/{first['file']}", Body=bytes(changed))
    with pytest.raises(DataError, match="corrupt"):
        read_blocks(there, "test")
    # A prefix holding anything else is not replaced unless asked.
    bucket.put_object(Bucket="runs", Key="elsewhere/notes.txt", Body=b"mine")
    assert main([*argv, uri(bucket, "elsewhere"), "--seq-len", "16"]) == 2
    assert "holds files a prepare did not write (notes.txt)" in capsys.readouterr().err
    assert keys(bucket, "elsewhere/") == ["elsewhere/notes.txt"]

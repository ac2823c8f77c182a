"""GPUs counted before anything waits, on a local cluster that advertises 2 logical GPUs (this
machine has none: nothing here starts a worker on them)."""

import pytest
from conftest import SMALL_RUN, own_ray_cluster

from enigma.cli import main
from enigma.train.config import build_config


@pytest.fixture(scope="module")
def two_gpu_cluster():
    import ray

    from enigma.cluster.ray_setup import init_ray

    own_ray_cluster()
    init_ray(num_cpus=4, num_gpus=2)
    yield
    ray.shutdown()


pytestmark = pytest.mark.usefixtures("two_gpu_cluster")


def test_more_gpus_than_the_cluster_has_stops_in_one_line(data, tmp_path, capsys):
    argv = ["train", "--preset", "tiny", "--data", str(data), "--set", "seq_len=64"]
    argv += ["--workers", "3", "--gpus-per-worker", "1", "--output-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "3 workers x 1 GPU = 3 GPUs, but the cluster has 2" in err and "--workers 2" in err
    assert not (tmp_path / "ray").exists(), "no worker started"


def test_a_cluster_with_gpus_is_trained_on_gpus_unless_asked(data, tmp_path, capsys):
    from enigma.train.driver import prepare_run

    def spec(gpus):
        cfg = build_config("tiny", sets=SMALL_RUN, data=str(data), workers=2,
                           gpus_per_worker=gpus, output_dir=str(tmp_path / str(gpus)))  # fmt: skip
        return prepare_run(cfg)

    assert spec(-1).use_gpu and spec(-1).train.gpus_per_worker == 1
    assert not spec(0).use_gpu
    assert "no GPUs" not in capsys.readouterr().out


def test_sweeps_run_as_many_trials_as_the_gpus_allow():
    from enigma.train.config import TrainConfig
    from enigma.train.sweep import Concurrency

    one_gpu = TrainConfig(workers=1, cpus_per_worker=1, gpus_per_worker=1)
    assert Concurrency(one_gpu, None).most == 2, "4 CPUs would allow 4; 2 GPUs allow 2"
    assert Concurrency(one_gpu.replace(gpus_per_worker=0), None).now() == 4
    assert Concurrency(one_gpu, 1).now() == 1

"""Two DeepSpeed ZeRO-3 ranks (gloo, CPU, fp32) resuming a checkpoint that one rank cannot read.

Both ranks train a tiny EnigmaLM for two steps and write a checkpoint with the project's
``checkpoint.save`` into one directory (as Ray Train's upload gathers every rank's files); then
each rank takes its own copy of it (as each node downloads one), and the last rank truncates its
copy's share of the model states. A fresh engine on each rank then calls the worker's
``load_agreed``: every rank must come back, saying the checkpoint was passed over, rather than one
rank waiting in ZeRO-3's gathers for a rank that gave up. Usage: ``RANK=r WORLD_SIZE=2
restore_probe.py DIR``; each rank prints one JSON line.
"""

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch


def engine_for(world: int):
    from enigma import EnigmaConfig, EnigmaLM
    from enigma.train import deepspeed_json
    from enigma.train.config import TrainConfig
    from enigma.train.worker import make_engine

    cfg = TrainConfig(lr=1e-2, activation_checkpointing=False, precision="fp32")
    ds = deepspeed_json.fill_auto(deepspeed_json.load("ds_configs/zero3.json"), cfg, world)
    torch.manual_seed(0)
    config = EnigmaConfig(vocab_size=300, d=32, num_heads=4, num_transformer_layers=2, max_len=64)
    return make_engine(EnigmaLM(config).train(), cfg, ds, torch.device("cpu"))[0]


def main() -> int:
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PROBE_PORT", "29551"))
    os.environ.update(env, LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    import deepspeed
    import ray.train

    from enigma.train import checkpoint
    from enigma.train.worker import load_agreed

    deepspeed.init_distributed(dist_backend="gloo")
    root = Path(sys.argv[1])
    engine = engine_for(world)
    for _ in range(2):
        ids = torch.randint(0, 300, (2, 16))
        engine.backward(engine(ids, labels=ids).loss)
        engine.step()
    local = checkpoint.save(engine, checkpoint.TrainState(step=2), rank, str(root / "tmp"), {})
    shutil.copytree(local, root / "shared", dirs_exist_ok=True)
    torch.distributed.barrier()
    mine = shutil.copytree(root / "shared", root / f"rank{rank}")
    if rank == world - 1:
        shard = next(mine.glob(f"ds/zero_pp_rank_{rank}_*model_states.pt"))
        shard.write_bytes(shard.read_bytes()[:100])
    fresh = engine_for(world)
    notes: list[str] = []
    try:
        load_agreed(fresh, [ray.train.Checkpoint(str(mine))], notes)
        outcome = {"rank": rank, "loaded": True}
    except RuntimeError as err:
        outcome = {"rank": rank, "loaded": False, "error": str(err)}
    print(json.dumps(outcome), flush=True)
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as in zero_probe.py: no interpreter finalization under gloo's threads

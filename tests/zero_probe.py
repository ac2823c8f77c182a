"""One DeepSpeed rank (a shipped ZeRO config without bf16, gloo, CPU) training tiny EnigmaLMs from
the same start with backward storing activations, then rebuilding them: the memory-efficient
machine, and reversible layers; 10 steps, each rank its own batches. Usage: ``RANK=r WORLD_SIZE=n
zero_probe.py zero3.json``, one process per rank. Rank 0 prints one JSON line with its
losses, keyed ``machine-stored``, ``machine-rebuilt``, ``layers-stored``, ``layers-rebuilt``."""

import json
import os
import sys
import warnings

import torch


def main() -> int:
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PROBE_PORT", "29541"))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.update(env, LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # DeepSpeed's ZeRO-3 calls collectives torch deprecates, one warning per call: a failure's
    # message would show those instead of its error.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    import deepspeed

    from enigma import EnigmaConfig, EnigmaLM
    from enigma.train import deepspeed_json
    from enigma.train.config import TrainConfig
    from enigma.train.worker import make_engine

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = TrainConfig(lr=1e-2, activation_checkpointing=False, precision="fp32")
    ds = deepspeed_json.load(f"ds_configs/{sys.argv[1]}")
    ds.pop("bf16")
    ds = deepspeed_json.fill_auto(ds, cfg, world)
    fields = dict(vocab_size=300, d=32, num_heads=4, num_transformer_layers=2, max_len=64)
    losses = {}
    for arch, rebuild in [(a, r) for a in ("machine", "layers") for r in (False, True)]:
        torch.manual_seed(0)
        config = EnigmaConfig(
            **fields, reversible_layers=arch == "layers", reversible_backward=rebuild
        )
        engine, _ = make_engine(EnigmaLM(config).train(), cfg, ds, torch.device("cpu"))
        batches = torch.Generator().manual_seed(1 + rank)
        runs = losses.setdefault(f"{arch}-{'rebuilt' if rebuild else 'stored'}", [])
        for _ in range(10):
            ids = torch.randint(0, 300, (4, 16), generator=batches)
            loss = engine(ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            runs.append(loss.item())
    if rank == 0:
        print(json.dumps(losses), flush=True)
    # Both ranks pass the barrier, then leave without finalizing the interpreter: a gloo worker
    # thread can still be releasing a finished collective's tensors then; it cannot take the GIL
    # during finalization and aborts the process (std::terminate, exit 134) in about one run of 8.
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

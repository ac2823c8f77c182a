"""One-process DeepSpeed ZeRO-3 (fp32, gloo, CPU) training a tiny EnigmaLM twice from the same
start: with the machine's backward storing activations, then rebuilding them. Prints one JSON
line with both runs' losses."""

import json
import os
import sys

import torch


def main() -> int:
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PROBE_PORT", "29541"))
    os.environ.update(env, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    import deepspeed

    from enigma import EnigmaConfig, EnigmaLM
    from enigma.train import deepspeed_json
    from enigma.train.config import TrainConfig
    from enigma.train.worker import make_engine

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = TrainConfig(lr=1e-2, activation_checkpointing=False, precision="fp32")
    ds = deepspeed_json.load("ds_configs/zero3_bf16.json")
    ds.pop("bf16")
    ds = deepspeed_json.fill_auto(ds, cfg, 1)
    fields = dict(vocab_size=300, d=32, num_heads=4, num_transformer_layers=2, max_len=64)
    losses = {}
    for rebuild in (False, True):
        torch.manual_seed(0)
        model = EnigmaLM(EnigmaConfig(**fields, machine_memory_efficient=rebuild)).train()
        engine, _ = make_engine(model, cfg, ds, torch.device("cpu"))
        batches = torch.Generator().manual_seed(1)
        runs = losses.setdefault(str(rebuild).lower(), [])
        for _ in range(6):
            ids = torch.randint(0, 300, (4, 16), generator=batches)
            loss = engine(ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            runs.append(loss.item())
    print(json.dumps(losses))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One-process DeepSpeed (a shipped ZeRO config without bf16, gloo, CPU) training tiny EnigmaLMs
from the same start with backward storing activations, then rebuilding them: the memory-efficient
machine, and reversible layers. Usage: ``zero_probe.py zero3_bf16.json``. Prints one JSON line
with each run's losses, keyed ``machine-stored``, ``machine-rebuilt``, ``layers-stored``,
``layers-rebuilt``."""

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
    ds = deepspeed_json.load(f"ds_configs/{sys.argv[1]}")
    ds.pop("bf16")
    ds = deepspeed_json.fill_auto(ds, cfg, 1)
    fields = dict(vocab_size=300, d=32, num_heads=4, num_transformer_layers=2, max_len=64)
    losses = {}
    for arch, rebuild in [(a, r) for a in ("machine", "layers") for r in (False, True)]:
        torch.manual_seed(0)
        config = EnigmaConfig(
            **fields, reversible_layers=arch == "layers", reversible_backward=rebuild
        )
        engine, _ = make_engine(EnigmaLM(config).train(), cfg, ds, torch.device("cpu"))
        batches = torch.Generator().manual_seed(1)
        runs = losses.setdefault(f"{arch}-{'rebuilt' if rebuild else 'stored'}", [])
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

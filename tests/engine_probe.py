"""A one-process DeepSpeed engine on the CPU, for tests of the optimizer choice: builds the engine
from a DeepSpeed JSON, trains a few steps, prints one JSON line. With ``--no-compiler`` the C++
compiler and the op cache are taken away after the process group is up, as on a node without a
toolchain (the comm op DeepSpeed loads at init is already built)."""

import argparse
import json
import os
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("ds_config")
    p.add_argument("--no-compiler", metavar="EMPTY_DIR")
    args = p.parse_args()
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PROBE_PORT", "29531"))
    os.environ.update(env, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    import deepspeed

    from enigma.train import deepspeed_json
    from enigma.train.config import TrainConfig
    from enigma.train.worker import make_engine

    deepspeed.init_distributed(dist_backend="gloo")
    if args.no_compiler:
        os.environ["CXX"] = "/nonexistent/c++"
        os.environ["TORCH_EXTENSIONS_DIR"] = args.no_compiler
    # fp32: these runs test the optimizer, not bf16 (which an AVX2-only CPU runs ~90x slower)
    cfg = TrainConfig(lr=1e-2, activation_checkpointing=False, precision="fp32")  # an MLP
    ds = deepspeed_json.fill_auto(deepspeed_json.load(args.ds_config), cfg, 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    try:
        engine, line = make_engine(model, cfg, ds, torch.device("cpu"))
    except RuntimeError as err:
        print(json.dumps({"error": str(err)}))
        return 1
    x = torch.randn(64, 16)
    target = x[:, :1] * 2
    losses = []
    for _ in range(cfg.grad_accum * 8):
        loss = torch.nn.functional.mse_loss(
            engine(x.to(engine.module[0].weight.dtype)).float(), target
        )
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    optimizer = type(engine.basic_optimizer).__name__
    print(json.dumps({"line": line, "optimizer": optimizer, "losses": losses}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

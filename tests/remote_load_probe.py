"""Loads an exported model the way a user without this project would: the project is taken off
the import path (its editable-install hook and its directory), then
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` generates greedily.

Usage: python remote_load_probe.py MODEL_DIR '[[token ids]]' NEW_TOKENS; prints the ids as JSON.
"""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f)]
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(ROOT)]
if importlib.util.find_spec("enigma") is not None:
    raise SystemExit("the project is still importable")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

model_dir, prompt, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
assert "enigma" not in sys.modules and not type(model).__module__.startswith("enigma")
out = model.generate(torch.tensor(prompt), max_new_tokens=new, do_sample=False)
print(json.dumps({"ids": out.tolist(), "class": type(model).__module__}))

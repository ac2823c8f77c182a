"""Loads exported models the way a user without this project would: ``enigma``, ``deepspeed``
and ``ray`` cannot be imported here (an import hook refuses them, whether installed or not, as
transformers' check of the modelling code's imports would find them missing), then
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` runs each model.

Usage: python remote_load_probe.py '[[token ids]]' NEW_TOKENS MODEL_DIR [MODEL_DIR ...]; prints
one JSON line per model: the greedy ids, the first step's logits and the class's module.
"""

import importlib.abc
import json
import sys

REFUSED = ("enigma", "deepspeed", "ray")


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in REFUSED:
            raise ModuleNotFoundError(f"No module named {name!r} (refused by the probe)", name=name)
        return None


sys.meta_path.insert(0, Refuse())

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

prompt, new = json.loads(sys.argv[1]), int(sys.argv[2])
for model_dir in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    assert not any(m.split(".")[0] in REFUSED for m in sys.modules)
    ids = torch.tensor(prompt)
    with torch.no_grad():
        logits = model(ids).logits[:, -1]
        out = model.generate(ids, max_new_tokens=new, do_sample=False)
    line = {"ids": out.tolist(), "logits": logits.tolist(), "class": type(model).__module__}
    print(json.dumps(line), flush=True)

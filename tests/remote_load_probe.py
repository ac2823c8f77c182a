"""Loads exported models the way a user without this project would, in a Python where
``enigma``, ``deepspeed`` and ``ray`` are not installed (``conftest.load_without_project`` runs it
with ``-S`` on a view of site-packages that leaves them out), with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``.

Usage: python -S remote_load_probe.py '[[token ids]]' NEW_TOKENS MODEL_DIR [MODEL_DIR ...]; prints
one JSON line per model: the greedy ids, the first step's logits and the class's module.
"""

import importlib.util
import json
import sys

ABSENT = ("enigma", "deepspeed", "ray")
missing = [name for name in ABSENT if importlib.util.find_spec(name) is None]
assert missing == list(ABSENT), f"importable here: {sorted(set(ABSENT) - set(missing))}"

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

prompt, new = json.loads(sys.argv[1]), int(sys.argv[2])
for model_dir in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    assert not any(m.split(".")[0] in ABSENT for m in sys.modules)
    ids = torch.tensor(prompt)
    with torch.no_grad():
        logits = model(ids).logits[:, -1]
        out = model.generate(ids, max_new_tokens=new, do_sample=False)
    line = {"ids": out.tolist(), "logits": logits.tolist(), "class": type(model).__module__}
    print(json.dumps(line), flush=True)

"""The model travels: every shape of EnigmaLM, saved, loads and generates in a Python where
``enigma``, ``deepspeed`` and ``ray`` cannot be imported, with the logits it has here; and the
modelling code it carries imports nothing but torch, transformers and itself."""

import ast
import sys

import pytest
import torch
from conftest import load_without_project

from enigma import EnigmaConfig, EnigmaLM

SHAPES = {
    "machine": {},
    "reversible-layers": {"reversible_layers": True},
    "no-machine": {"core": "none"},
    "bf16-rotors": {"rotor_matmul": "bf16"},
    "random-offsets": {"rotor_offset": "random"},
    "learned-positions": {"use_alibi": False},
}


def _model(fields: dict) -> EnigmaLM:
    torch.manual_seed(0)
    config = EnigmaConfig.from_preset("tiny", d=32, num_heads=2, vocab_size=300, **fields)
    model = EnigmaLM(config)
    with torch.no_grad():  # off the identity start, so the machine changes the logits
        for p in model.machine.parameters() if model.machine is not None else ():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_every_shape_loads_where_the_project_and_deepspeed_cannot_be_imported(tmp_path):
    prompt = [[101, 17, 42, 99]]
    dirs, expected = [], []
    for name, fields in SHAPES.items():
        model = _model(fields)
        model.save_pretrained(tmp_path / name)
        with torch.no_grad():
            ids = torch.tensor(prompt)
            logits = model(ids).logits[:, -1]
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
        dirs.append(tmp_path / name)
        expected.append((out.tolist(), logits))
    loaded = load_without_project(dirs, prompt, 4, tmp_path)
    assert len(loaded) == len(SHAPES)
    for name, got, (ids, logits) in zip(SHAPES, loaded, expected, strict=True):
        assert got["class"].startswith("transformers_modules"), name
        assert got["ids"] == ids, name
        assert torch.allclose(torch.tensor(got["logits"]), logits, atol=1e-5), name


STDLIB = set(sys.stdlib_module_names)


def test_the_carried_code_imports_only_torch_transformers_and_itself(tmp_path):
    _model({}).save_pretrained(tmp_path)
    files = sorted(tmp_path.glob("*.py"))
    siblings = {f.stem for f in files}
    assert {"lm", "lm_config", "machine", "rotor", "errors"} <= siblings
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in siblings, (f.name, node.module)
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in STDLIB or top in ("torch", "transformers"), (f.name, name)


@pytest.mark.parametrize("frozen", ["machine", "rotors", "blocks", "reflector"])
@pytest.mark.parametrize("layers", [False, True], ids=["machine", "reversible-layers"])
def test_a_frozen_part_trains_the_rest_with_the_reversible_backward(frozen, layers):
    """Freezing the machine, or one of its parts, as fine-tuning does: the reversible backward
    gives the rest the gradients that stored activations give, and the frozen part none."""
    grads = {}
    for rebuild in (True, False):
        fields = {"reversible_backward": rebuild, "reversible_layers": layers}
        model = _model(fields).train()
        part = model.machine if frozen == "machine" else getattr(model.machine, frozen)
        part.requires_grad_(False)
        ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
        model(ids, labels=ids).loss.backward()
        assert all(p.grad is None for p in part.parameters())
        grads[rebuild] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, g in grads[False].items():
        assert torch.allclose(grads[True][name], g, atol=1e-6), name

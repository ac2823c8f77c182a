"""Reversible Transformer layers and the reversible backward of the whole model."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, perturb

from enigma import EnigmaConfig, EnigmaLM
from enigma.errors import InputError
from enigma.train.config import build_config


def _pair(dtype=torch.float64, **overrides) -> tuple[EnigmaLM, EnigmaLM]:
    """The same weights with backward storing activations (first) and rebuilding them."""
    fields = dict(vocab_size=300, d=32, num_transformer_layers=3, num_heads=4, num_rev_blocks=2)
    fields.update(num_rotors=2, rotor_positions=4, max_len=128, reversible_layers=True)
    fields.update(overrides)
    torch.manual_seed(0)
    stored = EnigmaLM(EnigmaConfig(**fields, reversible_backward=False)).to(dtype)
    perturb(stored, 0.05, seed=1)  # off the zero-ended couplings, so every path carries signal
    rebuilt = EnigmaLM(EnigmaConfig(**fields, reversible_backward=True)).to(dtype)
    rebuilt.load_state_dict(stored.state_dict())
    return stored.train(), rebuilt.train()


def _gradients(model: EnigmaLM, ids: torch.Tensor, seed: int = 7):
    """Loss and the gradients of every parameter and of the embedded input."""
    embedded = {}
    hook = model.embed.register_forward_hook(lambda m, i, out: embedded.setdefault("h", out))
    torch.manual_seed(seed)  # the same dropout masks in both models
    loss = model(ids, labels=ids).loss
    hook.remove()
    grads = torch.autograd.grad(loss, [embedded["h"], *model.parameters()])
    return loss, grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="reversible-layers"),
        pytest.param({"dropout": 0.2}, id="reversible-layers-dropout"),
        pytest.param({"reversible_layers": False}, id="machine-only"),
        pytest.param({"num_rev_blocks": 0, "num_rotors": 0}, id="layers-only"),
    ],
)
def test_rebuilding_backward_gives_the_stored_gradients_in_float64(overrides):
    """Gradients of every parameter and of the embedded input agree to 1e-8 (relative) in a
    float64 model; with dropout, the rebuild replays the same masks."""
    stored, rebuilt = _pair(**overrides)
    ids = torch.randint(0, 300, (2, 16))
    loss_a, grads_a = _gradients(stored, ids)
    loss_b, grads_b = _gradients(rebuilt, ids)
    assert loss_a.dtype == torch.float64
    assert loss_a.item() == loss_b.item()
    worst = max(_relative(b, a) for a, b in zip(grads_a, grads_b, strict=True))
    assert worst < 1e-8, worst
    if overrides.get("dropout"):
        torch.manual_seed(8)
        assert stored(ids, labels=ids).loss.item() != loss_a.item(), "dropout is active"


def test_lora_dropout_replays_in_the_rebuild():
    """LoRA's own dropout (the model's is 0) inside reversible layers: the rebuild replays its
    masks, so the adapters' gradients equal stored activations' to 1e-8 in float64."""
    from peft import LoraConfig, get_peft_model

    models = []
    for model in _pair():
        torch.manual_seed(3)  # the same adapters' start in both
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False,
                            target_modules=["qkv", "proj", "mlp.0", "mlp.2"])  # fmt: skip
        models.append(get_peft_model(model, config).double().train())
    ids = torch.randint(0, 300, (2, 16))
    found = []
    for model in models:
        torch.manual_seed(7)
        loss = model(input_ids=ids, labels=ids).loss
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        found.append((loss, torch.autograd.grad(loss, lora)))
    (loss_a, grads_a), (loss_b, grads_b) = found
    assert loss_a.item() == loss_b.item()
    worst = max(_relative(b, a) for a, b in zip(grads_a, grads_b, strict=True))
    assert worst < 1e-8, worst
    torch.manual_seed(8)
    assert models[0](input_ids=ids, labels=ids).loss.item() != loss_a.item(), "dropout is active"


def test_reversible_layers_keep_nothing_per_layer():
    """The bytes the forward saves for backward do not grow with depth (2 -> 8 layers), while the
    same model with stored activations saves more than ten activations' worth per added layer."""

    def saved_bytes(layers: int, rebuild: bool) -> int:
        torch.manual_seed(0)
        model = EnigmaLM(
            EnigmaConfig(
                vocab_size=300, d=64, num_heads=4, num_transformer_layers=layers, max_len=64,
                num_rev_blocks=2, num_rotors=2, reversible_layers=True, reversible_backward=rebuild,
            )
        ).train()  # fmt: skip
        total = 0

        def pack(t):
            nonlocal total
            if not isinstance(t, torch.nn.Parameter):
                total += t.numel() * t.element_size()
            return t

        ids = torch.randint(0, 300, (2, 32))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids).loss  # what the forward keeps for backward
        loss.backward()
        return total

    assert saved_bytes(8, rebuild=True) == saved_bytes(2, rebuild=True)
    activation = 2 * 32 * 64 * 4  # B x L x d fp32
    assert saved_bytes(8, rebuild=False) - saved_bytes(2, rebuild=False) > 6 * 10 * activation


def test_cached_generation_equals_uncached_greedy_decoding():
    _, model = _pair(torch.float32, dropout=0.1)
    model.eval()
    prompt = torch.randint(0, 300, (2, 5))
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    with torch.no_grad():  # and the last step's logits, cached or not
        full = model(cached).logits[:, -1]
        out = model(cached[:, :-1], use_cache=True)
        step = model(cached[:, -1:], cache=out.cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_bf16_weights_train_with_the_rebuild():
    """bf16 weights (as under DeepSpeed's bf16): the streams stay fp32, the rebuild's gradients
    stay close to the stored ones."""
    stored, rebuilt = _pair(torch.bfloat16)
    ids = torch.randint(0, 300, (2, 16))
    loss_a, grads_a = _gradients(stored, ids)
    loss_b, grads_b = _gradients(rebuilt, ids)
    assert loss_a.item() == loss_b.item()
    worst = max(_relative(b.float(), a.float()) for a, b in zip(grads_a, grads_b, strict=True))
    assert worst < 0.05, worst


def test_knobs_and_their_conflicts():
    assert EnigmaConfig(reversible_layers=True).reversible_backward is True
    assert EnigmaConfig(machine_memory_efficient=True).reversible_backward is True
    assert EnigmaConfig().reversible_backward is False
    with pytest.raises(InputError, match="activation_checkpointing"):
        EnigmaConfig(reversible_layers=True, activation_checkpointing=True)
    with pytest.raises(InputError, match="disagree"):
        EnigmaConfig(machine_memory_efficient=True, reversible_backward=False)
    cfg = build_config("tiny", sets=["reversible_layers=true", "reversible_backward=false"])
    model_config = cfg.model_config()
    assert model_config.reversible_layers and not model_config.reversible_backward
    assert not model_config.activation_checkpointing, "nothing to checkpoint"
    with pytest.raises(InputError, match="activation_checkpointing=true would recompute"):
        build_config("tiny", sets=["reversible_layers=true", "activation_checkpointing=true"])


@pytest.mark.parametrize(("config", "port"), [("zero1.json", 29543), ("zero3.json", 29544)])
def test_rebuilding_backward_under_zero1_and_zero3_matches_stored_activations(config, port):
    """Two DeepSpeed ranks (gloo), fp32, 10 steps, for the memory-efficient machine and for
    reversible layers: the same losses as stored activations (ZeRO-3 partitions the parameters;
    the module that runs the chain is gathered whole as a DeepSpeed leaf)."""
    env = {**os.environ, "PROBE_PORT": str(port), "DS_ACCELERATOR": "cpu", "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "zero_probe.py"), config],
            env={**env, "RANK": str(rank)},
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for rank in range(2)
    ]
    outputs = [rank.communicate(timeout=600) for rank in ranks]
    stdout, stderr = outputs[0]
    lines = [s for s in stdout.splitlines() if s.startswith("{")]
    ok = all(rank.returncode == 0 for rank in ranks) and lines
    assert ok, stdout[-2000:] + stderr[-3000:] + outputs[1][1][-2000:]
    losses = json.loads(lines[-1])
    for arch in ("machine", "layers"):
        stored, rebuilt = losses[f"{arch}-stored"], losses[f"{arch}-rebuilt"]
        assert len(rebuilt) == 10 and stored[0] != stored[-1], "the weights move"
        for a, b in zip(stored, rebuilt, strict=True):
            assert abs(a - b) < 1e-4, (arch, a, b)


def test_reversible_layers_are_a_sweep_knob():
    from enigma.train.sweep import parse_grid
    from enigma.train.sweep_trial import trial_config

    grid = parse_grid(["reversible_layers=false,true"])
    assert grid == {"reversible_layers": [False, True]}
    base = build_config("tiny").to_dict()
    config = trial_config(base, {"reversible_layers": True}).model_config()
    assert config.reversible_layers and config.reversible_backward

"""EnigmaLM: causality, Hugging Face round trip, KV cache, ALiBi, checkpointing, bad input."""

import json
import os

import pytest
import torch
from conftest import perturb
from transformers import AutoConfig, AutoModelForCausalLM

from enigma import EnigmaConfig, EnigmaLM


def _small_lm(**overrides) -> EnigmaLM:
    """A tiny LM whose machine has left its identity start, so positions matter."""
    torch.manual_seed(0)
    fields = dict(vocab_size=300, d=32, num_transformer_layers=2, num_heads=4, num_rev_blocks=2)
    fields.update(num_rotors=2, rotor_positions=4, max_len=128)
    model = EnigmaLM(EnigmaConfig(**{**fields, **overrides})).eval()
    if model.machine is not None:
        perturb(model.machine, 0.1)
    return model


@pytest.mark.parametrize("use_alibi", [True, False])
def test_causal(use_alibi):
    model = _small_lm(use_alibi=use_alibi)
    ids = torch.randint(0, 300, (2, 20))
    changed = ids.clone()
    changed[:, 11] = (changed[:, 11] + 7) % 300
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :11], b[:, :11], rtol=0, atol=0)
    assert (a[:, 11:] - b[:, 11:]).abs().amax(dim=-1).min() > 0, "every later logit row changes"


def test_machine_makes_the_model_position_dependent():
    model = _small_lm()
    same = torch.full((1, 8), 5)
    with torch.no_grad():
        embedded = model.machine(model.embed(same).float(), torch.arange(8))
    assert (embedded[0, 0] - embedded[0, 1]).abs().max() > 1e-3


def test_save_and_load_round_trip(tmp_path):
    model = _small_lm()
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), EnigmaConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True).eval()
    assert isinstance(loaded, EnigmaLM)
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed.weight.data_ptr(), "head tied"


def test_configs_saved_before_the_rotor_positions_rename_still_load(tmp_path):
    model = _small_lm(rotor_positions=8)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["conv1x1_positions"] = config.pop("rotor_positions")  # as older exports wrote it
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = EnigmaLM.from_pretrained(tmp_path).eval()
    assert loaded.config.rotor_positions == 8 and loaded.machine.rotors.rotor_positions == 8
    assert "conv1x1_positions" not in loaded.config.to_dict()
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("use_alibi", [True, False])
def test_cached_generation_equals_uncached_greedy(use_alibi):
    model = _small_lm(use_alibi=use_alibi)
    prompt = torch.randint(0, 300, (2, 6))
    out = model.generate(
        prompt,
        max_new_tokens=12,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(out, ids)


def test_labels_give_the_shifted_loss():
    model = _small_lm()
    ids = torch.randint(0, 300, (2, 10))
    out = model(ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, manual)


def test_alibi_extrapolates_beyond_max_len():
    model = _small_lm(max_len=128)
    ids = torch.randint(0, 300, (1, 512))
    with torch.no_grad():
        assert torch.isfinite(model(ids, labels=ids).loss)
    learned = _small_lm(max_len=128, use_alibi=False)
    with pytest.raises(ValueError, match="max_len=128"):
        learned(ids)


def test_activation_checkpointing_gives_the_same_gradients():
    plain = _small_lm().train()
    ckpt = _small_lm(activation_checkpointing=True).train()
    assert all(block.gradient_checkpointing for block in ckpt.blocks)
    ids = torch.randint(0, 300, (2, 16))
    for model in (plain, ckpt):
        model(ids, labels=ids).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_memory_efficient_machine_matches_plain_in_the_lm():
    a, b = _small_lm(), _small_lm(machine_memory_efficient=True)
    ids = torch.randint(0, 300, (2, 16))
    for model in (a, b):
        model.train()
        model(ids, labels=ids).loss.backward()
    for p, q in zip(a.machine.parameters(), b.machine.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_baseline_has_no_machine_and_presets_build():
    assert _small_lm(core="none").machine is None
    assert _small_lm(num_rev_blocks=0, num_rotors=0).machine is None
    counts = EnigmaLM(EnigmaConfig.from_preset("tiny")).parameter_counts()
    assert (
        counts["machine"] > 0
        and counts["total"]
        == counts["embedding"] + counts["machine"] + counts["blocks"] + counts["final_norm"]
    )


def test_original_constructor_signature():
    model = EnigmaLM(
        vocab_size=500,
        d=64,
        num_rev_blocks=1,
        num_rotors=1,
        num_transformer_layers=1,
        num_heads=4,
        max_len=64,
        use_alibi=True,
        use_dynamic_conv1x1=False,
        rotor_positions=16,
    )
    assert model.config.d == 64 and model.machine.rotors.rotor_positions == 1


def test_bad_input_is_rejected_with_a_clear_message():
    model = _small_lm()
    with pytest.raises(ValueError, match="vocab_size=300"):
        model(torch.tensor([[1, 2, 300]]))
    with pytest.raises(ValueError, match="vocab_size=300"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="num_heads=5"):
        EnigmaConfig(d=64, num_heads=5)
    with pytest.raises(ValueError, match="tiny, small, base, large"):
        EnigmaConfig.from_preset("huge")
    with pytest.raises(ValueError, match="rotor_matmul='fp8' is not one of"):
        EnigmaConfig.from_preset("tiny", rotor_matmul="fp8")


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"machine_memory_efficient": True, "rotor_matmul": "bf16"},
        {"reversible_layers": True, "dropout": 0.1},
    ],
    ids=["plain", "memory-efficient-machine-bf16-rotors", "reversible-layers"],
)
def test_no_tensor_is_made_behind_the_inputs_back(overrides):
    """Model and inputs live on the CPU while factories default to the meta device: a tensor made
    without ``device=`` becomes meta and the computation fails (as it would on CUDA, where such a
    tensor lands on the CPU)."""
    model = _small_lm(**overrides).train()
    ids = torch.randint(0, 300, (2, 12))
    positions = torch.arange(12)
    x = torch.randn(2, 12, 32, requires_grad=True)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding: the padding-mask path runs too
    with torch.device("meta"):
        out = model(ids, labels=ids, attention_mask=mask)
        out.loss.backward()
        y = model.machine(x, positions)
        back = model.machine.inverse(y, positions)
        y.sum().backward()
        rotors = model.machine.rotors
        weights = [rotors.weights(), rotors.inverse_weights()]
        model.eval()
        with torch.no_grad():
            generated = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    tensors = [out.loss, back, x.grad, generated, *weights]
    assert all(t.device.type == "cpu" for t in tensors)
    tol = 1e-2 if overrides.get("rotor_matmul") == "bf16" else 1e-5  # bf16 products round
    torch.testing.assert_close(back, x, rtol=tol, atol=tol)
    assert all(p.grad is not None and p.grad.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize(
    "overrides",
    [{"rotor_offset": "random"}, {"reversible_backward": True},
     {"reversible_layers": True, "dropout": 0.1}],
    ids=["random-rotor-offsets", "memory-efficient-machine", "reversible-layers"],
)  # fmt: skip
def test_a_training_step_reads_no_value_back_to_the_host(overrides):
    """A value read back (``.item()``, ``bool(t)``, ``nonzero``) waits for the GPU: the host
    stops queueing kernels every step. None may run in a training step's forward + backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "masked_select", "_unique2"}

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in reads:
                self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = _small_lm(**overrides).train()
    ids = torch.randint(0, 300, (2, 12))
    with Reads() as mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        loss.detach().item()  # the check itself sees a read
    assert mode.seen == ["_local_scalar_dense"]


def test_a_double_model_runs_in_double_throughout():
    model = _small_lm().double()
    ids = torch.randint(0, 300, (2, 10))
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.float64 and out.loss.dtype == torch.float64
    seen = []
    model.machine.register_forward_hook(lambda m, args, y: seen.append((args[0].dtype, y.dtype)))
    model(ids)
    assert seen == [(torch.float64, torch.float64)]


@pytest.mark.parametrize(
    "overrides",
    [{}, {"use_alibi": False}, {"reversible_layers": True}],
    ids=["alibi", "learned-positions", "reversible-layers"],
)
def test_left_padded_batch_generates_as_each_prompt_alone(overrides):
    """The machine's positions count the real tokens before each token, so a left-padded prompt
    meets the rotor settings it meets alone: same tokens, logits within 1e-5."""
    model = _small_lm(**overrides)
    torch.manual_seed(3)
    prompts = [torch.randint(1, 300, (n,)) for n in (3, 7, 11)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    common = dict(max_new_tokens=9, do_sample=False, return_dict_in_generate=True,
                  output_logits=True, pad_token_id=0)  # fmt: skip
    batched = model.generate(ids, attention_mask=mask, **common)
    with torch.no_grad():  # a plain forward too (generate hands position_ids over itself)
        last = model(ids, attention_mask=mask).logits[:, -1]
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            alone_last = model(prompt[None]).logits[0, -1]
        torch.testing.assert_close(last[row], alone_last, rtol=0, atol=1e-5)
        alone = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt)), **common)
        assert torch.equal(batched.sequences[row, width:], alone.sequences[0, len(prompt) :])
        for step, (a, b) in enumerate(zip(batched.logits, alone.logits, strict=True)):
            torch.testing.assert_close(a[row], b[0], rtol=0, atol=1e-5, msg=f"step {step}")


def test_random_rotor_offsets_reach_every_setting_in_one_demo_epoch(data):
    """The demo trains ``tiny`` (2 rotors of 16 settings) on 128-token sequences of this corpus.
    With ``rotor_offset="random"`` every setting of every rotor is reached within one epoch's
    draws, so generation past ``seq_len`` meets trained settings; with ``"zero"`` the slow rotor
    only ever sees 8 of its 16."""
    from enigma.invertible.rotor import rotor_offsets
    from enigma.models.lm_config import PRESET_SEQ_LEN

    seq_len = PRESET_SEQ_LEN["tiny"]
    manifest = json.loads((data / "manifest.json").read_text())
    epoch = manifest["splits"]["train"]["tokens"] // seq_len
    trained = {}
    for offset in ("zero", "random"):
        model = EnigmaLM(EnigmaConfig.from_preset("tiny", rotor_offset=offset)).train()
        rotors = model.machine.rotors
        seen = torch.zeros(rotors.num_layers, rotors.rotor_positions, dtype=torch.bool)
        for start in range(0, epoch, 512):  # the positions forward gives the machine
            batch = min(512, epoch - start)
            positions = model.machine_positions(torch.arange(seq_len), batch)
            settings = rotor_offsets(
                positions.reshape(-1), rotors.num_layers, rotors.rotor_positions
            )
            for i in range(rotors.num_layers):
                seen[i, settings[i].unique()] = True
        trained[offset] = seen
    assert trained["random"].all(), "every setting of every rotor"
    assert trained["zero"][1].sum() == 8 and not trained["zero"][1].all()
    # Generation runs at positions 0, 1, ... past seq_len: settings that random offsets trained.
    model.eval()
    beyond = rotor_offsets(torch.arange(seq_len, 4 * seq_len), 2, 16)
    assert all(trained["random"][i, beyond[i]].all() for i in range(2))
    assert not all(trained["zero"][i, beyond[i]].all() for i in range(2))
    # and forward hands the machine these positions: distinct per sequence in training
    seen_positions = []
    hook = model.machine.register_forward_pre_hook(lambda m, a: seen_positions.append(a[1]))
    model.train()(torch.randint(0, 100, (4, 8)))
    hook.remove()
    assert seen_positions[0].shape == (4, 8) and seen_positions[0][:, 0].unique().numel() > 1

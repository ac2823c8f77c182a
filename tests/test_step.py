"""A training step with less wasted: the loss reads the logits as they are, the Transformer
blocks, head and loss compile into one graph each, FlexAttention where the bias path would keep
fused kernels out, coupling nets of their own width, and activation checkpointing only where it
is needed. Counted on the CPU under FakeTensorMode (`enigma bench roofline`)."""

import pytest
import torch
import torch.nn.functional as F

from enigma import EnigmaConfig, EnigmaLM
from enigma.benchmarks.roofline import count_step
from enigma.models import loss as loss_module


@pytest.fixture(scope="module")
def base_step():
    """One `base` step at B=32, L=256 under bf16 autocast, eager, counted op by op."""
    return {name: count_step(fields, 32, 256) for name, fields in
            (("plain", {"core": "none"}), ("enigma", {}),
             ("enigma_256", {"coupling_hidden": 256}))}  # fmt: skip


def test_a_step_holds_two_logit_sized_tensors_and_moves_less(base_step):
    """The logits and their gradient, where slicing, copying and upcasting made eight; the plain
    Transformer's eager step moved 21.9 GB with them, 18.1 GB with the loss reading chunks of
    bf16 logits into an fp32 softmax (this count of the code before each)."""
    for counted in base_step.values():
        assert counted["full_logits_tensors"] <= 2
    assert base_step["plain"]["bytes"] <= 16e9
    assert base_step["enigma"]["bytes"] < 22e9


def test_narrower_coupling_nets_bring_the_flop_ratio_over_0_9(base_step):
    flops = {name: c["flops"] for name, c in base_step.items()}
    assert flops["plain"] / flops["enigma"] < 0.88
    assert flops["plain"] / flops["enigma_256"] >= 0.9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_the_loss_equals_the_sliced_upcast_cross_entropy(monkeypatch, dtype):
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * 300 * 7)  # several chunks
    torch.manual_seed(0)
    logits = torch.randn(3, 9, 300, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 300, (3, 9))
    labels[0, 3] = labels[2, 8] = -100
    ours = loss_module.next_token_loss(logits, labels)
    (grad,) = torch.autograd.grad(ours, logits)
    wide = torch.promote_types(dtype, torch.float32)
    sliced = logits[:, :-1].reshape(-1, 300).to(wide)
    before = F.cross_entropy(sliced, labels[:, 1:].reshape(-1), ignore_index=-100)
    (expected,) = torch.autograd.grad(before, logits)
    assert ours.dtype == wide and abs(ours.item() - before.item()) < 1e-6
    # The softmax rounded to the logits' dtype, then scaled: one bf16 ulp apart at most.
    ulp = 2**-7 if dtype == torch.bfloat16 else 1e-6
    assert grad.dtype == dtype
    assert torch.allclose(grad.double(), expected.double(), rtol=ulp, atol=1e-7)


def test_blocks_head_and_loss_compile_into_one_graph_each():
    from enigma.models.attention import attention_bias

    model = EnigmaLM(EnigmaConfig.from_preset("tiny", d=64, num_heads=4, vocab_size=300))
    h = torch.randn(2, 16, 64)
    bias, causal = attention_bias(4, 0, 16, True, None, None)
    logits, labels = torch.randn(2, 16, 300, requires_grad=True), torch.randint(0, 300, (2, 16))
    for fn, args in ((model.blocks[0], (h, bias, causal)), (model.lm_head, (h,)),
                     (loss_module.next_token_loss, (logits, labels))):  # fmt: skip
        explained = torch._dynamo.explain(fn)(*args)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), fn


def test_compiled_layers_give_the_eager_loss_and_gradients():
    """``compile_layers`` (inductor: blocks, norm, head, loss) changes the kernels, not the
    numbers: fp32 loss and every gradient as eager within rounding."""
    import copy

    torch.manual_seed(0)
    config = EnigmaConfig.from_preset("tiny", d=64, num_heads=4, vocab_size=300)
    eager = EnigmaLM(config).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_layers()
    ids = torch.randint(0, 300, (2, 24))
    losses = []
    for model in (eager, compiled):
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


def test_flex_attention_forward_equals_the_bias_path():
    """FlexAttention (ALiBi as a score modifier, a causal block mask) gives the bias path's
    logits; its forward runs on the CPU, its backward needs CUDA."""
    torch.manual_seed(0)
    model = EnigmaLM(EnigmaConfig.from_preset("tiny", d=64, num_heads=4, vocab_size=300)).eval()
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        bias_path = model(ids).logits
        model.config.attention_kernel = "flex"
        flex = model(ids).logits
    assert torch.allclose(flex, bias_path, atol=1e-5)
    model.config.attention_kernel = "auto"
    assert not model.train().uses_flex(torch.device("cuda"), None, 0), "blocks not compiled"
    model.compile_layers()  # lazy: nothing traces until a call
    assert not model.uses_flex(torch.device("cpu"), None, 0), "auto: CUDA only"
    assert model.uses_flex(torch.device("cuda"), None, 0)
    assert not model.uses_flex(torch.device("cuda"), torch.ones(2, 40), 0), "padding: bias"


def test_activation_checkpointing_auto_decides_by_the_free_memory(monkeypatch):
    from enigma.train import checkpointing
    from enigma.train.config import build_config

    cfg = build_config("base", sets=["micro_batch=16", "precision=bf16"])
    assert (
        cfg.activation_checkpointing == "auto" and not cfg.model_config().activation_checkpointing
    )
    need = checkpointing.saved_bytes(cfg.model_config(), 16, 256, torch.bfloat16)
    assert 0.8e9 < need < 2e9  # what one base micro-batch keeps for backward
    assert checkpointing.saved_bytes(cfg.model_config(), 32, 256, torch.bfloat16) > 1.9 * need
    for free, expected in ((10 * need, False), (need, True)):
        monkeypatch.setattr(checkpointing, "free_bytes", lambda device, here, f=free: f)
        on, line = checkpointing.decide(cfg.model_config(), cfg, torch.device("cpu"), 1)
        assert on is expected and line.startswith(
            f"activation checkpointing: {'on' if on else 'off'}"
        )
    monkeypatch.setattr(checkpointing, "free_bytes", lambda device, here: 10 * need)
    on, line = checkpointing.decide(cfg.model_config(), cfg, torch.device("cpu"), 1, lambda n: True)
    assert on and "another rank needs it" in line
    old = build_config("tiny", sets=["activation_checkpointing=true"])
    assert old.activation_checkpointing == "on" and old.model_config().activation_checkpointing

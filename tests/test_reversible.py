"""Memory-efficient backprop: same gradients as plain autograd, memory flat in depth."""

import pytest
import torch
from conftest import perturb

from enigma import Enigma, RevBlock, ReversibleSequence
from enigma.benchmarks.memory import measure_in_fresh_process


def _grads(module, x, weight):
    x = x.clone().requires_grad_(True)
    module.zero_grad()
    y, log_det = module.forward_and_log_det(x)
    ((y * weight).sum() + log_det.square().sum()).backward()
    return [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("coupling", ["additive", "affine"])
@pytest.mark.parametrize("involutive", [True, False])
def test_gradients_equal_plain_autograd_fp64(coupling, involutive):
    torch.manual_seed(0)
    machine = Enigma(32, 3, 2, rotor_positions=4, coupling=coupling, involutive=involutive).double()
    perturb(machine, 0.1)
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    weight = torch.randn_like(x)
    machine.memory_efficient = True
    efficient = _grads(machine, x, weight)
    machine.memory_efficient = False
    plain = _grads(machine, x, weight)
    assert len(efficient) == len(plain) > 5
    for a, b in zip(efficient, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_parameters_get_gradients_when_input_needs_none():
    seq = ReversibleSequence(*[RevBlock(8) for _ in range(3)])
    with torch.no_grad():
        for p in seq.parameters():
            p.add_(0.1)
    seq(torch.randn(4, 8)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seq.parameters())


def test_reversible_sequence_inverts():
    seq = ReversibleSequence(RevBlock(8, "affine"), RevBlock(8), memory_efficient=False)
    perturb(seq, 0.3)
    x = torch.randn(5, 8)
    torch.testing.assert_close(seq.inverse(seq(x)), x)


def test_peak_memory_is_flat_in_depth():
    """RSS high-water mark of forward + backward at d=512, B=8, L=512, fresh processes."""
    eff = {n: measure_in_fresh_process(n, True)["peak_rss_mb"] for n in (2, 16)}
    plain = {n: measure_in_fresh_process(n, False)["peak_rss_mb"] for n in (2, 16)}
    print(f"memory-efficient {eff} MB, plain autograd {plain} MB")
    assert eff[16] <= 1.5 * eff[2]
    assert plain[16] > 2 * plain[2], "without reversible backprop memory grows with depth"
    assert plain[16] - plain[2] > 4 * (eff[16] - eff[2])


def test_each_parameter_gradient_is_accumulated_once_per_backward():
    """The involutive machine runs every block twice (F and F⁻¹); DeepSpeed ZeRO reduces a
    gradient when its accumulation hook fires and refuses a second one, so the memory-efficient
    backward must deliver one summed gradient per parameter."""
    torch.manual_seed(0)
    machine = perturb(Enigma(32, 2, 2, rotor_positions=4, memory_efficient=True), 0.1)
    fired: dict[str, int] = {}
    for name, p in machine.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda _, n=name: fired.__setitem__(n, fired.get(n, 0) + 1)
        )
    x = torch.randn(2, 8, 32, requires_grad=True)
    machine(x).square().sum().backward()
    assert fired and set(fired.values()) == {1}, fired
    assert set(fired) == {n for n, p in machine.named_parameters() if p.requires_grad}

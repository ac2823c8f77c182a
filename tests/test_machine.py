"""The whole machine: exactness after training, log-det, stepping, purity, precision, bad input."""

import copy

import pytest
import torch
from conftest import jacobian_log_det, perturb, rel_err

from enigma import Enigma


@pytest.fixture(scope="module")
def trained():
    """d=512 machine moved the way training moves it: 200 AdamW steps at lr 1e-3."""
    torch.manual_seed(0)
    machine = Enigma(512, num_rev_blocks=4, num_rotors=2)
    start = copy.deepcopy(machine)
    opt = torch.optim.AdamW(machine.parameters(), lr=1e-3)
    x, target = torch.randn(1, 64, 512), torch.randn(1, 64, 512)
    for _ in range(200):
        loss = (machine(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return start, machine


def test_trained_machine_moved_far(trained):
    start, machine = trained
    x = torch.randn(2, 64, 512)
    with torch.no_grad():
        assert rel_err(machine(x), start(x)) > 0.3
        deviation = machine.rotors.weights() - torch.eye(512)
        assert deviation.norm() / torch.eye(512).norm() > 0.05


def test_exact_after_training_fp32(trained):
    _, machine = trained
    x = torch.randn(2, 64, 512)
    with torch.no_grad():
        y = machine(x)
        assert rel_err(machine.inverse(y), x) <= 1e-6
        assert rel_err(machine(y), x) <= 1e-6, "E(E(x)) = x: the machine is an involution"


def test_exact_after_training_fp64(trained):
    _, machine = trained
    machine = copy.deepcopy(machine).double()
    x = torch.randn(2, 64, 512, dtype=torch.float64)
    with torch.no_grad():
        y = machine(x)
        assert rel_err(machine.inverse(y), x) <= 1e-12
        assert rel_err(machine(y), x) <= 1e-12


def _moved(machine: Enigma, seed: int = 1) -> Enigma:
    """Move every parameter off its start by about what training does (0.2 makes the small
    machines explosive, |E(x)|/|x| ~ 1e5, which no training run produces)."""
    torch.manual_seed(seed)
    return perturb(machine, 0.1, seed=seed)


@pytest.mark.parametrize("involutive", [True, False])
@pytest.mark.parametrize("coupling", ["additive", "affine"])
@pytest.mark.parametrize("position", [0, 3, 4, 13])
def test_machine_log_det_matches_jacobian(involutive, coupling, position):
    machine = _moved(Enigma(16, 2, 2, rotor_positions=4, involutive=involutive, coupling=coupling))
    machine = machine.double()
    x = torch.randn(16, dtype=torch.float64)
    _, log_det = machine.forward_and_log_det(x[None], torch.tensor(position))
    assert abs(log_det.item() - jacobian_log_det(machine, x, position)) < 1e-4
    if involutive and coupling == "affine":
        assert abs(log_det.item()) > 1e-3, "affine involution is not volume-preserving"


def test_involutive_log_det_is_difference_of_open_maps():
    """log|det J_E(x)| = log|det J_F(x)| - log|det J_F(E(x))|."""
    machine = _moved(Enigma(16, 2, 2, rotor_positions=4, coupling="affine")).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    pos = torch.arange(5) * 3
    y, log_det = machine.forward_and_log_det(x, pos)
    machine.involutive = False
    _, open_x = machine.forward_and_log_det(x, pos)
    _, open_y = machine.forward_and_log_det(y, pos)
    torch.testing.assert_close(log_det, open_x - open_y)


def test_stepping_changes_the_map_and_repeats_with_period():
    machine = _moved(Enigma(32, 2, 2, rotor_positions=4)).double()
    assert machine.period == 16
    x = torch.randn(1, 32, dtype=torch.float64).expand(40, 32)
    y = machine(x, torch.arange(40))
    assert rel_err(y[0], y[1]) > 1e-3, "positions 0 and 1 differ (fast rotor)"
    assert rel_err(y[0], y[4]) > 1e-3, "positions 0 and `rotor_positions` differ (slow rotor)"
    torch.testing.assert_close(y[:24], y[16:], rtol=0, atol=1e-12)


def test_default_positions_follow_the_sequence_axis():
    machine = _moved(Enigma(32, 1, 2, rotor_positions=4))
    x = torch.randn(3, 10, 32)
    torch.testing.assert_close(machine(x), machine(x, torch.arange(10)))
    torch.testing.assert_close(machine(x[0]), machine(x[0], torch.zeros(10, dtype=torch.long)))


def test_no_hidden_state_and_batch_independence():
    machine = _moved(Enigma(32, 2, 2, rotor_positions=4))
    x = torch.randn(4, 12, 32)
    first = machine(x)
    for _ in range(3):
        machine(torch.randn(2, 7, 32))
    assert torch.equal(machine(x), first), "same call, same bits, whatever came before"
    alone = machine(x[2:3])
    torch.testing.assert_close(alone, first[2:3], rtol=0, atol=1e-6)


def test_bf16_autocast_reconstructs(trained):
    _, machine = trained
    x = torch.randn(2, 64, 512)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = machine(x)
        x_back = machine.inverse(y)
    assert rel_err(x_back, x) <= 1e-2
    with torch.no_grad():
        assert rel_err(y, machine(x)) < 5e-2, "autocast output is close to the fp32 output"


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["autograd", "rebuild"])
def test_bf16_rotor_products_follow_fp32_to_bf16_rounding(trained, memory_efficient):
    """``rotor_matmul="bf16"``: the rotors' per-token products in bf16, their matrices in fp32.
    The trained machine still inverts itself and follows the fp32 one to bf16's rounding, forward
    and backward (through autograd and through the rebuild); fp64 input keeps fp64 products."""
    _, machine = trained
    low = Enigma(512, 4, 2, rotor_matmul="bf16", memory_efficient=memory_efficient)
    low.load_state_dict(machine.state_dict())
    exact = copy.deepcopy(machine)
    exact.memory_efficient = memory_efficient
    x = torch.randn(2, 64, 512)
    with torch.no_grad():
        y = low(x)
        assert 1e-5 < rel_err(low.inverse(y), x) <= 2e-3, "bf16 rounding, and only that"
        assert rel_err(low(y), x) <= 2e-3
        assert rel_err(y, exact(x)) <= 2e-3
    grads = []
    for m in (exact, low):
        xx = x.clone().requires_grad_(True)
        (m(xx) * torch.linspace(-1, 1, 512)).sum().backward()
        grads.append((xx.grad, m.rotors.lower.grad, m.blocks[0].f[0].weight.grad))
    for want, got in zip(*grads, strict=True):
        assert rel_err(got, want) <= 2e-2
    wide = copy.deepcopy(low).double()
    x64 = x.double()
    with torch.no_grad():
        assert rel_err(wide.inverse(wide(x64)), x64) <= 1e-12


def test_bf16_autocast_backward_runs_rotor_solves_in_fp32():
    machine = _moved(Enigma(64, 2, 2, rotor_positions=8))
    x = torch.randn(2, 16, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = machine(x)
    assert y.dtype == torch.float32
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and machine.rotors.lower.grad.abs().sum() > 0


def test_compiled_machine_is_one_graph():
    """Training compiles the machine on GPUs (``compile_machine``) when it backpropagates by
    plain autograd: its forward and the custom backward of every part (the rotors' inverse, the
    permutations) trace into one graph. A break would put a Python round trip into every call
    and split the fused kernels around it."""
    torch._dynamo.reset()
    machine = _moved(Enigma(32, 2, 2, rotor_positions=4, memory_efficient=False))
    x = torch.randn(2, 8, 32, requires_grad=True)
    explained = torch._dynamo.explain(machine)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), [
        str(b.reason).splitlines()[0] for b in explained.break_reasons
    ]


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_one_machine_call_forms_its_rotor_matrices_once(monkeypatch, memory_efficient):
    """``F`` and ``F^-1`` share the rotor matrices: one ``W - I`` and one solve per call, and the
    gradients are those of the stack used twice (the rebuild forms its own, once, in backward)."""
    from enigma.invertible.rotor import DynamicInvertibleConv1x1Stack as Stack

    machine = _moved(Enigma(32, 2, 2, rotor_positions=4, memory_efficient=memory_efficient))
    calls = {"_deviation": 0, "_solve_inverse": 0}
    for name in calls:
        original = getattr(Stack, name)

        def counted(self, *args, _original=original, _name=name):
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(Stack, name, counted)
    x = torch.randn(2, 8, 32, dtype=torch.float64, requires_grad=True)
    y = machine.double()(x)
    assert calls == {"_deviation": 1, "_solve_inverse": 1}
    grads = torch.autograd.grad(y.square().sum(), [x, machine.rotors.lower])
    once = {name: 1 + memory_efficient for name in calls}  # the rebuild: once more, in backward
    assert calls == once
    # Against the parts called one by one: each rotor call forms its own matrices.
    pos, rotors = torch.arange(8), machine.rotors
    z = rotors(machine.plugboard(x, pos), pos)
    for block in machine.blocks:
        z = block(z, pos)
    z = machine.reflector(z, pos)
    for block in reversed(machine.blocks):
        z = block(z, pos, reverse=True)
    z = machine.plugboard(rotors(z, pos, reverse=True), pos, reverse=True)
    assert calls == {
        "_deviation": once["_deviation"] + 2,
        "_solve_inverse": once["_solve_inverse"] + 1,
    }
    torch.testing.assert_close(z, y, rtol=0, atol=1e-12)
    expected = torch.autograd.grad(z.square().sum(), [x, rotors.lower])
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"d": 15}, "d=15"),
        ({"d": 20, "rotor_positions": 16}, "rotor_positions=16"),
        ({"d": 16, "num_rotors": -1}, "num_rotors"),
        ({"d": 16, "coupling": "spline"}, "coupling"),
        ({"d": 16, "rotor_matmul": "fp8"}, "matmul"),
    ],
)
def test_bad_construction_names_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Enigma(**kwargs)


def test_bad_positions_shape_is_rejected():
    machine = Enigma(16, 1, 1, rotor_positions=4)
    with pytest.raises(ValueError, match="positions of shape"):
        machine(torch.randn(2, 5, 16), torch.arange(7))
    with pytest.raises(ValueError, match="integer"):
        machine(torch.randn(2, 5, 16), torch.arange(5.0))
    with pytest.raises(ValueError, match="d=16"):
        machine(torch.randn(2, 5, 8))


def test_parts_can_be_left_out():
    x = torch.randn(2, 6, 16)
    bare = Enigma(16, num_rev_blocks=0, num_rotors=0)
    assert rel_err(bare(bare(x)), x) < 1e-6
    open_map = Enigma(16, num_rev_blocks=0, num_rotors=0, involutive=False)
    torch.testing.assert_close(open_map(x), x[..., open_map.plugboard.wiring])

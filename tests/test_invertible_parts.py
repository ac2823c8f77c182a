"""Plugboard, rotors, coupling blocks and reflector: inverse, log-det, stepping."""

import pytest
import torch
from conftest import jacobian_log_det, perturb, rel_err

from enigma import (
    DynamicInvertibleConv1x1Stack,
    InvertibleConv1x1,
    InvertibleConv1x1Stack,
    Plugboard,
    Reflector,
    RevBlock,
)

D = 16


def _perturbed(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    return perturb(module, scale, seed=1)


PARTS = {
    "plugboard": lambda: Plugboard(D, num_plugs=5, seed=3),
    "conv1x1": lambda: _perturbed(InvertibleConv1x1(D)),
    "conv1x1_orthogonal": lambda: _perturbed(InvertibleConv1x1(D, init="orthogonal")),
    "conv1x1_stack": lambda: _perturbed(InvertibleConv1x1Stack(D, 3)),
    "rotors": lambda: _perturbed(DynamicInvertibleConv1x1Stack(D, 2, rotor_positions=4)),
    "additive": lambda: _perturbed(RevBlock(D, "additive")),
    "affine": lambda: _perturbed(RevBlock(D, "affine")),
    "reflector": lambda: _perturbed(Reflector(D, num_reflections=3)),
}


@pytest.fixture(params=sorted(PARTS))
def part(request):
    torch.manual_seed(0)
    return PARTS[request.param]().double()


def test_inverse_undoes_forward(part):
    x = torch.randn(2, 20, D, dtype=torch.float64)
    y, log_det = part.forward_and_log_det(x)
    x_back, inv_log_det = part.inverse_and_log_det(y)
    assert y.shape == x.shape and log_det.shape == x.shape[:-1]
    assert rel_err(x_back, x) < 1e-12
    torch.testing.assert_close(inv_log_det, -log_det, atol=1e-10, rtol=0)
    assert rel_err(y, x) > 1e-3, "the part should not be the identity after perturbation"


@pytest.mark.parametrize("position", [0, 1, 5, 17])
def test_log_det_matches_jacobian(part, position):
    x = torch.randn(D, dtype=torch.float64)
    _, log_det = part.forward_and_log_det(x[None], torch.tensor(position))
    assert abs(log_det.item() - jacobian_log_det(part, x, position)) < 1e-4
    y = part(x[None], torch.tensor(position))[0]
    _, inv_log_det = part.inverse_and_log_det(y[None], torch.tensor(position))
    assert abs(inv_log_det.item() - jacobian_log_det(part, y, position, reverse=True)) < 1e-4


def test_plugboard_is_a_product_of_disjoint_swaps():
    board = Plugboard(26, num_plugs=10, seed=7)
    wiring = board.wiring
    assert torch.equal(wiring[wiring], torch.arange(26))
    assert int((wiring != torch.arange(26)).sum()) == 20
    x = torch.randn(4, 26)
    assert torch.equal(board(board(x)), x)


def test_rotor_is_shift_conjugated_weight():
    """At offset k a rotor applies S^-k W S^k, S shifting channels by d / rotor_positions."""
    rotors = _perturbed(DynamicInvertibleConv1x1Stack(D, 1, rotor_positions=4)).double()
    w = rotors.weights(torch.float64)[0]
    x = torch.randn(D, dtype=torch.float64)
    block = D // 4
    for k in range(6):
        expected = torch.roll(w @ torch.roll(x, (k % 4) * block), -(k % 4) * block)
        torch.testing.assert_close(rotors(x[None], torch.tensor(k))[0], expected)


def test_odometer_stepping_and_period():
    rotors = _perturbed(DynamicInvertibleConv1x1Stack(D, 2, rotor_positions=4)).double()
    x = torch.randn(1, D, dtype=torch.float64).expand(40, D)
    y = rotors(x, torch.arange(40))
    assert not torch.allclose(y[0], y[1]), "the fast rotor steps every token"
    assert not torch.allclose(y[0], y[4]), "the slow rotor steps after `rotor_positions` tokens"
    assert rotors.period == 16
    torch.testing.assert_close(y[:24], y[16:40], rtol=0, atol=1e-12)


def test_conv1x1_inverse_uses_no_dense_inverse(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("dense inverse/det called in the rotor")

    for name in ("inv", "det", "slogdet"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    monkeypatch.setattr(torch, "inverse", forbidden)
    monkeypatch.setattr(torch, "det", forbidden)
    rotors = _perturbed(DynamicInvertibleConv1x1Stack(D, 2, rotor_positions=4))
    x = torch.randn(3, 8, D)
    assert rel_err(rotors.inverse(rotors(x)), x) < 1e-5


def test_rotor_inverse_gradients_match_finite_differences():
    """The inverse's backward is the matrix inverse's (two products, not the solves'): checked
    against finite differences through ``F^-1`` and ``F`` together, in fp64."""
    rotors = _perturbed(DynamicInvertibleConv1x1Stack(8, 2, rotor_positions=4)).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    names = ("lower", "upper", "log_s")

    def both_ways(*params):
        state = dict(zip(names, params, strict=True))
        back = torch.func.functional_call(rotors, state, (x,), {"reverse": True})
        return back + torch.func.functional_call(rotors, state, (x.flip(-1),))

    start = [getattr(rotors, n).detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(both_ways, start)


@pytest.mark.parametrize("name", ["plugboard", "rotors"])
def test_permutations_backpropagate_by_permuting_back(name):
    """The plugboard's swaps and the rotors' turns are gathers whose gradient is the gather
    back: the input gradient matches finite differences both ways, and backward scatters
    nothing (no zero-fill and atomic scatter-add on a GPU)."""
    from enigma.benchmarks.machine_cost import OpCounter

    part = PARTS[name]().double()
    x = torch.randn(2, 6, D, dtype=torch.float64, requires_grad=True)
    for reverse in (False, True):
        assert torch.autograd.gradcheck(lambda t, r=reverse: part(t, reverse=r), (x,))
    with OpCounter() as ops:
        part(x).square().sum().backward()
    assert ops.counts["gather"] + ops.counts["index_select"] > 0
    assert not {"scatter", "scatter_add", "index_add", "index_put"} & set(ops.counts)


def test_coupling_blocks_start_as_identity():
    for coupling in ("additive", "affine"):
        block = RevBlock(D, coupling)
        x = torch.randn(5, D)
        y, log_det = block.forward_and_log_det(x)
        assert torch.equal(y, x) and torch.all(log_det == 0)


def test_affine_log_scale_is_bounded():
    block = _perturbed(RevBlock(D, "affine", scale_bound=0.5), scale=50.0)
    _, log_det = block.forward_and_log_det(torch.randn(7, D))
    assert log_det.abs().max() <= 0.5 * D + 1e-4


def test_reflector_is_symmetric_orthogonal_involution():
    refl = Reflector(D, num_reflections=3).double()
    u = refl(torch.eye(D, dtype=torch.float64))
    torch.testing.assert_close(u, u.T)
    torch.testing.assert_close(u @ u, torch.eye(D, dtype=torch.float64))

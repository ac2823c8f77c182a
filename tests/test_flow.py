"""EnigmaFlow: a normalised density, finite samples, maximum-likelihood training."""

import math

import pytest
import torch
from conftest import perturb

from enigma import Enigma, EnigmaFlow
from enigma.models.flow import fit


def _flow_2d(involutive: bool) -> EnigmaFlow:
    torch.manual_seed(0)
    machine = Enigma(2, 3, 1, rotor_positions=2, involutive=involutive, coupling="affine").double()
    return EnigmaFlow(perturb(machine, 0.3))


@pytest.mark.parametrize("involutive", [False, True])
def test_density_integrates_to_one(involutive):
    flow = _flow_2d(involutive)
    axis = torch.linspace(-10, 10, 801, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        mass = flow.log_prob(grid).exp().sum() * (axis[1] - axis[0]) ** 2
    assert abs(mass.item() - 1) < 0.02
    samples = flow.sample(500)
    assert torch.isfinite(flow.log_prob(samples)).all()


def test_log_prob_is_change_of_variables():
    flow = _flow_2d(False)
    x = torch.randn(7, 2, dtype=torch.float64)
    z = flow.machine(x)
    jac = torch.stack(
        [torch.autograd.functional.jacobian(lambda v: flow.machine(v[None])[0], row) for row in x]
    )
    expected = -0.5 * (z.square().sum(-1) + 2 * math.log(2 * math.pi)) + jac.det().abs().log()
    torch.testing.assert_close(flow.log_prob(x), expected)


def test_maximum_likelihood_training_lowers_the_nll():
    torch.manual_seed(0)
    data = (
        torch.randn(4096, 4)
        @ torch.tensor([[2.0, 0, 0, 0], [1.5, 0.3, 0, 0], [0, 0, 0.5, 0], [0, 0, 1, 1]])
        + 3.0
    )
    flow = EnigmaFlow(Enigma(4, 2, 2, rotor_positions=2, involutive=False, coupling="affine"))

    def batches():
        while True:
            yield data[torch.randint(0, len(data), (256,))]

    before = -flow.log_prob(data).mean().item()
    losses = fit(flow, batches(), steps=300, lr=3e-3)
    after = -flow.log_prob(data).mean().item()
    assert after < before - 1.0 and math.isfinite(losses[-1])


def test_unknown_prior_is_rejected():
    with pytest.raises(ValueError, match="prior"):
        EnigmaFlow(Enigma(4, 1, 1, rotor_positions=2), prior="laplace")

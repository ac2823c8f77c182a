"""Shared checks for invertible modules, and one Ray cluster per test module."""

import pytest
import torch


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray instance shared by one test module (starting one costs seconds)."""
    import ray

    from enigma.ray_setup import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def jacobian_log_det(module, x: torch.Tensor, position: int, reverse: bool = False) -> float:
    """slogdet of the autograd Jacobian of one token's map at ``position``."""
    pos = torch.tensor(position)

    def token_map(v):
        return module(v[None], pos, reverse=reverse)[0]

    jac = torch.autograd.functional.jacobian(token_map, x)
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign != 0
    return logabs.item()

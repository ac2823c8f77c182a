"""Shared checks for invertible modules."""

import torch


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

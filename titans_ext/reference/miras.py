"""MIRAS pieces of the references (docs/miras.md §2), written literally in PyTorch.

The token loop differentiates a per-token loss with autograd (:func:`objective_loss`); the
chunked reference applies the error map f(r) directly (:func:`objective_error`), as the
kernels do. Comparing the two checks the f column of the objectives table.
"""

import torch

from ..ops.checks import KL_LOG_FLOOR


def objective_loss(objective, r, delta):
    """Per-token loss summed over everything, whose gradient in r is the error map f(r).

    ``r``: residuals ``[..., Dv]``; ``delta``: same shape or None. Yaad's switch is not the
    gradient of one loss, but a per-token choice between two losses gives it: ``||r||^2`` when
    ``||r|| <= delta``, else ``2 delta ||r||_1`` (the mask carries no gradient).
    """
    kind = objective.kind
    if kind == "l2":
        return r.square().sum()
    if kind == "lp":
        return (r.square() + objective.eps).pow(objective.p / 2).sum()
    if kind == "huber":
        return torch.where(r.abs() <= delta, r.square(), 2 * delta * r.abs() - delta.square()).sum()
    if kind == "pseudo_huber":
        return (2 * delta.square() * (torch.sqrt(1 + (r / delta).square()) - 1)).sum()
    inside = torch.linalg.vector_norm(r, dim=-1, keepdim=True) <= delta
    return torch.where(inside, r.square(), 2 * delta * r.abs()).sum()


def objective_error(objective, r, delta):
    """The error map f(r) of docs/miras.md §2.1, elementwise except for yaad's per-token norm."""
    kind = objective.kind
    if kind == "l2":
        return 2 * r
    if kind == "lp":
        return objective.p * r * (r.square() + objective.eps).pow(objective.p / 2 - 1)
    if kind == "huber":  # at |r| = delta the inside branch (torch.clamp's gradient convention)
        return 2 * torch.where(r.abs() <= delta, r, delta * torch.sign(r))
    if kind == "pseudo_huber":
        return 2 * r / torch.sqrt(1 + (r / delta).square())
    inside = torch.linalg.vector_norm(r, dim=-1, keepdim=True) <= delta
    return torch.where(inside, 2 * r, 2 * delta * torch.sign(r))


def lq_scale(accumulator, q):
    """The "lq" retention's scale rho0 = ``||A||_q^(2-q)`` of each ``[..., Dv, Dk]`` accumulator
    (entrywise q-norm), shaped ``[..., 1, 1]``: the chunk's weights are ``rho0 * A``
    (``docs/miras.md`` §2.3). It is 1 where A = 0, where the scale has no limit for q > 2."""
    power_sum = accumulator.abs().pow(q).sum(dim=(-2, -1), keepdim=True)
    # The where keeps pow's gradient finite at A = 0 (abs().pow(q)'s is 0 there for q > 1).
    return torch.where(power_sum > 0, power_sum, torch.ones_like(power_sum)).pow((2 - q) / q)


def kl_update(memory, momentum, alpha):
    """Memora's step ``softmax((1 - alpha) log max(M, floor) + S)`` over the Dk axis (rows)."""
    logits = (1 - alpha) * torch.log(memory.clamp_min(KL_LOG_FLOOR)) + momentum
    return torch.softmax(logits, dim=-1)


def kl_initial_memory(like):
    """The default "kl" memory: uniform rows, 1 / Dk, shaped like ``like`` ``[..., Dv, Dk]``."""
    return torch.full_like(like, 1.0 / like.shape[-1])

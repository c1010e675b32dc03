"""The MIRAS options the linear and MLP memory tests run (objective constructors from a delta,
ignored by the objectives without one, and retentions, by test id) and their shared harness."""

import torch

from titans_ext.ops.checks import expand_delta, parse_objective, parse_retention

from utils import TOLERANCE, assert_close, random_cotangents

OBJECTIVES = {
    "l2": lambda delta: "l2",
    "lp3": lambda delta: ("lp", 3),
    "lp4": lambda delta: ("lp", 4.0, 0.0),
    "lp1.5": lambda delta: ("lp", 1.5, 1e-3),
    "lp1": lambda delta: ("lp", 1, 1e-2),
    "huber": lambda delta: ("huber", delta),
    "pseudo_huber": lambda delta: ("pseudo_huber", delta),
    "yaad": lambda delta: ("yaad", delta),
}
RETENTIONS = {"l2": "l2", "lq4": ("lq", 4), "lq3": ("lq", 3.0), "kl": "kl"}


def needs_delta(objective):
    return objective in ("huber", "pseudo_huber", "yaad")


def values_and_grads(outs, wrt):
    """``outs`` detached, then the gradients in ``wrt`` of a random functional of them."""
    loss = sum((a * b).sum() for a, b in zip(outs, random_cotangents(outs)))
    return [x.detach() for x in outs] + list(torch.autograd.grad(loss, wrt))


def compare(names, ref, out, ratio):
    assert len(ref) == len(out)
    for name, r, o in zip(names, ref, out):
        assert_close(name, r, o, ratio)


def op_miras_args(objective, retention, v, state_dtype):
    """The ops' trailing MIRAS arguments for ``objective`` (a parsed-able option, its delta included)
    and ``retention``: delta expanded to v's ``[B, T, H, Dv]`` in the state dtype, contiguous."""
    objective, retention = parse_objective(objective), parse_retention(retention)
    delta = expand_delta(objective, v.shape, v.device, state_dtype)
    return (objective.code, objective.p, objective.eps, None if delta is None else delta.contiguous(),
            retention.code, retention.q)


def assert_matches(names, ref, out, dtype, ratio=None, largest=0.03):
    """Relative RMS within TOLERANCE[dtype] (or ratio) and, for bf16 / fp16, the largest error
    within `largest` of the reference's largest entry."""
    assert len(ref) == len(out)
    for name, r, x in zip(names, ref, out):
        assert_close(name, r, x, ratio or TOLERANCE[dtype])
        if dtype in (torch.bfloat16, torch.float16):
            worst, scale = (r - x.double()).abs().max().item(), r.abs().max().item()
            assert worst <= largest * scale, (f"{name}: largest error {worst:.3e} > {largest:.0%} of the largest "
                                              f"entry {scale:.3e}")

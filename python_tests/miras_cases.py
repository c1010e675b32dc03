"""The MIRAS options the linear and MLP memory tests run (objective constructors from a delta,
ignored by the objectives without one, and retentions, by test id) and their shared harness."""

import torch

from utils import assert_close, random_cotangents

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

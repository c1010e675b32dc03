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


def yaad_delta_clear_of_the_switch(inputs, init, chunk_size, retention="l2", per_token=False, seed=0):
    """Yaad thresholds for the linear memory's inputs ``[q, k, v, theta, eta, alpha]`` that sit a
    factor 0.6 or 1.5 (at random) from each token's residual norm at its chunk-start weights, so that
    16-bit rounding cannot flip the switch (a flip moves an error by up to 2 delta): both branches
    occur, none near its edge. Built chunk by chunk on the float64 reference (lq: the residual at
    rho0 A0; kl: the lag token's at the memory before it, the rest's at the lagged memory). Returns
    delta ``[B, T, H, Dv]`` (``[B, T, H]`` with ``per_token``), float64."""
    from titans_ext.reference import linear_memory_chunked
    q, k, v, theta, eta, alpha = (x.double() for x in inputs)
    B, T, H, Dv = v.shape
    m, s = (torch.zeros(B, H, Dv, k.shape[-1], dtype=torch.float64) for _ in range(2)) if init is None \
        else (x.double() for x in init)
    retention = parse_retention(retention)
    if init is None and retention.kind == "kl":  # the default kl memory, uniform rows
        m = torch.full_like(m, 1 / k.shape[-1])
    g = torch.Generator().manual_seed(seed)
    pieces = []

    def clear_of(weights, rows):
        norm = (torch.einsum("bthk,bhvk->bthv", k[:, rows], weights) - v[:, rows]).norm(dim=-1)  # [B, L, H]
        shape = norm.shape if per_token else (*norm.shape, Dv)
        factor = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.5, 0.6, 1.5)
        pieces.append(factor * (norm if per_token else norm[..., None]))
        return pieces[-1]

    def advance(rows, state, delta, retention):  # the state after tokens `rows`, one chunk
        _, state = linear_memory_chunked(q[:, rows], k[:, rows], v[:, rows], theta[:, rows], eta[:, rows],
                                         alpha[:, rows], chunk_size=rows.stop - rows.start, initial_state=state,
                                         output_final_state=True, objective=("yaad", delta), retention=retention)
        return state

    for t0 in range(0, T, chunk_size):
        end = min(t0 + chunk_size, T)
        if retention.kind == "kl":  # the lag token, then an l2 chunk from the lagged memory
            lag = slice(t0, t0 + 1)
            m, s = advance(lag, (m, s), clear_of(m, lag), retention)
            if end > t0 + 1:
                rest = slice(t0 + 1, end)
                m, s = advance(rest, (m, s), clear_of(m, rest), "l2")
            continue
        rows = slice(t0, end)
        weights = m
        if retention.kind == "lq":
            power = m.abs().pow(retention.q).sum(dim=(-2, -1), keepdim=True)
            weights = m * torch.where(power > 0, power.pow((2 - retention.q) / retention.q), torch.ones_like(power))
        m, s = advance(rows, (m, s), clear_of(weights, rows), retention)
    return torch.cat(pieces, dim=1)

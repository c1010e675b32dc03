"""Packed variable-length sequences (``cu_seqlens``, ``docs/design.md`` §6) in the references.

Their meaning is a definition: each sequence of the packed batch runs as its own call, from its
own row of the initial state, and returns its own row of the final state. :func:`per_sequence`
wraps a reference that has no ``cu_seqlens`` so that it takes one, by doing literally that.
"""

import functools

import torch

from ..ops.checks import Objective, check_cu_seqlens, expand_delta, parse_objective


def _rows(state, i):
    """Row i (kept as a batch of one) of every tensor of a nested tuple of states; None stays."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state[i:i + 1]
    return type(state)(_rows(x, i) for x in state)


def _cat_rows(states):
    """The nested states of the sequences, concatenated along their batch dimension."""
    first = states[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(states, dim=0)
    return tuple(_cat_rows([s[j] for s in states]) for j in range(len(first)))


def per_sequence(state_args):
    """Decorates a reference ``fn(q, k, v, theta, eta, alpha, *positional_states, **options)`` with
    a ``cu_seqlens=None`` keyword: with offsets, each sequence runs as its own call of fn on its
    tokens and its row of each state argument (``state_args``: the names of those among the
    keywords; positional ones after the gates are states too), and the outputs and final states
    are concatenated. An objective's delta is broadcast to every token first, then sliced."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(q, k, v, theta, eta, alpha, *states, cu_seqlens=None, output_final_state=False, **options):
            if cu_seqlens is None:
                return fn(q, k, v, theta, eta, alpha, *states, output_final_state=output_final_state, **options)
            n_seqs = check_cu_seqlens(cu_seqlens, q)
            offsets = cu_seqlens.tolist()
            objective = parse_objective(options.pop("objective", "l2"))
            dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            delta = expand_delta(objective, (*q.shape[:3], v.shape[-1]), q.device, dtype)
            outputs, finals = [], []
            for i in range(n_seqs):
                tokens = slice(offsets[i], offsets[i + 1])
                sliced = Objective(objective.kind, objective.p, objective.eps,
                                   None if delta is None else delta[:, tokens])
                keyword_states = {name: _rows(options[name], i) for name in state_args if name in options}
                o, final = fn(*(x[:, tokens] for x in (q, k, v, theta, eta, alpha)), *_rows(states, i),
                              output_final_state=True, objective=sliced, **{**options, **keyword_states})
                outputs.append(o)
                finals.append(final)
            return torch.cat(outputs, dim=1), (_cat_rows(finals) if output_final_state else None)

        return run

    return wrap

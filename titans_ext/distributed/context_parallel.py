"""Context parallel linear memory: one sequence split across the ranks of a process group.

The chunk-to-chunk step of the l2 linear memory is affine in the state (``docs/design.md`` §2),
and so is a whole segment of chunks. Every value row j of the state evolves on its own, as the
combined row ``x_j = [m_j | s_j]`` (2 Dk wide): a segment maps a start state X (``[Dv, 2Dk]``, rows
x_j) to its end state ``X P + Q`` and its outputs to ``O_0 + X G``, where P (``[2Dk, 2Dk]``) and G
(``[T, 2Dk]``, one row per token) depend only on the keys, queries and gates, and Q, O_0 are the
segment run from the zero state. One call of the op gives all four: its value rows are the 2 Dk
identity rows (M0 = [I; 0], S0 = [0; I], v = 0), whose end states are the rows of P and whose
outputs are G, followed by the Dv real rows from the zero state, whose end state is Q and whose
outputs are O_0.

Forward, on rank r of R: that call on the rank's shard; an all-gather of the maps (P_s, Q_s);
the start state ``X_r = X_{r-1} P_{r-1} + Q_{r-1}`` composed over the earlier ranks in the state
dtype (fp32, fp64 for fp64 inputs); then ``O = O_0 + X_r G``, and on the last rank the final
state ``X P + Q``. Rank 0 knows its start state (the initial state), so the map it sends is
already applied to it. Backward, the adjoint: the cotangent of each rank's start state is
all-gathered and carried back through the composed maps, in reverse; what reaches rank r's maps
becomes the cotangent of its call's end states, and the op's own backward does the rest.

Since the outputs are affine in the start state too, there is no rerun from the true start state:
each rank runs the op once forward and once backward, on 2 Dk + Dv value rows.
"""

import torch
import torch.distributed as dist

from ..ops import linear_memory
from ..ops.checks import check_linear_inputs, parse_objective, parse_retention, state_dtype_for


def _all_gather(tensor, group, world_size):
    """``[R, *tensor.shape]``: every rank's tensor, in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


class _ExclusiveAffineScan(torch.autograd.Function):
    """Rank r's start state ``X_r = (...((0 P_0 + Q_0) P_1 + Q_1)...) P_{r-1} + Q_{r-1}`` (zero on rank 0).

    ``maps``: this rank's ``[B, H, N + Dv, N]``, P (``[B, H, N, N]``) on top of Q (``[B, H, Dv, N]``);
    returns ``[B, H, Dv, N]``. Every rank of the group must call it, and backpropagate through it.
    """

    @staticmethod
    def forward(ctx, maps, group, rank, world_size):
        n = maps.shape[-1]
        gathered = _all_gather(maps, group, world_size)
        start = maps.new_zeros(maps.shape[:-2] + (maps.shape[-2] - n, n))
        for s in range(rank):
            start = start @ gathered[s, :, :, :n] + gathered[s, :, :, n:]
        ctx.save_for_backward(start, gathered[rank + 1:, :, :, :n].contiguous())  # a copy: frees the rest
        ctx.group, ctx.rank, ctx.world_size = group, rank, world_size
        return start

    @staticmethod
    def backward(ctx, d_start):
        start, later_transitions = ctx.saved_tensors
        d_starts = _all_gather(d_start, ctx.group, ctx.world_size)
        # The cotangent of the next rank's start state: X_{s+1} = X_s P_s + Q_s gives
        # dX_s += dX_{s+1} P_s^T, summed from the last rank down to r + 1.
        d_next = torch.zeros_like(d_start)
        for s in range(ctx.world_size - 1, ctx.rank, -1):
            transition = later_transitions[s - ctx.rank - 1]
            d_next = d_starts[s] + d_next @ transition.transpose(-1, -2)
        d_maps = torch.cat([start.transpose(-1, -2) @ d_next, d_next], dim=-2)
        return d_maps, None, None, None


def segment_map(q, k, v, theta, eta, alpha, *, chunk_size, read):
    """The affine map of one segment: ``(P, Q, G, O_0)``, from one call of the op.

    A start state X (``[B, H, Dv, 2Dk]``, the rows ``[m_j | s_j]`` of ``(M, S)``) gives the end
    state ``X P + Q`` and the outputs ``O_0 + X G``: ``P [B, H, 2Dk, 2Dk]`` and ``Q [B, H, Dv, 2Dk]``
    in the state dtype, ``G [B, T, H, 2Dk]`` and ``O_0 [B, T, H, Dv]`` in q's dtype. Differentiable.
    Exact for the l2 objective and retention only (the others are not affine in the state).
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    n = 2 * Dk
    state_dtype = state_dtype_for(q.dtype)
    identity = torch.eye(n, dtype=state_dtype, device=q.device)
    zero_rows = identity.new_zeros(Dv, Dk)
    m0 = torch.cat([identity[:, :Dk], zero_rows]).expand(B, H, n + Dv, Dk).contiguous()  # [I; 0; 0]
    s0 = torch.cat([identity[:, Dk:], zero_rows]).expand(B, H, n + Dv, Dk).contiguous()  # [0; I; 0]
    rows_v = torch.cat([v.new_zeros(B, T, H, n), v], dim=-1)
    o, (m_end, s_end) = linear_memory(q, k, rows_v, theta, eta, alpha, chunk_size=chunk_size, initial_state=(m0, s0),
                                      output_final_state=True, read=read)
    end = torch.cat([m_end, s_end], dim=-1)
    return end[:, :, :n], end[:, :, n:], o[..., :n], o[..., n:]


def _check_args(q, k, v, theta, eta, alpha, chunk_size, read, initial_state, objective, retention, group):
    # The gates' values are checked by the op itself, in segment_map, still before any collective.
    check_linear_inputs(q, k, v, theta, eta, alpha, chunk_size, read, initial_state, check_values=False)
    if parse_objective(objective).kind != "l2":
        raise ValueError(f'objective: context parallel supports only "l2", got {objective!r} (the other objectives '
                         "make a segment's map non-affine in its start state, so maps cannot be composed)")
    if parse_retention(retention).kind != "l2":
        raise ValueError(f'retention: context parallel supports only "l2", got {retention!r} (lq rescales the memory and '
                         "kl takes a softmax step at every chunk start, so a segment's map is not affine in its "
                         "start state)")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("group: torch.distributed is not initialized (call torch.distributed.init_process_group)")
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the group")
    T = q.shape[1]
    if rank < world_size - 1 and T % chunk_size != 0:
        raise ValueError(f"q: the shard of rank {rank} of {world_size} has T = {T} tokens; every shard but the last "
                         f"must be a multiple of chunk_size = {chunk_size}, so that chunks start where they would "
                         "in one call")
    return rank, world_size


def linear_memory_cp(q, k, v, theta, eta, alpha, *, group, chunk_size=64, initial_state=None,
                     output_final_state=False, read="token", objective="l2", retention="l2"):
    r"""Context parallel :func:`titans_ext.linear_memory`: one sequence, sharded over the ranks of ``group``.

    Each rank passes its own contiguous shard of the time axis, shards in rank order (rank 0 holds
    the first tokens); the outputs are those of one call on the whole sequence, shard by shard,
    and gradients flow as in that call. Every shard but the last must be a multiple of
    ``chunk_size`` (shards may differ in length; a shard may be empty).

    Each rank runs the op once on its shard, with 2 Dk extra value rows that give the shard's
    affine state map; the maps are all-gathered and composed in the state dtype (fp32, fp64 for
    fp64 inputs), so the collectives carry ``B H (2Dk + Dv) 2Dk`` numbers per rank forward and
    ``B H Dv 2Dk`` backward, whatever the shard length. Works with any backend (NCCL on GPUs,
    gloo on CPUs) and on any device the op supports, and under ``torch.compile``; it adds no host
    synchronization to the op's (none on CUDA unless ``TITANS_EXT_CHECK_VALUES=1``).

    Every rank of ``group`` must call it with the same B, H, Dk, Dv, dtype, chunk_size and read
    (and the same need for gradients), and every rank must backpropagate through its results when
    any does: both directions are collectives. Argument errors are raised before any collective,
    on the rank whose arguments are wrong.

    Args:
        q, k, v, theta, eta, alpha: this rank's shard, shapes as in :func:`titans_ext.linear_memory`
            (``[B, T_r, H, Dk]``, ``[B, T_r, H, Dv]``, ``[B, T_r, H]``).
        group: the ``torch.distributed`` process group over which the sequence is split (None: the
            default group). Ranks are the group's ranks.
        chunk_size: tokens per chunk, counted from the start of the whole sequence.
        initial_state: ``(M0, S0)``, each ``[B, H, Dv, Dk]``, or None for zeros. Read on rank 0 only:
            the other ranks may pass the same one (it is checked, then ignored: no gradient there).
        output_final_state: return ``(M_T, S_T)`` of the whole sequence on the last rank (None on
            the others).
        read: ``"token"`` or ``"chunk_start"``.
        objective, retention: only ``"l2"``; the MIRAS options make the chunk map non-affine
            (a ValueError names them). The MLP memory has no context parallel form.

    Returns:
        ``(o, final_state)`` as :func:`titans_ext.linear_memory` returns them for this shard.
    """
    rank, world_size = _check_args(q, k, v, theta, eta, alpha, chunk_size, read, initial_state, objective,
                                   retention, group)
    Dk = q.shape[-1]
    P, Q, G, o_zero = segment_map(q, k, v, theta, eta, alpha, chunk_size=chunk_size, read=read)
    initial = None if rank != 0 or initial_state is None else torch.cat([x.to(P.dtype) for x in initial_state], -1)
    # Rank 0 knows its start state: the map it sends goes straight to its shard's end state X_0 P_0 + Q_0.
    sent = torch.cat([P, Q if initial is None else initial @ P + Q], dim=-2)
    start = _ExclusiveAffineScan.apply(sent, group, rank, world_size)
    if initial is not None:
        start = start + initial
    o = (o_zero.to(start.dtype) + torch.einsum("bhvn,bthn->bthv", start, G.to(start.dtype))).to(q.dtype)
    final_state = None
    if output_final_state and rank == world_size - 1:
        end = start @ P + Q
        final_state = (end[..., :Dk].contiguous(), end[..., Dk:].contiguous())
    return o, final_state

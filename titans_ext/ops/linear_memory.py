"""``titans_ext.linear_memory``: the public op, its fake (meta) kernel and its autograd.

The compiled library registers two operators, ``titans_ext::linear_memory_fwd`` and
``titans_ext::linear_memory_bwd`` (csrc/binding/ops.cpp). The forward returns the chunk-start
states the backward needs; autograd is attached here with ``torch.library.register_autograd``,
so both directions are visible to torch.compile and checked by ``torch.library.opcheck``.
"""

import json

import torch

from .checks import (OBJECTIVES, RETENTIONS, check_linear_inputs, check_miras_args, chunk_slots, parse_objective,
                     parse_retention, state_dtype_for, state_rows)
from .cuda_arch import check_fake_device, check_op_device

# Limits of the CUDA kernels (csrc/cuda/linear_memory_fwd.h): a chunk's tiles and the key
# dimension of the state rows live in shared memory. Dv is split into tiles and is not limited,
# except under the whole-state options below.
CUDA_MAX_CHUNK_SIZE = 64
CUDA_MAX_KEY_DIM = 128


# The whole-state options (docs/kernels.md §6.1.12): objective "yaad" (its switch reads a token's
# residual norm over all of Dv) and retention "lq" (rho0 is the q-norm of the whole state) run one
# block over all of Dv and keep every chunk's checkpoint.


def _whole_state(objective_code, retention_code):
    return objective_code == OBJECTIVES.index("yaad") or retention_code == RETENTIONS.index("lq")


def _check_cuda_limits(q, v, chunk_size, objective, retention):
    if chunk_size > CUDA_MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size: the CUDA kernels support chunk sizes 1..{CUDA_MAX_CHUNK_SIZE} "
                         f"(16, 32 and 64 are the tuned sizes), got {chunk_size}")
    if q.shape[-1] > CUDA_MAX_KEY_DIM:
        raise ValueError(f"q: the CUDA kernels support key dimensions Dk <= {CUDA_MAX_KEY_DIM}, got {q.shape[-1]}")


def checkpoint_count(q, T, chunk_size, cu_seqlens=None, objective=0, retention=0):
    """How many chunk-start states the forward keeps for the backward per (batch, head), in q's
    dtype on every device (with ``cu_seqlens`` the bound :func:`~titans_ext.ops.checks.chunk_slots`):
    every chunk's on the CPU; on CUDA every chunk's for fp32 and fp64 inputs and under the
    whole-state options and kl (objective and retention codes), else every other chunk's of a
    sequence for bf16 and fp16, whose backward recomputes the rest (csrc/cuda/linear_memory_fwd.h)."""
    sixteen_bit = q.dtype in (torch.bfloat16, torch.float16)
    every_chunk = _whole_state(objective, retention) or retention == RETENTIONS.index("kl")
    stride = 2 if q.device.type == "cuda" and sixteen_bit and not every_chunk else 1
    return chunk_slots(T, chunk_size, cu_seqlens, q.device.type, stride)


@torch.library.register_fake("titans_ext::linear_memory_fwd")
def _linear_memory_fwd_fake(q, k, v, theta, eta, alpha, m0, s0, chunk_size, read_token, save_states, objective=0,
                            p=2.0, eps=0.0, delta=None, retention=0, retention_q=2.0, cu_seqlens=None):
    check_fake_device(q)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    state_dtype = state_dtype_for(q.dtype)
    o = q.new_empty(B, T, H, Dv)
    m_final = q.new_empty(state_rows(B, cu_seqlens), H, Dv, Dk, dtype=state_dtype)
    s_final = torch.empty_like(m_final)
    shape = (B, H, checkpoint_count(q, T, chunk_size, cu_seqlens, objective, retention), 2, Dv, Dk) \
        if save_states else (0,)
    return o, m_final, s_final, q.new_empty(shape)


@torch.library.register_fake("titans_ext::linear_memory_bwd")
def _linear_memory_bwd_fake(q, k, v, theta, eta, alpha, chunk_states, d_o, d_m_final, d_s_final, chunk_size,
                            read_token, objective=0, p=2.0, eps=0.0, delta=None, retention=0, retention_q=2.0,
                            cu_seqlens=None):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    state_dtype = state_dtype_for(q.dtype)
    state = q.new_empty(state_rows(B, cu_seqlens), H, Dv, Dk, dtype=state_dtype)
    # The kernels return contiguous gradients whatever the inputs' strides (empty_like would copy them).
    grads = tuple(x.new_empty(x.shape) for x in (q, k, v, theta, eta, alpha))
    return (*grads, state, torch.empty_like(state),
            q.new_empty((0,), dtype=state_dtype) if delta is None else delta.new_empty(delta.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, theta, eta, alpha, m0, s0, chunk_size, read_token, save_states = inputs[:11]
    objective, p, eps, delta, retention, retention_q, cu_seqlens = inputs[11:]  # the schema's defaults are filled in
    # Unused outputs get None, not zeros: a zero cotangent of chunk_states alone would be a fresh
    # allocation as large as the saved states (2 Dv Dk values per chunk).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, theta, eta, alpha, output[3], delta, cu_seqlens)
    ctx.chunk_size, ctx.read_token = chunk_size, read_token
    ctx.miras = (objective, p, eps, retention, retention_q)
    ctx.has_initial_state = (m0 is not None, s0 is not None)


def _backward(ctx, d_o, d_m_final, d_s_final, _d_chunk_states):
    q, k, v, theta, eta, alpha, chunk_states, delta, cu_seqlens = ctx.saved_tensors
    if chunk_states.numel() == 0 and q.shape[1] > 0:
        raise RuntimeError("linear_memory_fwd ran with save_states=False, so it cannot be differentiated; "
                           "call titans_ext.linear_memory, which saves them when a gradient is needed")
    if d_o is None:
        d_o = v.new_zeros(v.shape)
    objective, p, eps, retention, retention_q = ctx.miras
    grads = torch.ops.titans_ext.linear_memory_bwd(q, k, v, theta, eta, alpha, chunk_states, d_o, d_m_final,
                                                   d_s_final, ctx.chunk_size, ctx.read_token, objective, p, eps,
                                                   delta, retention, retention_q, cu_seqlens)
    dq, dk, dv, dtheta, deta, dalpha, dm0, ds0, d_delta = grads
    has_m0, has_s0 = ctx.has_initial_state
    return (dq, dk, dv, dtheta, deta, dalpha, dm0 if has_m0 else None, ds0 if has_s0 else None, None, None, None,
            None, None, None, None if delta is None else d_delta, None, None, None)


torch.library.register_autograd("titans_ext::linear_memory_fwd", _backward, setup_context=_setup_context)


def linear_memory(q, k, v, theta, eta, alpha, *, chunk_size=64, initial_state=None, output_final_state=False,
                  read="token", objective="l2", retention="l2", cu_seqlens=None):
    r"""Titans linear long-term memory, chunked.

    For each batch and head, the memory ``M: [Dv, Dk]`` and its momentum ``S`` learn at test
    time from the key/value stream. With ``t0`` the first token of t's chunk (chunks of
    ``chunk_size`` tokens from position 0 of this call, or of its sequence with ``cu_seqlens``;
    the last may be short)::

        u_t = f(M_{t0-1} k_t - v_t) k_t^T           # f(r) = 2r: grad of ||M k_t - v_t||^2 at the chunk start
        S_t = eta_t S_{t-1} - theta_t u_t           # surprise with momentum
        M_t = (1 - alpha_t) M_{t-1} + S_t           # forget gate
        o_t = M_t q_t   (read="token")   or   M_{t0-1} q_t   (read="chunk_start")

    ``chunk_size=1`` is the exact per-token Titans recurrence. Conventions (``docs/peers.md``
    §7): ``alpha`` is the fraction of the memory forgotten per token (flash-linear-attention's
    log-decay is ``g = log1p(-alpha)``); the loss ``||M k_t - v_t||^2`` has no 1/2 and no 1/Dv
    (fla's delta-rule ``beta = 2 theta``; titans-pytorch's mean-squared loss with learning rate
    ``lr`` is ``theta = lr / Dv``); no scale is applied to q.

    MIRAS options (``docs/miras.md`` §2) change the error map f and the retention:

    - ``objective``: ``"l2"`` (f = 2r); ``("lp", p)`` or ``("lp", p, eps)``: f = p r (r^2+eps)^(p/2-1),
      p >= 1, eps = 0 only for p >= 2; ``("huber", delta)``: f = 2 clamp(r, -delta, delta);
      ``("pseudo_huber", delta)``: f = 2r / sqrt(1 + (r/delta)^2); ``("yaad", delta)``: Yaad's
      switch, f = 2r while ||r|| <= delta, else 2 delta sign(r) (a per-channel delta compares the
      token's norm with each channel's delta). At a threshold the inside branch applies. ``delta``
      (> 0) is a float or a tensor broadcastable to ``[B, T, H]`` (scalar, per head, per token) or,
      4-d, to ``[B, T, H, Dv]``; it receives a gradient when it requires one.
    - ``retention``: ``"l2"`` (the forget gate above); ``("lq", q)``, q > 1 (Moneta,
      ``docs/miras.md`` §2.3): M is the accumulator A of the paper's ``W = A / ||A||_q^(q-2)``.
      Each chunk fixes ``rho0 = ||A_{t0-1}||_q^(2-q)`` at its start (entrywise norm of each batch
      and head's matrix; 1 where it is zero) and learns and reads with the weights ``rho0 A``:
      u_t is taken at ``rho0 A_{t0-1}``, ``o_t = rho0 A_t q_t`` (``read="chunk_start"``:
      ``rho0 A_{t0-1} q_t``), and the lines above update A itself (S is not rescaled). The
      returned state is ``(A_T, S_T)``, so a stream split at a chunk boundary equals one call;
      ``"kl"`` (Memora): the chunk's first token takes
      ``M = softmax((1 - alpha) log max(M, 1e-6) + S)`` over Dk (rows), with its own gradient at the
      previous memory; the rest of the chunk is the linear step above from that M. The memory
      must start positive (default: uniform 1/Dk). ``read="chunk_start"`` reads the memory before
      the chunk's first token.

    Args:
        q: queries ``[B, T, H, Dk]``; fp32, fp64, bf16 or fp16 (bf16/fp16 are computed in fp32).
            On CUDA, Dk <= 128, every objective with every retention and both reads
            (``docs/kernels.md`` §6.1.12).
        k: keys ``[B, T, H, Dk]`` (same dtype as q). Normalized keys keep the inner steps stable.
        v: values ``[B, T, H, Dv]`` (same dtype as q).
        theta: inner learning rate ``[B, T, H]``, >= 0.
        eta: momentum decay ``[B, T, H]``, in [0, 1].
        alpha: forget gate ``[B, T, H]``, in [0, 1]: the fraction of M forgotten per token.
        chunk_size: tokens per chunk (>= 1; on CUDA 1..64, with 16, 32 and 64 the tuned sizes).
            The default, 64, is the largest chunk the CUDA kernels take (the fewest sequential
            steps); the op does not bound the gates, so the caller bounds theta for the chunk
            size it picks (``docs/design.md`` §4.1). ``NeuralMemory`` defaults to 16
            (``docs/design.md`` §4.2).
        initial_state: ``(M0, S0)``, each ``[B, H, Dv, Dk]``, or None for zeros. The layout of
            flash-linear-attention's state ``h [N, H, K, V]`` is the transpose:
            ``M0 = h.transpose(-1, -2)``.
        output_final_state: also return ``(M_T, S_T)``.
        read: ``"token"`` or ``"chunk_start"``.
        cu_seqlens: None, or packed variable-length sequences in FlashAttention's convention
            (``docs/design.md`` §6): int32 or int64 offsets ``[N + 1]`` with B = 1, sequence i
            being tokens ``cu_seqlens[i] .. cu_seqlens[i + 1] - 1``. Each sequence runs as its own
            call: chunks restart at its first token, ``initial_state`` and the final state are
            ``[N, H, Dv, Dk]`` (one row per sequence; an empty sequence returns its initial
            state), nothing crosses a boundary. CPU and CUDA; on CUDA no launch reads the offsets
            on the host, so the default path makes no host sync.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, Dv]`` in q's dtype; ``final_state`` is
        ``(M_T, S_T)`` (fp32, fp64 for fp64 inputs) or None. Gradients flow to q, k, v, the
        gates, the initial state and delta, through both outputs.

    Raises:
        ValueError / TypeError naming the argument, for shapes, dtypes and devices always, and for
        values (gates finite and in their ranges, delta > 0, a "kl" memory with a positive entry
        per row, cu_seqlens from 0 to T and non-decreasing) where value checks run: on CPU tensors,
        or everywhere with the environment
        variable ``TITANS_EXT_CHECK_VALUES=1`` (``=0``: nowhere). On a GPU they are off by
        default, since reading values is a host sync (:func:`titans_ext.ops.checks.value_checks_enabled`).
    """
    check_op_device(q)
    B, T, H, _, Dv = check_linear_inputs(q, k, v, theta, eta, alpha, chunk_size, read, initial_state,
                                         cu_seqlens=cu_seqlens)
    state_dtype = state_dtype_for(q.dtype)
    objective, retention, delta = check_miras_args(objective, retention,
                                                   [] if initial_state is None else initial_state[:1],
                                                   (B, T, H, Dv), q.device, state_dtype)
    if q.is_cuda:
        _check_cuda_limits(q, v, chunk_size, objective, retention)
    theta, eta, alpha = (g.to(state_dtype) for g in (theta, eta, alpha))
    m0, s0 = (None, None) if initial_state is None else (x.to(state_dtype) for x in initial_state)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, theta, eta, alpha, m0, s0, delta))
    o, m_final, s_final, _ = torch.ops.titans_ext.linear_memory_fwd(
        q, k, v, theta, eta, alpha, m0, s0, chunk_size, read == "token", needs_grad, objective.code, objective.p,
        objective.eps, delta, retention.code, retention.q, cu_seqlens)
    return o, ((m_final, s_final) if output_final_state else None)


def cuda_launch_plan(batch, seqlen, heads, dk, dv, chunk_size=64, dtype=torch.bfloat16, *, read="token",
                     save_states=True, has_initial_state=False, has_final_cotangent=False, objective="l2",
                     emulated=False, n_seqs=0, retention="l2"):
    """The CUDA kernels' launch plan for a shape and dtype, as the launchers compute it.

    Returns a dict: ``device`` (SM count, shared memory), ``forward`` and, with ``save_states``
    (a gradient will be taken), ``backward``, each with ``kernels`` (name, blocks, threads,
    shared memory and the bytes it reads and writes in global memory, every tensor counted once)
    and ``buffers`` (what the direction allocates beyond its inputs and ordinary outputs: the
    forward's ``checkpoints``, the backward's ``group cotangents``; none without a gradient), and
    the chosen value tile, chunk group and slice. ``objective`` and ``retention`` (as
    ``linear_memory`` takes them, or parsed) change the launches: a non-l2 one takes one backward
    group per sequence; "yaad" and "lq" one forward block over all of Dv (``block_tiles`` value
    tiles of ``tile_v`` rows in turn) and every chunk's checkpoint. For the current CUDA device, or
    with
    ``emulated=True`` for the device the CPU emulation describes (an H100 unless
    ``torch.ops.titans_emu.set_device_limits`` says otherwise), which needs no GPU. ``n_seqs``
    > 0: the launches with ``cu_seqlens`` of that many sequences packed along ``seqlen`` (batch 1).
    """
    if emulated:
        import titans_ext._emu  # noqa: F401  (registers titans_emu::)
        op = torch.ops.titans_emu.linear_memory_plan
    else:
        op = torch.ops.titans_ext.linear_memory_plan
    return json.loads(op(batch, seqlen, heads, dk, dv, chunk_size, dtype, read == "token", save_states,
                         has_initial_state, has_final_cotangent, parse_objective(objective).code, n_seqs,
                         parse_retention(retention).code))

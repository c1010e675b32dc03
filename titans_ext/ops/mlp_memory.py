"""``titans_ext.mlp_memory``: the public op, its fake (meta) kernel and its autograd.

The compiled library registers ``titans_ext::mlp_memory_fwd`` and ``titans_ext::mlp_memory_bwd``
(csrc/binding/ops.cpp). The forward returns the chunk-start states the backward needs; autograd
is attached here with ``torch.library.register_autograd``, so both directions are visible to
torch.compile and checked by ``torch.library.opcheck``.
"""

import torch

from .checks import check_miras_args, check_mlp_inputs, chunk_slots, state_dtype_for, state_rows
from .cuda_arch import check_fake_device, check_op_device

# Limits of the CUDA kernels (csrc/cuda/mlp_memory.h): a chunk's q, k, dO tiles and its C x D and
# C x C sums live in shared memory, the state is streamed in blocks of hidden units (so E is not
# limited). What does not fit the device's shared memory raises a ValueError naming the bytes
# (check_cuda_shared_memory). Every MIRAS option runs on them.
CUDA_MAX_CHUNK_SIZE = 64
CUDA_MAX_DIM = 128


def check_cuda_limits(q, chunk_size):
    """The CUDA kernels' limits for ``mlp_memory`` on ``q.device`` (a CUDA device): a ValueError
    naming the argument, the limit and the device."""
    device = q.device
    if chunk_size > CUDA_MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size: the CUDA kernels of mlp_memory support chunk sizes 1..{CUDA_MAX_CHUNK_SIZE}, "
                         f"got {chunk_size} (q is on {device})")
    if q.shape[-1] > CUDA_MAX_DIM:
        raise ValueError(f"q: the CUDA kernels of mlp_memory support head dimensions D <= {CUDA_MAX_DIM}, "
                         f"got D={q.shape[-1]} (q is on {device})")


def check_cuda_shared_memory(q, hidden, chunk_size, read_token, retention_code, backward, plan=None,
                             max_shared_bytes=None):
    """A ValueError naming chunk_size, the bytes of shared memory needed and those ``q.device``
    allows, when no hidden block of the CUDA forward (or, with ``backward``, of the backward) fits.

    ``plan``: what the launchers choose (``torch.ops.titans_ext.mlp_memory_plan`` of a CUDA build;
    ``titans_emu::mlp_memory_plan`` has the same schema); ``max_shared_bytes``: the device's
    shared memory per block (read from its properties by default).
    """
    if plan is None:
        plan = torch.ops.titans_ext.mlp_memory_plan
    if max_shared_bytes is None:
        max_shared_bytes = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
    fwd_block, fwd_bytes, bwd_block, bwd_bytes = plan(q.shape[-1], hidden, chunk_size, q.dtype, read_token,
                                                      retention_code, max_shared_bytes)
    kernels = [("forward", fwd_block, fwd_bytes)] + ([("backward", bwd_block, bwd_bytes)] if backward else [])
    for name, block, needed in kernels:
        if block == 0:
            raise ValueError(f"chunk_size: mlp_memory's CUDA {name} with chunk_size {chunk_size}, D={q.shape[-1]}, "
                             f"E*D={hidden} and {str(q.dtype).replace('torch.', '')} inputs needs {needed} bytes "
                             f"of shared memory per block, more than the {max_shared_bytes} that {q.device} allows; "
                             "use a smaller chunk_size")


def _state_shapes(q, hidden, cu_seqlens):
    B, _, H, D = q.shape
    rows = state_rows(B, cu_seqlens)
    return (rows, H, hidden, D), (rows, H, D, hidden)


@torch.library.register_fake("titans_ext::mlp_memory_fwd")
def _mlp_memory_fwd_fake(q, k, v, theta, eta, alpha, w1, w2, s1, s2, chunk_size, read_token, activation,
                         save_states, objective=0, p=2.0, eps=0.0, delta=None, retention=0, retention_q=2.0,
                         cu_seqlens=None):
    check_fake_device(q)
    B, T, H, D = q.shape
    N = w1.shape[2]
    state_dtype = state_dtype_for(q.dtype)
    shape1, shape2 = _state_shapes(q, N, cu_seqlens)
    w1_final, s1_final = (q.new_empty(shape1, dtype=state_dtype) for _ in range(2))
    w2_final, s2_final = (q.new_empty(shape2, dtype=state_dtype) for _ in range(2))
    slots = chunk_slots(T, chunk_size, cu_seqlens, q.device.type)
    # The CUDA kernels save the chunk-start states in the inputs' dtype; the CPU ones save each
    # chunk's start state, its residuals [chunk_size, D] and, with read "token", its query
    # pre-activations [chunk_size, N] (csrc/cpu/mlp_memory.h, mlp_memory_slot_size), in the
    # state's dtype.
    if q.device.type == "cuda":
        states_shape, states_dtype = (B, H, slots, 4, N * D), q.dtype
    else:
        slot = 4 * N * D + chunk_size * D + (chunk_size * N if read_token else 0)
        states_shape, states_dtype = (B, H, slots, slot), state_dtype
    if not save_states:
        states_shape = (0,)
    return (q.new_empty(q.shape), w1_final, w2_final, s1_final, s2_final,
            q.new_empty(states_shape, dtype=states_dtype))


@torch.library.register_fake("titans_ext::mlp_memory_bwd")
def _mlp_memory_bwd_fake(q, k, v, theta, eta, alpha, chunk_states, d_o, d_w1_final, d_w2_final, d_s1_final,
                         d_s2_final, hidden, chunk_size, read_token, activation, objective=0, p=2.0, eps=0.0,
                         delta=None, retention=0, retention_q=2.0, cu_seqlens=None):
    state_dtype = state_dtype_for(q.dtype)
    shape1, shape2 = _state_shapes(q, hidden, cu_seqlens)
    dw1, ds1 = (q.new_empty(shape1, dtype=state_dtype) for _ in range(2))
    dw2, ds2 = (q.new_empty(shape2, dtype=state_dtype) for _ in range(2))
    # The kernel returns contiguous gradients whatever the inputs' strides (empty_like would copy them).
    grads = tuple(x.new_empty(x.shape) for x in (q, k, v, theta, eta, alpha))
    return (*grads, dw1, dw2, ds1, ds2,
            q.new_empty((0,), dtype=state_dtype) if delta is None else delta.new_empty(delta.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, theta, eta, alpha, w1, w2, s1, s2, chunk_size, read_token, activation, save_states = inputs[:14]
    objective, p, eps, delta, retention, retention_q, cu_seqlens = inputs[14:]  # the schema's defaults are filled in
    # Unused outputs get None, not zeros: a zero cotangent of chunk_states alone would be a fresh
    # allocation as large as the saved states (at least 4 N D values per chunk for the MLP).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, theta, eta, alpha, output[5], delta, cu_seqlens)
    ctx.hidden, ctx.chunk_size, ctx.read_token, ctx.activation = w1.shape[2], chunk_size, read_token, activation
    ctx.miras = (objective, p, eps, retention, retention_q)
    ctx.has_momentum = (s1 is not None, s2 is not None)


def _backward(ctx, d_o, d_w1_final, d_w2_final, d_s1_final, d_s2_final, _d_chunk_states):
    q, k, v, theta, eta, alpha, chunk_states, delta, cu_seqlens = ctx.saved_tensors
    if chunk_states.numel() == 0 and q.shape[1] > 0:
        raise RuntimeError("mlp_memory_fwd ran with save_states=False, so it cannot be differentiated; "
                           "call titans_ext.mlp_memory, which saves them when a gradient is needed")
    if d_o is None:
        d_o = q.new_zeros(q.shape)
    objective, p, eps, retention, retention_q = ctx.miras
    grads = torch.ops.titans_ext.mlp_memory_bwd(q, k, v, theta, eta, alpha, chunk_states, d_o, d_w1_final,
                                                d_w2_final, d_s1_final, d_s2_final, ctx.hidden, ctx.chunk_size,
                                                ctx.read_token, ctx.activation, objective, p, eps, delta, retention,
                                                retention_q, cu_seqlens)
    dq, dk, dv, dtheta, deta, dalpha, dw1, dw2, ds1, ds2, d_delta = grads
    has_s1, has_s2 = ctx.has_momentum
    return (dq, dk, dv, dtheta, deta, dalpha, dw1, dw2, ds1 if has_s1 else None, ds2 if has_s2 else None,
            None, None, None, None, None, None, None, None if delta is None else d_delta, None, None, None)


torch.library.register_autograd("titans_ext::mlp_memory_fwd", _backward, setup_context=_setup_context)


def mlp_memory(q, k, v, theta, eta, alpha, weights, *, chunk_size=64, momentum=None, output_final_state=False,
               read="token", activation="gelu", objective="l2", retention="l2", cu_seqlens=None):
    r"""Titans deep (MLP) long-term memory ``M(x) = x + W2 act(W1 x)``, chunked.

    For each batch and head, the weights ``W1: [N, D]``, ``W2: [D, N]`` (hidden width
    ``N = E * D``) and their momenta ``S1, S2`` learn at test time from the key/value stream.
    With ``t0`` the first token of t's chunk (chunks of ``chunk_size`` tokens from position 0
    of this call, or of its sequence with ``cu_seqlens``; the last may be short), for each
    weight W with momentum S::

        u_t = grad_W l(M(k_t) - v_t) at the weights of step t0 - 1     # chunk-start gradient
        S_t = eta_t S_{t-1} - theta_t u_t                               # surprise with momentum
        W_t = (1 - alpha_t) W_{t-1} + S_t                               # forget gate
        o_t = M_t(q_t)   (read="token")   or   M_{t0-1}(q_t)   (read="chunk_start")

    ``chunk_size=1`` is the exact per-token recurrence. Token reads use the dual form
    (per-token weights are never materialized). The backward (C++ on the CPU, CUDA kernels on a
    GPU) is handwritten, including the second derivative of the activation that the inner
    gradient brings in. On CUDA tensors one block per (batch, head) streams the fp32 state
    through shared memory (``csrc/cuda/mlp_memory.h``); a chunk-start state is saved per chunk in
    the inputs' dtype when a gradient is needed, none under ``torch.no_grad()``.

    MIRAS options (``docs/miras.md`` §2), as for :func:`titans_ext.linear_memory`:

    - ``objective``: the per-token loss l, whose gradient in the residual r = M(k_t) - v_t is the
      error map f(r) (backpropagated through the MLP to both weights): ``"l2"`` (l = ||r||^2,
      f = 2r), ``("lp", p)`` / ``("lp", p, eps)``, ``("huber", delta)``, ``("pseudo_huber", delta)``,
      ``("yaad", delta)``, with the f of :func:`titans_ext.linear_memory`. ``delta`` (> 0) is a float
      or a tensor broadcastable to ``[B, T, H]`` or, 4-d, to ``[B, T, H, D]``; it receives a
      gradient when it requires one.
    - ``retention``: ``"l2"`` (the forget gate above); ``("lq", q)``, q > 1 (Moneta,
      ``docs/miras.md`` §2.3): W1 and W2 are accumulators A1, A2, each with its own scale
      ``rho0 = ||A_{t0-1}||_q^(2-q)`` fixed at the chunk start (entrywise norm; 1 where the
      matrix is zero). The chunk learns and reads with the weights ``rho0 A`` of each: u_t is
      taken at ``rho0 A_{t0-1}``, token t reads ``M_t`` with weights ``rho0 A_t``
      (``read="chunk_start"``: ``rho0 A_{t0-1}``), and the lines above update A itself (the
      momenta are not rescaled). The returned weights are ``(A1_T, A2_T)``, so a stream split at a
      chunk boundary equals one call; ``"kl"`` (Memora): the chunk's first token takes, for each
      weight with its momentum, ``W = softmax((1 - alpha) log max(W, 1e-6) + S)`` over each row (W1: over the D inputs of a
      hidden unit; W2: over the N hidden units feeding an output), with its own gradient at the
      previous weights; the rest of the chunk is the step above from those weights. Each row is
      then a probability vector, so every hidden unit reads a convex combination of x and every
      output a convex combination of hidden activations; the residual x + ... is unchanged. The
      initial weights need a positive entry in every row. ``read="chunk_start"`` reads the weights
      before the chunk's first token.

    Args:
        q: queries ``[B, T, H, D]``; fp32, fp64, bf16 or fp16 (bf16/fp16 are computed in fp32).
        k: keys ``[B, T, H, D]`` (same dtype as q). Normalized keys keep the inner steps stable.
        v: values ``[B, T, H, D]`` (same dtype as q).
        theta: inner learning rate ``[B, T, H]``, >= 0.
        eta: momentum decay ``[B, T, H]``, in [0, 1].
        alpha: forget gate ``[B, T, H]``, in [0, 1]: the fraction of each weight forgotten per token.
        weights: initial weights ``(W1 [B, H, E*D, D], W2 [B, H, D, E*D])``.
        chunk_size: tokens per chunk (>= 1). The default, 64, matches :func:`titans_ext.linear_memory`;
            ``NeuralMemory`` defaults to 16 (``docs/design.md`` §4.2). On CUDA 1..64 (and D <= 128); a
            chunk whose tiles do not fit the GPU's shared memory raises a ValueError naming the bytes.
        momentum: initial momenta ``(S1, S2)`` shaped like the weights, or None for zeros.
        output_final_state: also return the final weights and momenta.
        read: ``"token"`` or ``"chunk_start"``.
        activation: ``"gelu"`` (exact, erf) or ``"silu"``.
        cu_seqlens: None, or packed variable-length sequences (``docs/design.md`` §6), as for
            :func:`titans_ext.linear_memory`: B = 1, int32 or int64 offsets ``[N + 1]``; the weights,
            momenta and final state have one row per sequence (``[N, H, ...]``). CPU and CUDA.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, D]`` in q's dtype; ``final_state`` is
        ``((W1_T, W2_T), (S1_T, S2_T))`` (fp32, fp64 for fp64 inputs) or None. Gradients flow to
        q, k, v, the gates, the initial weights, the momenta and delta, through both outputs.

    Raises:
        ValueError / TypeError naming the argument, as :func:`titans_ext.linear_memory` (value
        checks by default only on CPU tensors; ``TITANS_EXT_CHECK_VALUES``).
    """
    check_op_device(q)
    B, T, H, D, N = check_mlp_inputs(q, k, v, theta, eta, alpha, weights, chunk_size, read, activation, momentum,
                                     cu_seqlens)
    state_dtype = state_dtype_for(q.dtype)
    objective, retention, delta = check_miras_args(objective, retention, weights, (B, T, H, D), q.device, state_dtype,
                                                   memory_name="weights")
    theta, eta, alpha = (g.to(state_dtype) for g in (theta, eta, alpha))
    w1, w2 = (w.to(state_dtype) for w in weights)
    s1, s2 = (None, None) if momentum is None else (s.to(state_dtype) for s in momentum)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, theta, eta, alpha, w1, w2, s1, s2, delta))
    if q.is_cuda:
        check_cuda_limits(q, chunk_size)
        if not torch.compiler.is_compiling():  # under torch.compile the kernel's own check raises
            check_cuda_shared_memory(q, N, chunk_size, read == "token", retention.code, needs_grad)
    o, w1_final, w2_final, s1_final, s2_final, _ = torch.ops.titans_ext.mlp_memory_fwd(
        q, k, v, theta, eta, alpha, w1, w2, s1, s2, chunk_size, read == "token", activation, needs_grad,
        objective.code, objective.p, objective.eps, delta, retention.code, retention.q, cu_seqlens)
    return o, (((w1_final, w2_final), (s1_final, s2_final)) if output_final_state else None)

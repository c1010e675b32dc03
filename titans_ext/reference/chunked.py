"""Chunked references in plain PyTorch: the kernels' algorithm, written with torch ops.

They mirror the chunk algebra of the C++/CUDA kernels (``docs/design.md`` §2,
``docs/mlp_dual_form.md``): inside a chunk every token's gradient is taken at the chunk-start
memory, so a chunk is a few matmuls and only the chunk-to-chunk step is a Python loop.
Comparing them with the token loop (:mod:`.recurrent`) tests the math; comparing the kernels
with them separates kernel bugs from math bugs. Autograd gives their backward.
"""

import torch

from ..ops.checks import check_linear_inputs, check_miras_args, check_mlp_inputs
from .miras import kl_initial_memory, kl_update, lq_scale, objective_error
from .recurrent import mlp_activation

# Logs of gates are clamped here so that an exact zero gate (eta = 0, alpha = 1) gives a
# finite cumulative sum; exp(-200) is 0 in fp32 and ~1e-87 in fp64. The clamp zeroes the
# gradient of such a gate; the token loop is the reference for that edge case.
_LOG_FLOOR = -200.0


def chunk_gate_coefficients(theta, eta, alpha):
    """Gate coefficients of one chunk, from gates of shape ``[..., L]``.

    With beta = 1 - alpha, A(s..t) and P(s..t) the products of beta and eta over tokens
    s..t, the memory after token t of the chunk is
    ``M_t = a_t M0 + g_t S0 + sum_{i<=t} c[t, i] e_i k_i^T`` and the momentum at the chunk end
    ``S_L = p S0 + sum_i s_i e_i k_i^T``. Returns ``a, g [..., L]``, ``c [..., L, L]``
    (lower triangular), ``s [..., L]``, ``p [...]``. Products are taken in log space.
    """
    L = theta.shape[-1]
    log_beta = torch.cumsum(torch.log1p(-alpha).clamp_min(_LOG_FLOOR), -1)
    log_eta = torch.cumsum(torch.log(eta).clamp_min(_LOG_FLOOR), -1)
    causal = torch.ones(L, L, dtype=torch.bool, device=theta.device).tril()

    def decay(log_cum):  # [t, s] -> product over s+1..t, for s <= t
        return torch.exp((log_cum[..., :, None] - log_cum[..., None, :]).masked_fill(~causal, float("-inf")))

    beta_decay, eta_decay = decay(log_beta), decay(log_eta)
    eta_prefix = torch.exp(log_eta)                                   # P(1..t)
    a = torch.exp(log_beta)
    g = (beta_decay @ eta_prefix[..., None])[..., 0]
    c = -(beta_decay @ eta_decay) * theta[..., None, :]
    s = -theta * eta_decay[..., -1, :]
    return a, g, c, s, eta_prefix[..., -1]


def linear_memory_chunked(q, k, v, theta, eta, alpha, *, chunk_size=64, initial_state=None,
                          output_final_state=False, read="token", objective="l2", retention="l2"):
    """Linear memory, chunk by chunk. Same signature and semantics as :func:`titans_ext.linear_memory`.

    Retention ``("lq", q)`` (``docs/miras.md`` §2.3): the carried and returned M is the accumulator
    A. Each chunk fixes ``rho0 = ||A0||_q^(2-q)`` at its start (entrywise norm of each (batch, head)
    matrix; 1 where A0 = 0); its errors are taken at the weights ``W0 = rho0 A0``, the state
    evolves from (A0, S0) by the ordinary chunk algebra with those errors, token t reads
    ``rho0 A_t q_t`` and ``read="chunk_start"`` reads ``W0 q_t``. So the l2 chunk with one scalar
    per (batch, head, chunk): the residuals at ``rho0 A0`` and the token reads scaled by rho0.
    """
    B, T, H, Dk, Dv = check_linear_inputs(q, k, v, theta, eta, alpha, chunk_size, read, initial_state)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    objective, retention, delta = check_miras_args(
        objective, retention, [] if initial_state is None else initial_state[:1], (B, T, H, Dv), q.device, dtype)
    # [B, H, T, D] and [B, H, T]: chunks are slices of the time axis.
    q, k, v = (x.to(dtype).transpose(1, 2) for x in (q, k, v))
    theta, eta, alpha = (x.to(dtype).transpose(1, 2) for x in (theta, eta, alpha))
    delta = None if delta is None else delta.transpose(1, 2)
    if initial_state is None:
        S = q.new_zeros(B, H, Dv, Dk)
        M = kl_initial_memory(S) if retention.kind == "kl" else torch.zeros_like(S)
    else:
        M, S = (x.to(dtype) for x in initial_state)
    outputs = []
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        # lq (docs/miras.md §2.3): M is the accumulator A, the chunk's weights are rho0 A.
        rho = lq_scale(M, retention.q) if retention.kind == "lq" else 1.0
        chunk_weights, rest, reads = rho * M, start, []
        if retention.kind == "kl":  # the lag token: Memora's exact step from the previous memory
            t = slice(start, start + 1)
            E = _errors(objective, k[:, :, t], v[:, :, t], M, None if delta is None else delta[:, :, t])
            S = eta[:, :, t, None] * S - theta[:, :, t, None] * E.transpose(-1, -2) @ k[:, :, t]
            M = kl_update(M, S, alpha[:, :, t, None])
            reads.append(q[:, :, t] @ M.transpose(-1, -2))
            rest += 1
        sl = slice(rest, end)
        O, M, S = _chunk(objective, q[:, :, sl], k[:, :, sl], v[:, :, sl], theta[:, :, sl], eta[:, :, sl],
                         alpha[:, :, sl], None if delta is None else delta[:, :, sl], M, S, rho, read == "token")
        if read == "chunk_start":
            O = q[:, :, start:end] @ chunk_weights.transpose(-1, -2)
        else:
            O = torch.cat(reads + [O], dim=2)
        outputs.append(O)
    o = torch.cat(outputs, dim=2).transpose(1, 2) if outputs else q.new_zeros(B, 0, H, Dv)
    return o, ((M, S) if output_final_state else None)


def _errors(objective, K, V, M, delta):
    return objective_error(objective, K @ M.transpose(-1, -2) - V, delta)


def _chunk(objective, Q, K, V, theta, eta, alpha, delta, M, S, rho, token_reads):
    """One chunk from (M, S) whose weights are ``rho * M``: its token reads (or None) and its end
    state. The errors are taken at the weights; the state evolves from M (the lq accumulator when
    rho is its scale, else the memory itself) and token t reads ``rho * M_t``."""
    if K.shape[2] == 0:
        return Q @ M.transpose(-1, -2), M, S
    a, g, c, s, p = chunk_gate_coefficients(theta, eta, alpha)
    E = _errors(objective, K, V, rho * M, delta)                     # errors at the chunk-start weights
    O = None
    if token_reads:
        O = rho * (a[..., None] * (Q @ M.transpose(-1, -2)) + g[..., None] * (Q @ S.transpose(-1, -2))
                   + ((Q @ K.transpose(-1, -2)) * c) @ E)
    m = c[..., -1, :]
    M, S = (a[..., -1, None, None] * M + g[..., -1, None, None] * S + (E * m[..., None]).transpose(-1, -2) @ K,
            p[..., None, None] * S + (E * s[..., None]).transpose(-1, -2) @ K)
    return O, M, S


def mlp_activation_derivative(name, x):
    """Closed-form derivative of the memory MLP's activation (exact GELU or SiLU) at ``x``.

    Written with torch ops so that autograd through it gives the second derivative the
    backward of the inner gradient needs.
    """
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(x * 0.5 ** 0.5))
        pdf = torch.exp(-0.5 * x * x) * (2 * torch.pi) ** -0.5
        return cdf + x * pdf
    sig = torch.sigmoid(x)
    return sig * (1 + x * (1 - sig))


def mlp_memory_chunked(q, k, v, theta, eta, alpha, weights, *, chunk_size=64, momentum=None,
                       output_final_state=False, read="token", activation="gelu", objective="l2", retention="l2"):
    """Deep memory ``M(x) = x + W2 act(W1 x)``, chunk by chunk, with the dual form for token reads.

    Same signature and semantics as :func:`titans_ext.mlp_memory`. Per chunk (``docs/mlp_dual_form.md``
    §3), with the chunk-start weights W1, W2 and momenta S1, S2: the key path gives the hidden
    activations H, the errors Ecal = f(K + H W2^T - V) and the hidden-layer errors DZ of all tokens
    at once; token t's weights ``W_t = a_t W + g_t S + sum_{i<=t} c[t, i] u_i`` are never built,
    their read-out is expressed with the masked products ``(Q K^T) .* c`` and ``(Hq H^T) .* c``.
    The retention acts at the chunk start on each weight, as in :func:`linear_memory_chunked`
    (``lq``: W1 and W2 are accumulators, each with its own scale rho0).
    """
    B, T, H, D, N = check_mlp_inputs(q, k, v, theta, eta, alpha, weights, chunk_size, read,
                                     activation, momentum)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    objective, retention, delta = check_miras_args(objective, retention, weights, (B, T, H, D), q.device, dtype,
                                                   memory_name="weights")
    act = mlp_activation(activation)
    # [B, H, T, D] and [B, H, T]: chunks are slices of the time axis.
    q, k, v = (x.to(dtype).transpose(1, 2) for x in (q, k, v))
    theta, eta, alpha = (x.to(dtype).transpose(1, 2) for x in (theta, eta, alpha))
    delta = None if delta is None else delta.transpose(1, 2)
    W1, W2 = (w.to(dtype) for w in weights)
    if momentum is None:
        S1, S2 = torch.zeros_like(W1), torch.zeros_like(W2)
    else:
        S1, S2 = (s.to(dtype) for s in momentum)

    def key_path(sl, W1, W2):
        """Every token's inner gradient at W1, W2: u2_i = e_i h_i^T and u1_i = dz_i k_i^T."""
        K = k[:, :, sl]
        Z = K @ _t(W1)
        Hk = act(Z)
        Ecal = objective_error(objective, K + Hk @ _t(W2) - v[:, :, sl], None if delta is None else delta[:, :, sl])
        return Hk, Ecal, (Ecal @ W2) * mlp_activation_derivative(activation, Z)

    def plain_read(sl, W1, W2):
        Q = q[:, :, sl]
        return Q + act(Q @ _t(W1)) @ _t(W2)

    outputs = []
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        # lq (docs/miras.md §2.3): W1, W2 are the accumulators; the chunk's weights are rho1 W1 and
        # rho2 W2, each matrix with its own scale.
        rho1, rho2 = (lq_scale(W1, retention.q), lq_scale(W2, retention.q)) if retention.kind == "lq" else (1.0, 1.0)
        chunk_weights, rest, reads = (rho1 * W1, rho2 * W2), start, []
        if retention.kind == "kl":  # the lag token: Memora's exact step from the previous weights
            t = slice(start, start + 1)
            Hk, Ecal, DZ = key_path(t, W1, W2)
            th, et, al = (x[:, :, t, None] for x in (theta, eta, alpha))
            S1 = et * S1 - th * _t(DZ) @ k[:, :, t]
            S2 = et * S2 - th * _t(Ecal) @ Hk
            W1, W2 = kl_update(W1, S1, al), kl_update(W2, S2, al)
            reads.append(plain_read(t, W1, W2))
            rest += 1
        sl = slice(rest, end)
        if rest < end:
            Q, K = q[:, :, sl], k[:, :, sl]
            a, g, c, m_end, p = chunk_gate_coefficients(theta[:, :, sl], eta[:, :, sl], alpha[:, :, sl])
            Hk, Ecal, DZ = key_path(sl, rho1 * W1, rho2 * W2)
            if read == "token":  # token t reads the weights rho1 W1_t, rho2 W2_t
                a_, g_ = a[..., None], g[..., None]
                Zq = rho1 * (a_ * (Q @ _t(W1)) + g_ * (Q @ _t(S1)) + ((Q @ _t(K)) * c) @ DZ)
                Hq = act(Zq)
                reads.append(Q + rho2 * (a_ * (Hq @ _t(W2)) + g_ * (Hq @ _t(S2)) + ((Hq @ _t(Hk)) * c) @ Ecal))
            a_end, g_end, p = (x[..., None, None] for x in (a[..., -1], g[..., -1], p))
            c_end, m_end = c[..., -1, :, None], m_end[..., None]
            W1, S1, W2, S2 = (a_end * W1 + g_end * S1 + _t(DZ) @ (c_end * K),
                              p * S1 + _t(DZ) @ (m_end * K),
                              a_end * W2 + g_end * S2 + _t(Ecal) @ (c_end * Hk),
                              p * S2 + _t(Ecal) @ (m_end * Hk))
        outputs.append(plain_read(slice(start, end), *chunk_weights) if read == "chunk_start"
                       else torch.cat(reads, dim=2))
    o = torch.cat(outputs, dim=2).transpose(1, 2) if outputs else q.new_zeros(B, 0, H, D)
    return o, (((W1, W2), (S1, S2)) if output_final_state else None)


def _t(x):
    return x.transpose(-1, -2)

"""Chunked references in plain PyTorch: the kernels' algorithm, written with torch ops.

They mirror the chunk algebra of the C++/CUDA kernels (``shared/design`` README §2,
``mlp_dual_form.md``): inside a chunk every token's gradient is taken at the chunk-start
memory, so a chunk is a few matmuls and only the chunk-to-chunk step is a Python loop.
Comparing them with the token loop (:mod:`.recurrent`) tests the math; comparing the kernels
with them separates kernel bugs from math bugs. Autograd gives their backward.
"""

import torch

from ..ops.checks import check_linear_inputs, check_mlp_inputs
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
                          output_final_state=False, read="token"):
    """Linear memory, chunk by chunk. Same signature and semantics as :func:`titans_ext.linear_memory`."""
    B, T, H, Dk, Dv = check_linear_inputs(q, k, v, theta, eta, alpha, chunk_size, read, initial_state)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # [B, H, T, D] and [B, H, T]: chunks are slices of the time axis.
    q, k, v = (x.to(dtype).transpose(1, 2) for x in (q, k, v))
    theta, eta, alpha = (x.to(dtype).transpose(1, 2) for x in (theta, eta, alpha))
    if initial_state is None:
        M = q.new_zeros(B, H, Dv, Dk)
        S = q.new_zeros(B, H, Dv, Dk)
    else:
        M, S = (x.to(dtype) for x in initial_state)
    outputs = []
    for start in range(0, T, chunk_size):
        sl = slice(start, min(start + chunk_size, T))
        Q, K, V = q[:, :, sl], k[:, :, sl], v[:, :, sl]
        a, g, c, s, p = chunk_gate_coefficients(theta[:, :, sl], eta[:, :, sl], alpha[:, :, sl])
        E = 2 * (K @ M.transpose(-1, -2) - V)                         # errors at the chunk start
        if read == "token":
            O = (a[..., None] * (Q @ M.transpose(-1, -2)) + g[..., None] * (Q @ S.transpose(-1, -2))
                 + ((Q @ K.transpose(-1, -2)) * c) @ E)
        else:
            O = Q @ M.transpose(-1, -2)
        outputs.append(O)
        m = c[..., -1, :]
        M, S = (a[..., -1, None, None] * M + g[..., -1, None, None] * S + (E * m[..., None]).transpose(-1, -2) @ K,
                p[..., None, None] * S + (E * s[..., None]).transpose(-1, -2) @ K)
    o = torch.cat(outputs, dim=2).transpose(1, 2) if outputs else q.new_zeros(B, 0, H, Dv)
    return o, ((M, S) if output_final_state else None)


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
                       output_final_state=False, read="token", activation="gelu"):
    """Deep memory ``M(x) = x + W2 act(W1 x)``, chunk by chunk, with the dual form for token reads.

    Same signature and semantics as :func:`titans_ext.mlp_memory`. Per chunk (``mlp_dual_form.md``
    §3), with the chunk-start weights W1, W2 and momenta S1, S2: the key path gives the hidden
    activations H, the errors Ecal and the hidden-layer errors DZ of all tokens at once; token t's
    weights ``W_t = a_t W + g_t S + sum_{i<=t} c[t, i] u_i`` are never built, their read-out is
    expressed with the masked products ``(Q K^T) .* c`` and ``(Hq H^T) .* c``.
    """
    B, T, H, D, N = check_mlp_inputs(q, k, v, theta, eta, alpha, weights, chunk_size, read,
                                     activation, momentum)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    act = mlp_activation(activation)
    # [B, H, T, D] and [B, H, T]: chunks are slices of the time axis.
    q, k, v = (x.to(dtype).transpose(1, 2) for x in (q, k, v))
    theta, eta, alpha = (x.to(dtype).transpose(1, 2) for x in (theta, eta, alpha))
    W1, W2 = (w.to(dtype) for w in weights)
    if momentum is None:
        S1, S2 = torch.zeros_like(W1), torch.zeros_like(W2)
    else:
        S1, S2 = (s.to(dtype) for s in momentum)

    def t(x):
        return x.transpose(-1, -2)

    outputs = []
    for start in range(0, T, chunk_size):
        sl = slice(start, min(start + chunk_size, T))
        Q, K, V = q[:, :, sl], k[:, :, sl], v[:, :, sl]
        a, g, c, m_end, p = chunk_gate_coefficients(theta[:, :, sl], eta[:, :, sl], alpha[:, :, sl])
        # Key path: every token's inner gradient at the chunk-start weights,
        # u2_i = e_i h_i^T and u1_i = dz_i k_i^T.
        Z = K @ t(W1)
        Hk = act(Z)
        Ecal = 2 * (K + Hk @ t(W2) - V)
        DZ = (Ecal @ W2) * mlp_activation_derivative(activation, Z)
        if read == "token":
            a_, g_ = a[..., None], g[..., None]
            Zq = a_ * (Q @ t(W1)) + g_ * (Q @ t(S1)) + ((Q @ t(K)) * c) @ DZ
            Hq = act(Zq)
            O = Q + a_ * (Hq @ t(W2)) + g_ * (Hq @ t(S2)) + ((Hq @ t(Hk)) * c) @ Ecal
        else:
            O = Q + act(Q @ t(W1)) @ t(W2)
        outputs.append(O)
        a_end, g_end, p = (x[..., None, None] for x in (a[..., -1], g[..., -1], p))
        c_end, m_end = c[..., -1, :, None], m_end[..., None]
        W1, S1, W2, S2 = (a_end * W1 + g_end * S1 + t(DZ) @ (c_end * K),
                          p * S1 + t(DZ) @ (m_end * K),
                          a_end * W2 + g_end * S2 + t(Ecal) @ (c_end * Hk),
                          p * S2 + t(Ecal) @ (m_end * Hk))
    o = torch.cat(outputs, dim=2).transpose(1, 2) if outputs else q.new_zeros(B, 0, H, D)
    return o, (((W1, W2), (S1, S2)) if output_final_state else None)

"""The conversions of docs/peers.md §7: flash-linear-attention's and titans-pytorch's state layout,
gates and loss, checked against ``linear_memory`` in float64.

Each peer convention is written here as its own token recurrence (fla's layout ``[N, H, K, V]``,
log-decay ``g`` and delta-rule ``beta``; titans-pytorch's ``k @ W`` weights and mean-squared loss
with the learning rate as a loss weight), fed the converted inputs, and compared with the op at
``chunk_size=1``, where the peers' recurrences and titans_ext's coincide.
"""

import math

import pytest
import torch

import titans_ext

from utils import TOLERANCE, assert_close

F64 = TOLERANCE[torch.float64]
B, T, H, D = 2, 9, 2, 5


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    q, k = (_unit(torch.randn(B, T, H, D, generator=g, dtype=torch.float64)) for _ in range(2))
    v = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    return q, k, v, g


def fla_gated_delta_rule(q, k, v, g, beta, h0, scale=1.0, error_after_decay=True):
    """fla's gated delta rule, token by token, in fla's layout: state ``h [B, H, K, V]``,
    ``h <- exp(g) h``, error ``beta (v - h^T k)``, ``h <- h + k error^T``, ``o = h^T (scale q)``.

    ``error_after_decay=True`` is fla's order (the error at the decayed state); False takes it at
    the state before the decay, which is titans_ext's step at chunk_size 1 without momentum.
    """
    h, outputs = h0.clone(), []
    for t in range(q.shape[1]):
        decay = torch.exp(g[:, t])[..., None, None]
        seen = decay * h if error_after_decay else h
        error = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", seen, k[:, t]))
        h = decay * h + torch.einsum("bhk,bhv->bhkv", k[:, t], error)
        outputs.append(torch.einsum("bhkv,bhk->bhv", h, scale * q[:, t]))
    return torch.stack(outputs, dim=1), h


def _linear_memory_from_fla(q, k, v, g, beta, h0):
    """titans_ext's op on fla-convention inputs, through the conversions of docs/peers.md §7.2."""
    theta, alpha = beta / 2, -torch.expm1(g)
    m0 = h0.transpose(-1, -2)
    o, (m_final, _) = titans_ext.linear_memory(q, k, v, theta, torch.zeros_like(theta), alpha, chunk_size=1,
                                               initial_state=(m0, torch.zeros_like(m0)), output_final_state=True)
    return o, m_final.transpose(-1, -2)


@pytest.mark.parametrize("seed", [0, 1])
def test_fla_delta_rule_without_decay_is_linear_memory(seed):
    q, k, v, gen = _inputs(seed)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    g = torch.zeros(B, T, H, dtype=torch.float64)
    h0 = torch.randn(B, H, D, D, generator=gen, dtype=torch.float64)
    ref_o, ref_h = fla_gated_delta_rule(q, k, v, g, beta, h0)
    o, h = _linear_memory_from_fla(q, k, v, g, beta, h0)
    assert_close("o", ref_o, o, F64)
    assert_close("final state", ref_h, h, F64)


@pytest.mark.parametrize("seed", [0, 1])
def test_fla_log_decay_converts_to_alpha(seed):
    """With forgetting, titans_ext's step is fla's with the error taken before the decay."""
    q, k, v, gen = _inputs(seed)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64))
    h0 = torch.randn(B, H, D, D, generator=gen, dtype=torch.float64)
    ref_o, ref_h = fla_gated_delta_rule(q, k, v, g, beta, h0, error_after_decay=False)
    o, h = _linear_memory_from_fla(q, k, v, g, beta, h0)
    assert_close("o", ref_o, o, F64)
    assert_close("final state", ref_h, h, F64)
    # fla's own order differs once g != 0: the conversion is exact only without decay.
    fla_o, _ = fla_gated_delta_rule(q, k, v, g, beta, h0)
    assert (fla_o - o).abs().max() > 1e-3


def titans_pytorch_linear_memory(q, k, v, lr, momentum_gate, decay, w0):
    """titans-pytorch's linear memory at chunk_size=1, batch_size=1, token by token, in its
    conventions: per-head weights ``W [H, Dk, Dv]`` applied as ``k @ W``, the loss
    ``lr * mean((k @ W - v)^2)`` over the features, surprise ``-grad``, momentum
    ``S <- eta S + surprise`` and decay ``W <- (1 - decay) W + S``; token t reads its own update."""
    w = w0.expand(q.shape[0], *w0.shape).clone()
    s, outputs = torch.zeros_like(w), []
    for t in range(q.shape[1]):
        w_leaf = w.detach().requires_grad_()
        pred = torch.einsum("bhk,bhkv->bhv", k[:, t], w_leaf)
        loss = (lr[:, t] * (pred - v[:, t]).pow(2).mean(dim=-1)).sum()
        (grad,) = torch.autograd.grad(loss, w_leaf)
        s = momentum_gate[:, t, :, None, None] * s - grad
        w = (1 - decay[:, t, :, None, None]) * w + s
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], w))
    return torch.stack(outputs, dim=1), w


def _linear_memory_from_titans_pytorch(q, k, v, lr, momentum_gate, decay, w0):
    """titans_ext's op on titans-pytorch-convention inputs (docs/peers.md §7.3)."""
    m0 = w0.transpose(-1, -2).expand(q.shape[0], *w0.shape).contiguous()
    o, (m_final, _) = titans_ext.linear_memory(q, k, v, lr / v.shape[-1], momentum_gate, decay, chunk_size=1,
                                               initial_state=(m0, torch.zeros_like(m0)), output_final_state=True)
    return o, m_final.transpose(-1, -2)


@pytest.mark.parametrize("seed", [0, 1])
def test_titans_pytorch_mean_squared_loss_converts_to_theta(seed):
    q, k, v, gen = _inputs(seed)
    lr, momentum_gate, decay = (torch.rand(B, T, H, generator=gen, dtype=torch.float64) for _ in range(3))
    w0 = torch.randn(H, D, D, generator=gen, dtype=torch.float64) / math.sqrt(D)
    ref_o, ref_w = titans_pytorch_linear_memory(q, k, v, lr, momentum_gate, decay, w0)
    o, w = _linear_memory_from_titans_pytorch(q, k, v, lr, momentum_gate, decay, w0)
    assert_close("o", ref_o, o, F64)
    assert_close("final weights", ref_w, w, F64)


def _logit(p):
    return math.log(p / (1 - p))


def test_titans_pytorch_neural_memory_is_linear_memory():
    """titans-pytorch's own NeuralMemory (one head, linear memory, constant gates, no norms)."""
    titans_pytorch = pytest.importorskip("titans_pytorch")
    lr, momentum, decay = 0.3, 0.7, 0.2
    torch.manual_seed(0)
    memory = titans_pytorch.NeuralMemory(dim=D, heads=1, chunk_size=1, batch_size=1,
                                         model=titans_pytorch.MemoryMLP(dim=D, depth=1), pre_rmsnorm=False,
                                         mem_model_norm_add_residual=False, default_step_transform_max_lr=2 * lr,
                                         init_adaptive_step_bias=0.0, init_momentum_bias=0.0,
                                         init_decay_bias=0.0).double()
    with torch.no_grad():  # gates sigmoid(bias) * max_lr = lr, sigmoid(bias) = momentum, decay (set in fp64)
        memory.to_momentum[0].bias.fill_(_logit(momentum))
        memory.to_decay_factor[0].bias.fill_(_logit(decay))
    x = torch.randn(B, T, D, dtype=torch.float64)
    out, _ = memory(x)

    q, k, v = (x @ proj.weight.t() for proj in (memory.to_queries, memory.to_keys, memory.to_values))
    q, k, v = (t[:, :, None] for t in (q, k, v))  # [B, T, 1, D]: one head
    w0 = memory.memory_model_parameters[0].detach()  # [1, Dk, Dv]
    full = torch.ones(B, T, 1, dtype=torch.float64)
    o, _ = _linear_memory_from_titans_pytorch(q, k, v, lr * full, momentum * full, decay * full, w0)
    assert_close("o", out.detach(), o[:, :, 0], F64)

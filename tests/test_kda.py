"""KDA's PyTorch reference (`fla_tl.reference.kda`): the token-by-token recurrence against the paper's matrix update
written out in fp64, the chunked form against the recurrence, the gate and beta activations, and the argument
checks."""

import pytest
import torch
import torch.nn.functional as F

from fla_tl.reference.delta_rule import recurrent_gated_delta_rule
from fla_tl.reference.kda import kda_beta, kda_gate, recurrent_kda


def _paper_update(q, k, v, g, beta, scale, h0):
    """one sequence `[T, H, K]` q, k, `[T, HV, V]` v, `[T, HV, K]` g, `[T, HV]` beta, `h0` `[HV, K, V]`:
    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T, o_t = scale S_t^T q_t, in fp64."""
    T, H, K = q.shape
    HV = v.shape[1]
    S = h0.clone()
    eye = torch.eye(K, dtype=torch.float64)
    outs = []
    for t in range(T):
        o_t = []
        for j in range(HV):
            kt, qt = k[t, j // (HV // H)], q[t, j // (HV // H)]
            S[j] = (eye - beta[t, j] * torch.outer(kt, kt)) @ torch.diag(g[t, j].exp()) @ S[j] \
                + beta[t, j] * torch.outer(kt, v[t, j])
            o_t.append(scale * S[j].T @ qt)
        outs.append(torch.stack(o_t))
    return (torch.stack(outs) if outs else v.new_zeros(0, HV, v.shape[-1])), S


@pytest.mark.parametrize("state_v_first", [False, True])
def test_recurrence_is_the_paper_update(state_v_first):
    """varlen (an empty sequence too), GVA (4 value heads on 2 key heads), an initial state, both state layouts."""
    lens = (5, 0, 17, 9)
    T, H, HV, K, V = sum(lens), 2, 4, 6, 5
    torch.manual_seed(0)
    q, k = torch.randn(1, T, H, K, dtype=torch.float64), torch.randn(1, T, H, K, dtype=torch.float64) / K ** 0.5
    v = torch.randn(1, T, HV, V, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(1, T, HV, K, dtype=torch.float64))
    beta = torch.rand(1, T, HV, dtype=torch.float64)
    h0 = torch.randn(len(lens), HV, K, V, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    o, ht = recurrent_kda(q, k, v, g, beta, scale=0.3, output_final_state=True, cu_seqlens=cu,
                          initial_state=h0.transpose(-1, -2) if state_v_first else h0, state_v_first=state_v_first)
    for n, (bos, eos) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        want_o, want_h = _paper_update(q[0, bos:eos], k[0, bos:eos], v[0, bos:eos], g[0, bos:eos], beta[0, bos:eos],
                                       0.3, h0[n])
        torch.testing.assert_close(o[0, bos:eos], want_o)
        torch.testing.assert_close(ht[n].transpose(-1, -2) if state_v_first else ht[n], want_h)


def test_a_gate_equal_over_keys_is_the_gated_delta_rule():
    torch.manual_seed(1)
    q, k = torch.randn(2, 30, 2, 8, dtype=torch.float64), torch.randn(2, 30, 2, 8, dtype=torch.float64)
    v, beta = torch.randn(2, 30, 2, 4, dtype=torch.float64), torch.rand(2, 30, 2, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(2, 30, 2, dtype=torch.float64))
    got = recurrent_kda(q, k, v, g[..., None].expand(-1, -1, -1, 8), beta, output_final_state=True,
                        use_qk_l2norm_in_kernel=True)
    want = recurrent_gated_delta_rule(q, k, v, beta, g, output_final_state=True, use_qk_l2norm_in_kernel=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_gradients_flow_to_every_input():
    """the reference is differentiable (the torch backend and the gradient tests rely on it), the gate included."""
    torch.manual_seed(2)
    shapes = dict(q=(1, 12, 1, 4), k=(1, 12, 1, 4), v=(1, 12, 2, 3), g=(1, 12, 2, 4), beta=(1, 12, 2))
    x = {n: torch.randn(s, dtype=torch.float64, requires_grad=True) for n, s in shapes.items()}
    h0 = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, g, beta, h0):
        o, ht = recurrent_kda(q, k, v, F.logsigmoid(g), beta.sigmoid(), initial_state=h0, output_final_state=True)
        return o, ht

    torch.autograd.gradcheck(f, (*x.values(), h0))


def test_gate_activation():
    torch.manual_seed(3)
    g = torch.randn(1, 7, 3, 4, dtype=torch.float64) * 3
    A_log, dt_bias = torch.randn(3, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    soft = kda_gate(g, A_log, dt_bias)
    torch.testing.assert_close(soft, -A_log.exp()[:, None] * F.softplus(g + dt_bias.view(3, 4)))
    assert (soft <= 0).all()
    bounded = kda_gate(g, A_log, dt_bias, lower_bound=-5.0)
    torch.testing.assert_close(bounded, -5.0 * torch.sigmoid(A_log.exp()[:, None] * (g + dt_bias.view(3, 4))))
    assert ((bounded > -5.0) & (bounded < 0)).all()
    torch.testing.assert_close(kda_gate(g, None, None, lower_bound=-2.0), -2.0 * torch.sigmoid(g))
    assert kda_gate(g.float(), A_log, dt_bias).dtype == torch.float32
    with pytest.raises(ValueError, match="A_log is required"):
        kda_gate(g, None, dt_bias)


def test_beta_activation():
    beta = torch.randn(2, 5, 3)
    assert kda_beta(beta, False, True) is beta  # allow_neg_eigval only with the sigmoid, as in fla
    torch.testing.assert_close(kda_beta(beta, True, False), beta.sigmoid())
    torch.testing.assert_close(kda_beta(beta, True, True), 2 * beta.sigmoid())


def test_gate_shape_is_checked():
    q = k = torch.randn(1, 5, 2, 4)
    v, beta = torch.randn(1, 5, 2, 3), torch.rand(1, 5, 2)
    with pytest.raises(ValueError, match=r"g must be \[B, T, HV, K\]"):
        recurrent_kda(q, k, v, torch.randn(1, 5, 2), beta)


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunked_form_matches_the_recurrence(chunk_size):
    """the chunked form (partial chunks, varlen with an empty sequence, GVA, an initial state, strong gates whose
    products over a chunk underflow) against the recurrence, outputs, final states and gradients, in fp64."""
    from fla_tl.reference.kda import chunk_kda_torch

    torch.manual_seed(4)
    lens = (37, 0, 70, 1)
    T, H, HV, K, V = sum(lens), 1, 2, 8, 4
    x = dict(q=torch.randn(1, T, H, K), k=torch.randn(1, T, H, K), v=torch.randn(1, T, HV, V),
             g=F.logsigmoid(torch.randn(1, T, HV, K) * 4) * 3, beta=torch.rand(1, T, HV))
    x = {n: t.double().requires_grad_() for n, t in x.items()}
    h0 = torch.randn(len(lens), HV, K, V, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    kw = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    got = chunk_kda_torch(*x.values(), chunk_size=chunk_size, **kw)
    want = recurrent_kda(*x.values(), **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    dout = [torch.randn_like(t) for t in want]
    inputs = [*x.values(), h0]
    for a, b in zip(torch.autograd.grad(got, inputs, dout), torch.autograd.grad(want, inputs, dout)):
        torch.testing.assert_close(a, b)

"""Both ops are real torch.library ops: they dispatch by device, trace without graph breaks, pass opcheck."""

from __future__ import annotations

import pytest
import torch
from ssb_fast.kernels import noise_seeds
from ssb_fast.kernels.bridge_sample import bridge_sample_ref
from ssb_fast.kernels.cfg_step import cfg_step_ref

from ssb_fast import kernels
from ssb_fast.bridge import Bridge

BRIDGE = Bridge(1000, 0.3)


def bridge_sample_args(batch=3):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 2, (batch, 1, 9, 10), generator=g).float() * 2 - 1
    x1 = torch.rand(batch, 1, 9, 10, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x0, x1, t, BRIDGE.schedule("cpu"), noise_seeds(0, ["s"] * batch, list(range(batch)))


def cfg_step_args(batch=3):
    g = torch.Generator().manual_seed(1)
    x_n = torch.rand(batch, 1, 9, 10, generator=g) * 2 - 1
    net_out = torch.randn(2 * batch, 1, 9, 10, generator=g)
    coefs = BRIDGE.sampling_coefs(BRIDGE.step_indices(5))[2].expand(batch, 4).contiguous()
    seeds = noise_seeds(0, ["s"] * batch, list(range(batch)))
    return x_n, net_out, coefs, seeds


def train_pair(x0, x1, t, sched, seeds):
    x_t, label = torch.ops.ssb_fast.bridge_sample(x0, x1, t, sched, seeds, False)
    return x_t * 2.0, label + 1.0


def sample_step(x_n, net_out, coefs, seeds, nxt):
    torch.ops.ssb_fast.cfg_step(x_n, net_out, coefs, seeds, 1.5, 600, True, True, nxt, None)
    return nxt[: x_n.shape[0], :1] * 1.0


def test_ops_are_registered_in_the_ssb_fast_namespace():
    assert torch.ops.ssb_fast.bridge_sample.default is not None
    assert torch.ops.ssb_fast.cfg_step.default is not None
    assert set(kernels.op_backends("cpu").values()) == {"torch"}
    assert kernels.op_backends("cuda") == {name: "triton" if kernels.HAS_TRITON else "torch" for name in kernels.OPS}


def test_cpu_dispatch_runs_the_reference():
    args = bridge_sample_args()
    for got, want in zip(torch.ops.ssb_fast.bridge_sample(*args, False), bridge_sample_ref(*args, False)):
        assert torch.equal(got, want)
    x_n, net_out, coefs, seeds = cfg_step_args()
    a, b = torch.zeros(6, 2, 9, 10), torch.zeros(6, 2, 9, 10)
    torch.ops.ssb_fast.cfg_step(x_n, net_out, coefs, seeds, 1.5, 600, True, True, a, None)
    cfg_step_ref(x_n, net_out, coefs, seeds, 1.5, 600, True, True, b, None)
    assert torch.equal(a, b) and a[:, :1].abs().sum() > 0


def test_no_graph_breaks():
    torch._dynamo.reset()
    assert torch._dynamo.explain(train_pair)(*bridge_sample_args()).graph_break_count == 0
    x_n, net_out, coefs, seeds = cfg_step_args()
    explained = torch._dynamo.explain(sample_step)(x_n, net_out, coefs, seeds, torch.zeros(6, 2, 9, 10))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_compiled_fullgraph_matches_eager():
    torch._dynamo.reset()
    args = bridge_sample_args()
    eager = train_pair(*args)
    compiled = torch.compile(train_pair, fullgraph=True)(*args)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e)
    x_n, net_out, coefs, seeds = cfg_step_args()
    nxt_e, nxt_c = torch.zeros(6, 2, 9, 10), torch.zeros(6, 2, 9, 10)
    eager = sample_step(x_n, net_out, coefs, seeds, nxt_e)
    compiled = torch.compile(sample_step, fullgraph=True)(x_n, net_out, coefs, seeds, nxt_c)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(nxt_c, nxt_e)


@pytest.mark.parametrize("ot_ode", [False, True])
def test_opcheck_bridge_sample(ot_ode):
    torch.library.opcheck(torch.ops.ssb_fast.bridge_sample.default, (*bridge_sample_args(), ot_ode))


@pytest.mark.parametrize("with_x0", [False, True])
def test_opcheck_cfg_step(with_x0):
    x_n, net_out, coefs, seeds = cfg_step_args()
    x0 = torch.zeros(3, 1, 9, 10) if with_x0 else None
    torch.library.opcheck(
        torch.ops.ssb_fast.cfg_step.default,
        (x_n, net_out, coefs, seeds, 1.5, 600, True, True, torch.zeros(6, 2, 9, 10), x0),
    )


@pytest.mark.gpu
def test_cuda_dispatch_runs_triton_and_matches_reference():
    args = [a.cuda() for a in bridge_sample_args(64)]
    got = torch.ops.ssb_fast.bridge_sample(*args, False)
    want = bridge_sample_ref(*args, False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    x_n, net_out, coefs, seeds = [a.cuda() for a in cfg_step_args(64)]
    a = torch.zeros(128, 2, 9, 10, device="cuda")
    b = torch.zeros_like(a)
    torch.ops.ssb_fast.cfg_step(x_n, net_out, coefs, seeds, 1.5, 600, True, True, a, None)
    cfg_step_ref(x_n, net_out, coefs, seeds, 1.5, 600, True, True, b, None)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

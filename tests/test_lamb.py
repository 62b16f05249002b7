"""pretrain.runtime.lamb.Lamb against an independent float64 recomputation of DeepSpeed's fused LAMB update."""

import copy
import math

import pytest
import torch

from pretrain.runtime.lamb import Lamb
from pretrain.runtime.pertensor import FlatLayout

HP = dict(lr=0.02, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, max_coeff=10.0, min_coeff=0.01)


def reference_lamb(params, grads_per_step, lr, betas, eps, weight_decay, max_coeff, min_coeff, eps_inside_sqrt=False):
    """Float64, one tensor at a time, written from the CUDA kernel's formulas (fused_lamb_cuda_kernel.cu)."""
    b1, b2 = betas
    ps = [p.double().clone() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    for t, grads in enumerate(grads_per_step, start=1):
        step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        for p, m, v, g in zip(ps, ms, vs, grads):
            g = g.double()
            m.copy_(b1 * m + (1 - b1) * g)
            v.copy_(b2 * v + (1 - b2) * g * g)
            denom = torch.sqrt(v + eps) if eps_inside_sqrt else torch.sqrt(v) + eps
            u = m / denom + weight_decay * p
            wn, un = p.norm().item(), u.norm().item()
            r = min(max(wn / un, min_coeff), max_coeff) if wn > 0 and un > 0 else 1.0
            p.sub_(step_size * r * u)
    return ps


def make_problem(seed=0, steps=4):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (11,)]
    scales = [1.0, 0.0, 3.0, 0.05]  # one all-zero tensor: its trust ratio must fall back to 1
    params = [torch.randn(s, generator=g) * c for s, c in zip(shapes, scales)]
    grads = [[torch.randn(s, generator=g) * (10.0**k) for k, s in enumerate(shapes)] for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize("eps_inside_sqrt", [False, True])
def test_matches_float64_reference(eps_inside_sqrt):
    params, grads = make_problem()
    want = reference_lamb(params, grads, eps_inside_sqrt=eps_inside_sqrt, **HP)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = Lamb(ps, eps_inside_sqrt=eps_inside_sqrt, **HP)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        opt.step()
    for p, w in zip(ps, want):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)


def test_flat_partition_with_layout_keeps_per_tensor_ratios():
    """One flat tensor holding every parameter (what ZeRO hands the optimizer) + padding, split over 2 'ranks'."""
    params, grads = make_problem(seed=1)
    want = reference_lamb(params, grads, **HP)
    numels = [p.numel() for p in params]
    pad = 3
    flat = torch.nn.Parameter(torch.cat([p.reshape(-1) for p in params] + [torch.zeros(pad)]))
    ids = torch.arange(len(params) + 1)
    lengths = torch.tensor(numels + [pad])
    opt = Lamb([flat], **HP)
    opt.set_layout(flat, FlatLayout(tensor_ids=ids, lengths=lengths, num_tensors=len(params)))
    for step_grads in grads:
        flat.grad = torch.cat([g.reshape(-1) for g in step_grads] + [torch.zeros(pad)])
        opt.step()
    got = torch.split(flat.detach()[: sum(numels)], numels)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.reshape(-1), rtol=1e-5, atol=1e-6)
    assert torch.all(flat.detach()[-pad:] == 0)


def test_flat_partition_without_layout_is_the_zero_trap():
    """Sanity check of the test above: without the layout, one ratio for all tensors gives different updates."""
    params, grads = make_problem(seed=1)
    want = reference_lamb(params, grads, **HP)
    flat = torch.nn.Parameter(torch.cat([p.reshape(-1) for p in params]))
    opt = Lamb([flat], **HP)
    for step_grads in grads:
        flat.grad = torch.cat([g.reshape(-1) for g in step_grads])
        opt.step()
    assert not torch.allclose(flat.detach().double(), torch.cat([w.reshape(-1) for w in want]), rtol=1e-3)


def test_state_dict_round_trip_continues_identically():
    params, grads = make_problem(seed=2, steps=6)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = Lamb(ps, **HP)
    for step_grads in grads[:3]:
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        opt.step()
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = Lamb(ps2, **HP)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read back from disk
    for step_grads in grads[3:]:
        for pa, pb, g in zip(ps, ps2, step_grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)

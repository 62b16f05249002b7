"""pretrain.runtime.optim.StableAdamW against torch-optimi's StableAdamW and AdamW (the independent reference ModernBERT
trained with), on whole tensors and on one flat tensor with a FlatLayout (what ZeRO hands the optimizer)."""

import contextlib
import copy

import optimi
import pytest
import torch

from pretrain.runtime.optim import StableAdamW
from pretrain.runtime.pertensor import FlatLayout

HP = dict(lr=0.01, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
SHAPES = [(7, 5), (5,), (3, 4, 2), (11,)]


def make_problem(seed=0, steps=5):
    """Gradients that grow 4x a step on some tensors, so that update clipping (rms > 1) bites on those only."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    growth = [4.0, 0.5, 0.5, 4.0]
    grads = [[torch.randn(s, generator=g) * c**t for s, c in zip(SHAPES, growth)] for t in range(steps)]
    return params, grads


def run(opt_cls, params, grads, **kw):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = opt_cls(ps, **kw)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps]


def reference(params, grads, clipping=True, **kw):
    cls = optimi.StableAdamW if clipping else optimi.AdamW
    warns = pytest.warns(UserWarning, match="potentially high") if kw.get("decouple_lr") else contextlib.nullcontext()
    with warns:  # optimi's note that weight decay 0.1 is high once it is not scaled by lr
        return run(cls, params, grads, foreach=False, triton=False, **HP, **kw)


@pytest.mark.parametrize("decouple_lr", [False, True])
@pytest.mark.parametrize("clipping", [True, False])
def test_whole_tensors_match_optimi(decouple_lr, clipping):
    params, grads = make_problem()
    want = reference(params, grads, clipping, decouple_lr=decouple_lr)
    got = run(StableAdamW, params, grads, update_clipping=clipping, decouple_lr=decouple_lr, **HP)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_update_clipping_bites_in_this_problem():
    """Sanity check of the tests here: StableAdamW and AdamW part ways on these gradients."""
    params, grads = make_problem()
    stable, plain = run(StableAdamW, params, grads, **HP), run(StableAdamW, params, grads, update_clipping=False, **HP)
    assert not torch.allclose(stable[0], plain[0]) and torch.allclose(stable[1], plain[1])


def flat_run(params, grads, with_layout: bool, pad: int = 3):
    numels = [p.numel() for p in params]
    flat = torch.nn.Parameter(torch.cat([p.reshape(-1) for p in params] + [torch.zeros(pad)]))
    opt = StableAdamW([flat], **HP)
    if with_layout:
        ids, lengths = torch.arange(len(params) + 1), torch.tensor(numels + [pad])
        opt.set_layout(flat, FlatLayout(tensor_ids=ids, lengths=lengths, num_tensors=len(params)))
    for step_grads in grads:
        flat.grad = torch.cat([g.reshape(-1) for g in step_grads] + [torch.zeros(pad)])
        opt.step()
    return flat.detach(), numels


def test_flat_partition_with_layout_clips_each_tensor_as_optimi_does():
    params, grads = make_problem(seed=1)
    want = torch.cat([w.reshape(-1) for w in reference(params, grads)])
    flat, numels = flat_run(params, grads, with_layout=True)
    torch.testing.assert_close(flat[: sum(numels)], want, rtol=1e-6, atol=1e-7)
    assert torch.all(flat[sum(numels) :] == 0)  # padding stays zero
    trap, _ = flat_run(params, grads, with_layout=False)  # one rms over every tensor: other updates
    assert not torch.allclose(trap[: sum(numels)], want, rtol=1e-4)


def test_state_dict_round_trip_continues_identically():
    params, grads = make_problem(seed=2, steps=6)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = StableAdamW(ps, decouple_lr=True, **HP)
    for step_grads in grads[:3]:
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        opt.step()
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = StableAdamW(ps2, **HP)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read back from disk: decouple_lr comes with it
    for step_grads in grads[3:]:
        for pa, pb, g in zip(ps, ps2, step_grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, ps2))

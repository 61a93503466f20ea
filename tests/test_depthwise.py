"""The tuned depthwise backward: each formulation equals the native gradient, the model is unchanged otherwise."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Conv2dSame

from edge_tl.finetune import depthwise
from edge_tl.finetune.depthwise import INPUT_GRAD, WEIGHT_GRAD, plan_training, tune_depthwise, untune_depthwise

SHAPES = [  # channels, (h, w), kernel, stride, padding
    (8, (9, 9), (3, 3), (1, 1), (1, 1)), (6, (10, 10), (3, 3), (2, 2), (1, 1)),  # (10 + 2 - 3) % 2: a row the stride skips
    (4, (11, 12), (5, 5), (2, 2), (0, 0)), (4, (12, 9), (5, 3), (1, 2), (2, 1)), (5, (7, 8), (3, 3), (1, 1), (0, 0)),
    (3, (13, 10), (5, 5), (2, 3), (1, 2)), (4, (9, 14), (3, 5), (3, 2), (2, 4))]


@pytest.mark.parametrize("channels,size,k,s,p", SHAPES)
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_formulation_equals_the_native_gradient(channels, size, k, s, p, channels_last, dtype):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, *size, generator=gen).to(dtype).contiguous(memory_format=fmt)
    w = torch.randn(channels, 1, *k, generator=gen).to(dtype)
    out = torch.nn.functional.conv2d(x.double(), w.double(), None, s, p, 1, channels)
    g = torch.randn(out.shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
    ref = torch.ops.aten.convolution_backward(g.double(), x.double(), w.double(), None, s, p, (1, 1),
                                              False, (0, 0), channels, (True, True, False))
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16 results: relative to the gradient's scale
    for name, fn in INPUT_GRAD.items():
        gx = fn(g, x, w, s, p)
        assert gx.shape == x.shape and gx.dtype == dtype, name
        assert (gx.double() - ref[0]).abs().max() <= tol * ref[0].abs().max(), name
    for name, fn in WEIGHT_GRAD.items():
        gw = fn(g, x, w, s, p)
        assert gw.shape == w.shape and gw.dtype == dtype, name
        assert (gw.double() - ref[1]).abs().max() <= tol * ref[1].abs().max(), name


def _net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True),
                               torch.nn.BatchNorm2d(8), Conv2dSame(8, 8, 5, stride=2, groups=8, bias=False),
                               torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Conv2d(8, 8, 3, groups=4),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def _grads(net, x, bf16=False):
    net.eval()  # no dropout draws, fixed BatchNorm statistics
    net.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        net(x).float().square().sum().backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.fixture
def alternatives(monkeypatch):
    """Fresh plans that always pick the non-native formulation, so the model tests exercise it."""
    monkeypatch.setattr(depthwise, "_plans", {})
    monkeypatch.setattr(depthwise, "_fastest", lambda methods, args: max(methods, key=lambda m: m != "native"))


@pytest.mark.parametrize("bf16", [False, True])
def test_tuned_model_same_parameters_outputs_and_gradients(alternatives, bf16):
    net, x = _net(), torch.randn(2, 3, 15, 15).contiguous(memory_format=torch.channels_last)

    def outputs():
        net.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return net(x)

    keys, ref_out, ref = list(net.state_dict()), outputs(), _grads(net, x, bf16)
    assert tune_depthwise(net) == 2  # the grouped (not depthwise) conv stays as it is
    assert list(net.state_dict()) == keys
    assert torch.equal(outputs(), ref_out)  # evaluation runs the plain convolution, bias included
    got = _grads(net, x, bf16)
    assert all(got[n].dtype == torch.float32 for n in got)
    tol = 3e-2 if bf16 else 1e-5
    assert all((got[n] - ref[n]).abs().max() <= tol * ref[n].abs().max() for n in ref)
    assert sorted(depthwise.saved_plans().values()) == [["flipped", "float32" if bf16 else "native"]] * 2
    untune_depthwise(net)
    assert [type(m) for m in net] == [type(m) for m in _net()]


def test_plan_training_times_every_shape_and_changes_nothing_else(monkeypatch):
    monkeypatch.setattr(depthwise, "_plans", {})
    net = _net()
    tune_depthwise(net)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    plan_training(net, [(4, 3, 15, 15), (4, 3, 20, 17)], torch.bfloat16)
    assert len(depthwise.saved_plans()) == 4  # two depthwise convs x two sizes
    assert net.training and all(p.grad is None for p in net.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BatchNorm statistics too
    planned = depthwise.saved_plans()
    for size in ((15, 15), (20, 17)):  # training steps (train mode, channels_last, any batch) time nothing new
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(torch.randn(3, 3, *size).contiguous(memory_format=torch.channels_last)).float().sum().backward()
    assert depthwise.saved_plans() == planned


def test_native_kept_unless_clearly_faster(monkeypatch):
    clock = [0.0]  # a fake clock: each method advances it by its cost
    monkeypatch.setattr(depthwise.time, "perf_counter", lambda: clock[0])

    def costs(**seconds):
        return {name: (lambda cost: lambda *args: clock.__setitem__(0, clock[0] + cost))(cost)
                for name, cost in seconds.items()}

    assert depthwise._fastest(costs(native=1.4, flipped=1.0), ()) == "flipped"
    assert depthwise._fastest(costs(native=1.2, flipped=1.0), ()) == "native"  # within MARGIN: stays native
    assert depthwise._fastest(costs(native=1.0, flipped=2.0), ()) == "native"
    assert depthwise._fastest(costs(native=3.0, flipped=2.0, float32=1.0), ()) == "float32"


def test_saved_plans_are_replayed_and_unknown_ones_ignored(monkeypatch):
    monkeypatch.setattr(depthwise, "_plans", {})
    depthwise.load_plans({"a": ["flipped", "float32"], "b": ["from-a-newer-version", "native"]})
    assert depthwise.saved_plans() == {"a": ["flipped", "float32"]}

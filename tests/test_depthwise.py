"""The tuned depthwise backward: each formulation equals the native gradient, the model is unchanged otherwise."""

from __future__ import annotations

import time

import pytest
import torch
from timm.layers import Conv2dSame

from edge_tl.finetune import depthwise
from edge_tl.finetune.depthwise import INPUT_GRAD, WEIGHT_GRAD, tune_depthwise, untune_depthwise

SHAPES = [  # channels, size, kernel, stride, padding; (10 + 2 - 3) % 2 = 1: a row the stride skips
    (8, 9, 3, 1, 1), (6, 10, 3, 2, 1), (4, 11, 5, 2, 0), (4, 12, 5, 1, 2), (5, 7, 3, 1, 0), (3, 13, 5, 2, 1)]


@pytest.mark.parametrize("channels,size,k,s,p", SHAPES)
@pytest.mark.parametrize("channels_last", [True, False])
def test_every_formulation_equals_the_native_gradient(channels, size, k, s, p, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, size, size, generator=gen).contiguous(memory_format=fmt)
    w = torch.randn(channels, 1, k, k, generator=gen)
    out = torch.nn.functional.conv2d(x, w, None, s, p, 1, channels)
    g = torch.randn(out.shape, generator=gen).contiguous(memory_format=fmt)
    ref = torch.ops.aten.convolution_backward(g.double(), x.double(), w.double(), None, (s, s), (p, p), (1, 1),
                                              False, (0, 0), channels, (True, True, False))
    for name, fn in INPUT_GRAD.items():
        gx = fn(g, x, w, (s, s), (p, p))
        assert gx.shape == x.shape and torch.allclose(gx.double(), ref[0], atol=1e-5), name
    for name, fn in WEIGHT_GRAD.items():
        gw = fn(g, x, w, (s, s), (p, p))
        assert gw.shape == w.shape and torch.allclose(gw.double(), ref[1], atol=1e-4), name


def _net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True),
                               Conv2dSame(8, 8, 5, stride=2, groups=8, bias=False), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, groups=4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def _grads(net, x, bf16=False):
    net.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        net(x).float().square().sum().backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.fixture
def alternatives(monkeypatch):
    """Fresh plans that always pick the non-native formulation, so the model tests exercise it."""
    monkeypatch.setattr(depthwise, "_plans", {})
    monkeypatch.setattr(depthwise, "_fastest", lambda methods, args: max(methods, key=lambda m: m != "native"))


def test_tuned_model_same_parameters_outputs_and_gradients(alternatives):
    net, x = _net(), torch.randn(2, 3, 15, 15).contiguous(memory_format=torch.channels_last)
    keys, ref_out, ref = list(net.state_dict()), net(x).detach(), _grads(net, x)
    assert tune_depthwise(net) == 2  # the grouped (not depthwise) conv stays as it is
    assert list(net.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(net(x), ref_out)  # evaluation runs the plain convolution
    got = _grads(net, x)
    assert all(torch.allclose(got[n], ref[n], rtol=1e-5, atol=1e-6) for n in ref)
    assert sorted(depthwise.saved_plans().values()) == [["flipped", "native"]] * 2  # float32: no float32 variant
    untune_depthwise(net)
    assert [type(m) for m in net] == [type(m) for m in _net()]


def test_tuned_model_under_bf16_autocast(alternatives):
    net, x = _net(), torch.randn(2, 3, 15, 15)
    ref = _grads(net, x, bf16=True)
    tune_depthwise(net)
    got = _grads(net, x, bf16=True)
    assert all(got[n].dtype == torch.float32 for n in got)
    assert all(torch.allclose(got[n], ref[n], rtol=3e-2, atol=3e-2 * ref[n].abs().max().item()) for n in ref)
    assert sorted(depthwise.saved_plans().values()) == [["flipped", "float32"]] * 2


def test_native_kept_unless_clearly_faster():
    def sleeper(seconds):
        return lambda *args: time.sleep(seconds)

    assert depthwise._fastest({"native": sleeper(0.03), "alt": sleeper(0.0)}, ()) == "alt"
    assert depthwise._fastest({"native": sleeper(0.0), "alt": sleeper(0.03)}, ()) == "native"
    assert depthwise._fastest({"native": sleeper(0.02), "alt": sleeper(0.02)}, ()) == "native"


def test_saved_plans_are_replayed_and_unknown_ones_ignored(monkeypatch):
    monkeypatch.setattr(depthwise, "_plans", {})
    depthwise.load_plans({"a": ["flipped", "float32"], "b": ["from-a-newer-version", "native"]})
    assert depthwise.saved_plans() == {"a": ["flipped", "float32"]}

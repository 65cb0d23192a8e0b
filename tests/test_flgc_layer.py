"""Flgc2d against an independent computation of REFERENCE.md section 1 (numpy group ids, explicit mask)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flgc_lightning.layers import Flgc2d, straight_through_one_hot


def numpy_group_ids(logits: torch.Tensor) -> np.ndarray:
    a = logits.detach().double().numpy()
    p = np.exp(a - a.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p.argmax(axis=1)  # numpy also returns the first maximal index


def independent_forward(layer: Flgc2d, x: torch.Tensor) -> torch.Tensor:
    gin, gout = numpy_group_ids(layer.in_assign), numpy_group_ids(layer.out_assign)
    mask = torch.tensor(gout[:, None] == gin[None, :], dtype=x.dtype)
    return F.conv2d(x, layer.weight * mask[:, :, None, None], layer.bias, layer.stride, layer.padding, layer.dilation)


def independent_grads(layer: Flgc2d, x: torch.Tensor, grad_out: torch.Tensor, ids=None):
    """Gradients by hand: straight-through at the selected entry, then the softmax Jacobian.
    ``ids``: the group-id rule (default: argmax of the softmax, in numpy)."""
    ids = ids or numpy_group_ids
    grads = {}
    probs, hards = [], []
    for name in ("in_assign", "out_assign"):
        a = getattr(layer, name).detach()
        p = torch.softmax(a, dim=1)
        b = torch.zeros_like(p)
        b[torch.arange(len(p)), torch.as_tensor(ids(a))] = 1.0
        probs.append(p)
        hards.append(b.requires_grad_(True))
    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(True)
    mask = hards[1] @ hards[0].t()
    out = F.conv2d(x, weight * mask[:, :, None, None], bias, layer.stride, layer.padding, layer.dilation)
    out.backward(grad_out)
    grads["weight"] = weight.grad
    if bias is not None:
        grads["bias"] = bias.grad
    for name, p, b in zip(("in_assign", "out_assign"), probs, hards):
        grad_p = b.grad * b.detach()  # straight-through at the selected entry only
        grads[name] = p * (grad_p - (grad_p * p).sum(dim=1, keepdim=True))  # softmax backward
    return grads


CASES = [
    dict(cin=32, cout=16, k=1, stride=1, padding=0, dilation=1, groups=8, bias=False),
    dict(cin=12, cout=20, k=3, stride=2, padding=1, dilation=1, groups=3, bias=True),
    dict(cin=7, cout=5, k=3, stride=1, padding=2, dilation=2, groups=5, bias=True),  # G not dividing C
    dict(cin=4, cout=3, k=1, stride=1, padding=0, dilation=1, groups=16, bias=False),  # G > channels
    dict(cin=6, cout=6, k=(3, 1), stride=(1, 2), padding=(1, 0), dilation=1, groups=2, bias=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['cin']}x{c['cout']}k{c['k']}G{c['groups']}")
def test_forward_and_gradients_match_independent_computation(case):
    torch.manual_seed(0)
    layer = Flgc2d(case["cin"], case["cout"], case["k"], stride=case["stride"], padding=case["padding"],
                   dilation=case["dilation"], groups=case["groups"], bias=case["bias"]).double()
    x = torch.randn(2, case["cin"], 9, 9, dtype=torch.float64)
    out = layer(x)
    expected = independent_forward(layer, x)
    assert out.shape == expected.shape
    assert torch.equal(out, expected)

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    for name, grad in independent_grads(layer, x, grad_out).items():
        torch.testing.assert_close(getattr(layer, name).grad, grad, rtol=1e-10, atol=1e-12, msg=name)


def test_group_ids_match_numpy_and_mask_is_binary():
    torch.manual_seed(1)
    layer = Flgc2d(24, 40, 1, groups=6)
    assert torch.equal(layer.input_groups(), torch.from_numpy(numpy_group_ids(layer.in_assign)))
    assert torch.equal(layer.filter_groups(), torch.from_numpy(numpy_group_ids(layer.out_assign)))
    mask = layer.connection_mask().detach()
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    gin, gout = layer.input_groups(), layer.filter_groups()
    assert torch.equal(mask, (gout[:, None] == gin[None, :]).float())


def test_ties_put_every_channel_in_exactly_one_group():
    layer = Flgc2d(5, 4, 1, groups=3)
    with torch.no_grad():
        layer.in_assign.zero_()  # every input ties across all groups
        layer.out_assign.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 3.0, 3.0], [0.0, 0.0, 5.0]]))
    b_in = straight_through_one_hot(layer.in_assign)
    assert torch.equal(b_in.sum(dim=1), torch.ones(5))  # the reference's P == max(P) would give 3
    assert layer.input_groups().tolist() == [0, 0, 0, 0, 0]
    assert layer.filter_groups().tolist() == [0, 1, 0, 2]
    mask = layer.connection_mask().detach()
    assert mask.max() == 1.0
    assert mask.tolist() == [[1.0] * 5, [0.0] * 5, [1.0] * 5, [0.0] * 5]


def test_straight_through_gradient_only_at_selected_entry():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]], requires_grad=True)
    b = straight_through_one_hot(logits)
    assert torch.equal(b.detach(), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    upstream = torch.tensor([[5.0, 7.0, 11.0], [13.0, 17.0, 19.0]])
    b.backward(upstream)
    p = torch.softmax(logits.detach(), dim=1)
    grad_p = upstream * b.detach()
    expected = p * (grad_p - (grad_p * p).sum(dim=1, keepdim=True))
    torch.testing.assert_close(logits.grad, expected)


def test_empty_groups_are_allowed():
    layer = Flgc2d(4, 4, 1, groups=4, bias=False)
    with torch.no_grad():  # inputs all in group 0, filters all in group 3: nothing connects
        layer.in_assign.copy_(torch.tensor([[9.0, 0, 0, 0]] * 4))
        layer.out_assign.copy_(torch.tensor([[0, 0, 0, 9.0]] * 4))
    assert torch.count_nonzero(layer(torch.randn(1, 4, 3, 3))) == 0


def test_drop_in_signature_and_validation():
    layer = Flgc2d(8, 8, kernel_size=3, stride=1, padding=1, groups=4)
    assert layer.groups == 1 and layer.num_groups == 4  # the conv itself stays dense
    assert layer.in_assign.shape == (8, 4) and layer.out_assign.shape == (8, 4)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            Flgc2d(8, 8, 1, groups=bad)


def test_assignment_init_is_standard_normal():
    torch.manual_seed(0)
    layer = Flgc2d(512, 512, 1, groups=16)
    values = torch.cat([layer.in_assign.detach().flatten(), layer.out_assign.detach().flatten()])
    assert abs(values.mean().item()) < 0.02 and abs(values.std().item() - 1.0) < 0.02


# ---- controls: frozen and balanced assignments ---------------------------------------------------
from flgc_lightning.layers import BalancedFlgc2d, balanced_group_ids, make_pointwise_conv  # noqa: E402


def gale_shapley(logits: np.ndarray) -> np.ndarray:
    """Rows propose one at a time (textbook deferred acceptance); each group keeps its C/G best by logit."""
    rows, groups = logits.shape
    capacity = rows // groups
    preference = [sorted(range(groups), key=lambda g: (-logits[r, g], g)) for r in range(rows)]
    nxt, held = [0] * rows, {g: [] for g in range(groups)}
    free = list(range(rows))
    while free:
        r = free.pop(0)
        g = preference[r][nxt[r]]
        nxt[r] += 1
        held[g].append(r)
        held[g].sort(key=lambda q: (-logits[q, g], q))
        if len(held[g]) > capacity:
            free.append(held[g].pop())
    ids = np.empty(rows, dtype=np.int64)
    for g, members in held.items():
        ids[members] = g
    return ids


@pytest.mark.parametrize("rows, groups", [(8, 8), (16, 2), (48, 8), (96, 4), (64, 16), (24, 3)])
def test_balanced_ids_are_the_stable_matching_with_equal_groups(rows, groups):
    gen = torch.Generator().manual_seed(rows * groups)
    for _ in range(5):
        logits = torch.randn(rows, groups, generator=gen)
        ids = balanced_group_ids(logits)
        assert torch.bincount(ids, minlength=groups).tolist() == [rows // groups] * groups
        assert ids.tolist() == gale_shapley(logits.double().numpy()).tolist()
    ties = balanced_group_ids(torch.zeros(rows, groups))  # all equal: rows fill the groups in order
    assert ties.tolist() == np.repeat(np.arange(groups), rows // groups).tolist()


@pytest.mark.parametrize("rounds", [0, 1, 2, 3])
def test_balanced_ids_stay_equal_when_the_rounds_do_not_suffice(rounds):
    """Too few rounds to finish the matching (rows that all rank the groups alike need G rounds): the sizes
    are still exactly equal, and every group holds only rows it accepted or free places filled in row order."""
    gen = torch.Generator().manual_seed(rounds)
    alike = torch.linspace(2, 1, 96)[:, None] * torch.linspace(1, 0, 8)[None, :]  # every row: 0 > 1 > ... > 7
    for logits in (alike, torch.randn(96, 8, generator=gen), torch.randn(960, 8, generator=gen)):
        ids = balanced_group_ids(logits, rounds=rounds)
        assert torch.bincount(ids, minlength=8).tolist() == [len(logits) // 8] * 8
    assert balanced_group_ids(alike, rounds=8).tolist() == np.repeat(np.arange(8), 12).tolist()


def test_balanced_layer_keeps_equal_groups_at_every_step_and_learns_through_straight_through():
    torch.manual_seed(0)
    layer = BalancedFlgc2d(48, 24, 1, groups=4, bias=False).double()
    opt = torch.optim.SGD(layer.parameters(), lr=50.0)  # large: assignments must move
    x = torch.randn(4, 48, 5, 5, dtype=torch.float64)
    moved = 0
    for _ in range(20):
        before = layer.input_groups().clone()
        opt.zero_grad()
        out = layer(x)
        grad_out = 2 * out.detach() / out.numel()
        out.square().mean().backward()
        expected = independent_grads(layer, x, grad_out, ids=lambda a: gale_shapley(a.numpy()))
        for name, grad in expected.items():
            torch.testing.assert_close(getattr(layer, name).grad, grad, rtol=1e-9, atol=1e-12, msg=name)
        opt.step()
        for side in layer.group_sizes():
            assert side.tolist() == [side.sum().item() // 4] * 4
        moved += int((layer.input_groups() != before).sum())
        # forward equals the masked conv of the balanced ids (independent mask)
        gin, gout = layer.input_groups(), layer.filter_groups()
        mask = (gout[:, None] == gin[None, :]).float()
        mask = mask.double()
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight * mask[:, :, None, None]), rtol=0, atol=0)
    assert moved > 0


def test_balanced_layer_needs_divisible_channels():
    with pytest.raises(ValueError, match="divisible"):
        BalancedFlgc2d(10, 8, 1, groups=4)


def test_frozen_assignments_never_change_while_the_weights_learn():
    torch.manual_seed(0)
    layer = make_pointwise_conv(32, 16, groups=4, use_flgc=True, assignment="frozen")
    start_in, start_out, start_w = layer.in_assign.clone(), layer.out_assign.clone(), layer.weight.clone()
    opt = torch.optim.SGD(layer.parameters(), lr=10.0, momentum=0.9, weight_decay=1e-2)
    for _ in range(10):
        opt.zero_grad()
        layer(torch.randn(2, 32, 4, 4)).square().mean().backward()
        opt.step()
    assert torch.equal(layer.in_assign, start_in) and torch.equal(layer.out_assign, start_out)
    assert not torch.equal(layer.weight, start_w)
    assert not layer.learn_assignments and "frozen" in repr(layer)


def test_assignment_init_scale():
    torch.manual_seed(0)
    layer = Flgc2d(500, 400, 1, groups=8, init_std=0.1)
    assert abs(layer.in_assign.std().item() - 0.1) < 0.01
    with pytest.raises(ValueError, match="assign_init_std"):
        Flgc2d(4, 4, 1, groups=2, init_std=0.0)

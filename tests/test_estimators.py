"""The assignment-gradient estimators (reference, ste, gumbel), dense weight gradients and their schedule.

Gradients are checked against hand computations (numpy, float64, explicit softmax Jacobians); the three
properties of REFERENCE.md section 7 are shown for ``reference`` and shown gone for the others.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from hydra.utils import instantiate
from torch import nn

from flgc_lightning.config import compose
from flgc_lightning.data import DigitsDataModule
from flgc_lightning.errors import ConfigError
from flgc_lightning.layers import BalancedFlgc2d, Flgc2d, balanced_group_ids, group_ids, make_pointwise_conv
from flgc_lightning.training.assign_schedule import AssignSchedule, noise_seed, refresh_assignment_noise
from flgc_lightning.training.module import ImageClassifier
from flgc_lightning.training.validation import check_resume_compatible, resume_setting_changes

ESTIMATORS = ("reference", "ste", "gumbel")


# ---- gradients by hand --------------------------------------------------------------------------------
A_IN = [[0.3, -0.2], [-1.0, 0.5], [0.8, 0.1], [0.0, 0.4]]  # 4 inputs, G = 2
A_OUT = [[1.2, -0.3], [-0.5, 0.7], [0.2, 0.25]]  # 3 filters
W = [[0.5, -1.0, 0.25, 2.0], [1.5, 0.75, -0.5, -0.25], [-2.0, 1.0, 0.5, 1.25]]
G_IN = [[0.0, 0.0], [1.0, -1.0], [-0.9, 0.0], [0.0, 0.0]]  # moves input 1 to group 0 and input 2 to group 1
G_OUT = [[0.0, 0.0], [0.0, 0.0], [0.3, -0.5]]  # moves filter 2 from group 1 to group 0
TAU = 0.5


def softmax_rows(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def by_hand(estimator: str, dense: bool, x: np.ndarray, r: np.ndarray) -> dict[str, np.ndarray]:
    """Loss ``sum(conv1x1(x, W * M) * r)``: its gradients written out one factor at a time."""
    a_in, a_out, w = np.array(A_IN), np.array(A_OUT), np.array(W)
    gumbel = estimator == "gumbel"
    z_in = a_in + np.array(G_IN) if gumbel else a_in  # the logits the groups are drawn from
    z_out = a_out + np.array(G_OUT) if gumbel else a_out
    b_in, b_out = np.eye(2)[z_in.argmax(1)], np.eye(2)[z_out.argmax(1)]
    mask = b_out @ b_in.T
    grad_w_eff = np.einsum("nohw,nihw->oi", r, x)  # d loss / d (W * M)
    grad_mask = grad_w_eff * w
    grad_b_out, grad_b_in = grad_mask @ b_in, grad_mask.T @ b_out
    grads = {"weight": grad_w_eff if dense else grad_w_eff * mask, "mask": mask}
    for name, z, b, grad_b in (("in_assign", z_in, b_in, grad_b_in), ("out_assign", z_out, b_out, grad_b_out)):
        scale = 1 / TAU if gumbel else 1.0
        p = softmax_rows(z * scale)
        grad_p = grad_b * b if estimator == "reference" else grad_b
        rows = []
        for k in range(len(z)):
            jacobian = np.diag(p[k]) - np.outer(p[k], p[k])  # d softmax / d its input
            rows.append(scale * jacobian @ grad_p[k])
        grads[name] = np.array(rows)
    return grads


def tiny_layer(estimator: str, dense: bool) -> Flgc2d:
    layer = Flgc2d(4, 3, 1, groups=2, bias=False, assign_grad=estimator, dense_weight_grad=dense).double()
    with torch.no_grad():
        layer.in_assign.copy_(torch.tensor(A_IN, dtype=torch.float64))
        layer.out_assign.copy_(torch.tensor(A_OUT, dtype=torch.float64))
        layer.weight.copy_(torch.tensor(W, dtype=torch.float64)[:, :, None, None])
        if estimator == "gumbel":
            layer.gumbel_in.copy_(torch.tensor(G_IN, dtype=torch.float64))
            layer.gumbel_out.copy_(torch.tensor(G_OUT, dtype=torch.float64))
            layer.set_gumbel_tau(TAU)
    return layer


@pytest.mark.parametrize("dense", [False, True], ids=["masked_w", "dense_w"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradients_match_a_hand_computation(estimator, dense):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 2, 3, generator=gen, dtype=torch.float64)
    r = torch.randn(2, 3, 2, 3, generator=gen, dtype=torch.float64)
    layer = tiny_layer(estimator, dense)
    out = layer(x)
    expected = by_hand(estimator, dense, x.numpy(), r.numpy())
    mask = torch.tensor(expected["mask"])
    assert torch.equal(out, F.conv2d(x, layer.weight * mask[:, :, None, None]))
    (out * r).sum().backward()
    for name in ("in_assign", "out_assign", "weight"):
        got = getattr(layer, name).grad.squeeze()
        np.testing.assert_allclose(got.numpy(), expected[name], rtol=1e-12, atol=1e-14, err_msg=name)
    if estimator == "gumbel":  # the noise decided the groups: input 1 left group 1, filter 2 joined group 0
        assert expected["mask"][2].tolist() == [1, 1, 0, 0]
    assert (layer.input_groups().tolist(), layer.filter_groups().tolist()) == ([0, 1, 0, 1], [0, 1, 1])  # noise-free


# ---- REFERENCE.md section 7, shown for the reference and gone for the others ----------------------------
def bn_gradients(estimator: str, dense: bool, eps: float = 1e-5) -> tuple[float, float]:
    torch.manual_seed(0)
    layer = Flgc2d(64, 96, 1, groups=8, bias=False, assign_grad=estimator, dense_weight_grad=dense)
    net = nn.Sequential(layer, nn.BatchNorm2d(96, eps=eps)).double()
    x, target = torch.randn(16, 64, 8, 8, dtype=torch.float64), torch.randn(16, 96, 8, 8, dtype=torch.float64)
    (net(x) - target).square().mean().backward()
    return layer.in_assign.grad.norm().item(), layer.out_assign.grad.norm().item()


def test_reference_gives_filters_no_gradient_behind_batch_norm_and_ste_does():
    inputs, filters = bn_gradients("reference", False)
    assert filters < 0.03 * inputs  # 2.0e-5 against 1.2e-3
    inputs, filters = bn_gradients("reference", False, eps=1e-11)  # it is BatchNorm's eps, nothing else
    assert filters < 1e-7 * inputs
    for estimator, dense in (("ste", False), ("ste", True), ("gumbel", True)):
        inputs, filters = bn_gradients(estimator, dense, eps=1e-11)
        assert filters > 0.5 * inputs, (estimator, dense, inputs, filters)


def unselected_order(logits: torch.Tensor) -> list[list[int]]:
    """Per row, the unselected groups sorted by logit."""
    rows = []
    for row in logits.detach():
        order = torch.argsort(row, descending=True, stable=True).tolist()
        rows.append(order[1:])
    return rows


def orders_after_one_step(estimator: str) -> tuple[list, list, torch.Tensor, torch.Tensor]:
    """One SGD step from logits whose unselected entries nearly tie (gaps ~1e-3): any rule that can reorder
    them will. Returns the unselected orders before and after, the step and the probabilities."""
    torch.manual_seed(1)
    layer = Flgc2d(32, 24, 1, groups=6, bias=False, assign_grad=estimator).double()
    with torch.no_grad():
        for p in (layer.in_assign, layer.out_assign):
            p.copy_(2.0 * F.one_hot(torch.randint(0, 6, (len(p),)), 6) + 1e-3 * torch.randn_like(p))
    start = layer.in_assign.detach().clone()
    before = unselected_order(layer.in_assign) + unselected_order(layer.out_assign)
    x, target = torch.randn(8, 32, 4, 4, dtype=torch.float64), torch.randn(8, 24, 4, 4, dtype=torch.float64)
    (layer(x) - target).square().mean().backward()
    with torch.no_grad():
        for p in (layer.in_assign, layer.out_assign):
            p -= 5.0 * p.grad
    after = unselected_order(layer.in_assign) + unselected_order(layer.out_assign)
    return before, after, layer.in_assign.detach() - start, torch.softmax(start, dim=1)


def test_reference_never_reorders_unselected_logits_and_ste_does():
    before, after, step, probs = orders_after_one_step("reference")
    assert before == after
    # why: each unselected logit moves by the same multiple of its probability
    unselected = F.one_hot(probs.argmax(1), 6) == 0
    ratio = (step / probs)[unselected].view(len(probs), 5)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-9, atol=1e-15)
    before, after, _, _ = orders_after_one_step("ste")
    assert sum(a != b for a, b in zip(before, after)) >= 10


def test_dense_weight_grad_keeps_forward_values_and_gives_the_unmasked_gradient():
    torch.manual_seed(2)
    masked = Flgc2d(12, 10, 3, padding=1, groups=3, bias=True)
    dense = copy.deepcopy(masked)
    dense.dense_weight_grad = True
    x = torch.randn(2, 12, 5, 5)
    out_masked, out_dense = masked(x), dense(x)
    assert torch.equal(out_masked, out_dense)
    grad_out = torch.randn_like(out_masked)
    out_masked.backward(grad_out)
    out_dense.backward(grad_out)
    w_eff = masked.masked_weight().detach().requires_grad_(True)  # d loss / d (W * M), by autograd on a leaf
    F.conv2d(x, w_eff, masked.bias.detach(), padding=1).backward(grad_out)
    mask = masked.connection_mask().detach()[:, :, None, None]
    assert torch.equal(dense.weight.grad, w_eff.grad)
    assert torch.equal(masked.weight.grad, w_eff.grad * mask)
    assert (dense.weight.grad * (1 - mask)).abs().sum() > 0  # masked weights do get a gradient now
    for name in ("in_assign", "out_assign", "bias"):
        torch.testing.assert_close(getattr(dense, name).grad, getattr(masked, name).grad, rtol=1e-6, atol=0)


def test_masked_weights_learn_only_with_dense_weight_grad():
    for dense in (False, True):
        torch.manual_seed(0)
        layer = Flgc2d(16, 8, 1, groups=4, bias=False, dense_weight_grad=dense)
        off = 1 - layer.connection_mask().detach()[:, :, None, None]
        start = layer.weight.detach().clone()
        opt = torch.optim.SGD([layer.weight], lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            layer(torch.randn(4, 16, 3, 3)).square().mean().backward()
            opt.step()
        moved = ((layer.weight.detach() - start) * off).abs().sum().item()
        assert (moved > 0) == dense


# ---- the reference path is unchanged ------------------------------------------------------------------
def old_straight_through(logits, ids):
    """The reference estimator as the code had it before the estimators existed (copied, on purpose)."""
    probs = torch.softmax(logits, dim=1)
    hard = torch.zeros_like(probs).scatter_(1, ids[:, None], 1.0)
    selected = probs * hard
    return hard + (selected - selected.detach())


def old_forward(layer: Flgc2d, x: torch.Tensor, rule) -> torch.Tensor:
    b_in = old_straight_through(layer.in_assign, rule(layer.in_assign))
    b_out = old_straight_through(layer.out_assign, rule(layer.out_assign))
    weight = layer.weight * (b_out @ b_in.t())[:, :, None, None].to(layer.weight.dtype)
    return layer._conv_forward(x, weight, layer.bias)


@pytest.mark.parametrize("cls, rule", [(Flgc2d, group_ids), (BalancedFlgc2d, balanced_group_ids)])
def test_reference_is_bit_identical_to_the_old_computation(cls, rule):
    torch.manual_seed(4)
    layer = cls(24, 16, 3, padding=1, groups=4, bias=True)
    old = copy.deepcopy(layer)
    x = torch.randn(3, 24, 6, 6)
    out, expected = layer(x), old_forward(old, x, rule)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for (name, a), b in zip(layer.named_parameters(), old.parameters()):
        assert torch.equal(a.grad, b.grad), name


def one_step(overrides: list[str]) -> dict[str, torch.Tensor]:
    cfg = compose("train", overrides)
    model = OmegaConf.to_container(cfg.model, resolve=True) | {"num_classes": 10, "in_channels": 3}
    torch.manual_seed(0)
    net = instantiate(model)
    optimizer = instantiate(OmegaConf.to_container(cfg.optimizer, resolve=True), params=net.parameters())
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    F.cross_entropy(net(x), y).backward()
    optimizer.step()
    return net.state_dict()


def test_the_default_config_is_the_reference_estimator_to_the_bit():
    cfg = compose("train")
    assert cfg.model.assign_grad == "reference" and cfg.model.dense_weight_grad is False
    assert (cfg.assign_optim.warmup_epochs, cfg.assign_optim.freeze_epoch) == (0, None)
    default = one_step([])
    explicit = one_step(["model.assign_grad=reference", "model.dense_weight_grad=false"])
    assert list(default) == list(explicit)  # no new state (Gumbel buffers are not saved, and only exist for gumbel)
    assert all(torch.equal(default[k], explicit[k]) for k in default)
    ste = one_step(["model.assign_grad=ste"])
    assert list(ste) == list(default)
    assert not all(torch.equal(default[k], ste[k]) for k in default)  # the switch does reach the layers


# ---- Gumbel noise -------------------------------------------------------------------------------------
def gumbel_layer(cls=Flgc2d, **kwargs) -> Flgc2d:
    torch.manual_seed(5)
    return cls(16, 24, 1, groups=4, bias=False, assign_grad="gumbel", **kwargs)


def test_noise_is_a_function_of_seed_step_and_layer():
    layers = [(0, gumbel_layer()), (1, gumbel_layer())]
    schedule = AssignSchedule()

    def draw(seed, step):
        refresh_assignment_noise(layers, schedule, seed, step, epoch=0, max_epochs=10)
        return [(m.gumbel_in.clone(), m.gumbel_out.clone()) for _, m in layers]

    first = draw(7, 3)
    assert all(torch.equal(a, b) for x, y in zip(first, draw(7, 3)) for a, b in zip(x, y))
    assert not torch.equal(first[0][0], draw(7, 4)[0][0])
    assert not torch.equal(first[0][0], draw(8, 3)[0][0])
    assert not torch.equal(first[0][0], first[1][0][: len(first[0][0])])  # layers differ at the same step
    assert len({noise_seed(7, s, i) for s in range(200) for i in range(20)}) == 4000
    # Gumbel(0, 1): mean = Euler's gamma, variance pi^2 / 6
    big = Flgc2d(400, 400, 1, groups=50, assign_grad="gumbel")
    refresh_assignment_noise([(0, big)], schedule, 0, 0, 0, 10)
    noise = torch.cat([big.gumbel_in.flatten(), big.gumbel_out.flatten()]).double()
    assert abs(noise.mean().item() - 0.5772) < 0.01 and abs(noise.var().item() - np.pi ** 2 / 6) < 0.03


@pytest.mark.parametrize("cls", [Flgc2d, BalancedFlgc2d])
def test_gumbel_groups_come_from_the_noisy_logits_in_training_and_not_in_eval(cls):
    layer = gumbel_layer(cls)
    x = torch.randn(2, 16, 3, 3)
    rule = cls.group_rule
    refresh_assignment_noise([(0, layer)], AssignSchedule(), 0, 0, 0, 10)
    noisy = (rule(layer.in_assign + layer.gumbel_in), rule(layer.out_assign + layer.gumbel_out))
    clean = (rule(layer.in_assign), rule(layer.out_assign))
    assert not torch.equal(noisy[0], clean[0])
    for ids, mode in ((noisy, True), (clean, False)):
        layer.train(mode)
        mask = (ids[1][:, None] == ids[0][None, :]).float()
        assert torch.equal(layer(x), F.conv2d(x, layer.weight * mask[:, :, None, None]))
    assert torch.equal(layer.input_groups(), clean[0]) and torch.equal(layer.filter_groups(), clean[1])


def test_zero_noise_at_temperature_one_is_ste():
    gumbel, ste = gumbel_layer(), gumbel_layer()
    ste.assign_grad = "ste"
    x = torch.randn(2, 16, 3, 3)
    for layer in (gumbel, ste):
        layer(x).square().sum().backward()
    for name in ("in_assign", "out_assign", "weight"):
        assert torch.equal(getattr(gumbel, name).grad, getattr(ste, name).grad), name


def test_estimator_options_are_checked_and_threaded_through():
    with pytest.raises(ValueError, match="assign_grad must be one of reference, ste, gumbel, got 'straight'"):
        Flgc2d(4, 4, 1, groups=2, assign_grad="straight")
    with pytest.raises(ValueError, match="dense_weight_grad must be a boolean"):
        Flgc2d(4, 4, 1, groups=2, dense_weight_grad=1)
    layer = make_pointwise_conv(16, 8, 4, True, "balanced", 1.0, "gumbel", True)
    assert isinstance(layer, BalancedFlgc2d) and layer.assign_grad == "gumbel" and layer.dense_weight_grad
    assert "assign_grad=gumbel, dense_weight_grad, balanced" in repr(layer)
    assert {n for n, _ in layer.named_buffers()} == {"gumbel_in", "gumbel_out", "gumbel_tau"}
    assert not any(k.startswith("gumbel") for k in layer.state_dict())
    assert not list(make_pointwise_conv(16, 8, 4, True).named_buffers())  # the reference keeps no buffers
    cfg = compose("train", ["model.assign_grad=gumbel", "model.dense_weight_grad=true", "model.width_mult=0.25"])
    net = instantiate(OmegaConf.to_container(cfg.model, resolve=True) | {"num_classes": 10, "in_channels": 3})
    layers = [m for m in net.modules() if isinstance(m, Flgc2d)]
    assert len(layers) == 17 and all(m.assign_grad == "gumbel" and m.dense_weight_grad for m in layers)


# ---- the schedule -------------------------------------------------------------------------------------
def test_schedule_values_and_checks():
    s = AssignSchedule(warmup_epochs=2, freeze_epoch=5, tau_start=2.0, tau_end=0.02, tau_epochs=4)
    assert [s.learning(e) for e in range(7)] == [False, False, True, True, True, False, False]
    assert [round(s.tau(e, 100), 12) for e in (0, 2, 4, 9)] == [2.0, 0.2, 0.02, 0.02]
    assert AssignSchedule(tau_start=1.0, tau_end=0.1).tau(5, 10) == pytest.approx(10 ** -0.5)
    assert AssignSchedule().tau(3, None) == 1.0 and AssignSchedule().tau(3, -1) == 1.0
    assert [AssignSchedule(regroup_epochs=[1, 3]).regroups(e) for e in range(5)] == [False, True, False, True, False]
    for bad, message in ((dict(warmup_epochs=-1), "warmup_epochs must be >= 0"),
                         (dict(warmup_epochs=3, freeze_epoch=3), "freeze_epoch must be > warmup_epochs (3)"),
                         (dict(tau_start=0.0), "tau_start must be > 0"), (dict(tau_end=-1.0), "tau_end must be > 0"),
                         (dict(tau_epochs=0), "tau_epochs must be >= 1"),
                         (dict(regroup_epochs=[2, -1]), "regroup_epochs must be epochs >= 0"),
                         (dict(freeze_epoch=4, regroup_epochs=[2, 5]), "regroup_epochs must be <= freeze_epoch (4)")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            AssignSchedule(**bad)
    with pytest.raises(ConfigError, match="assign_optim.freeze_epoch must be > warmup_epochs"):
        classifier(assign_optim={"warmup_epochs": 2, "freeze_epoch": 1})


def classifier(assign_grad: str = "reference", lr: float = 0.05, assign_optim: dict | None = None, **model):
    net = {"_target_": "flgc_lightning.models.MobileNetV2", "num_classes": 10, "groups": 4, "use_flgc": True,
           "width_mult": 0.25, "in_channels": 1, "assign_grad": assign_grad, **model}
    return ImageClassifier(net, {"_target_": "torch.optim.SGD", "lr": lr, "momentum": 0.9, "weight_decay": 1e-3},
                           None, (1, 16, 16), assign_optim=assign_optim)


class Watch(pl.Callback):
    """Assignment logits at every epoch start and end, and whether Gumbel noise was on in each step."""

    def __init__(self):
        self.starts, self.ends, self.noise = [], [], []

    @staticmethod
    def logits(module):
        return [p.detach().clone() for n, p in module.named_parameters() if n.endswith("_assign")]

    def on_train_epoch_start(self, trainer, module):
        self.starts.append(self.logits(module))

    def on_train_epoch_end(self, trainer, module):
        self.ends.append(self.logits(module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        layers = [m for m in module.net.modules() if isinstance(m, Flgc2d)]
        self.noise.append((trainer.current_epoch, any(m.gumbel_in.abs().sum() > 0 for m in layers),
                           layers[0].gumbel_tau.item()))


def fit(module, epochs: int, callbacks=(), ckpt_path=None, **trainer):
    options = dict(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=0, deterministic=True)
    fitter = pl.Trainer(callbacks=list(callbacks), **{**options, **trainer})
    fitter.fit(module, datamodule=DigitsDataModule(limit_train=64, batch_size=32), ckpt_path=ckpt_path)
    return fitter


def test_warmup_and_freeze_hold_the_logits_and_the_noise():
    """Epochs 0 (warm-up) and 3 (frozen): logits bit-identical and no noise, despite weight decay and momentum;
    epochs 1-2: they learn, with noise, and tau follows the schedule."""
    pl.seed_everything(0)
    module = classifier("gumbel", assign_optim={"lr_mult": 20.0, "warmup_epochs": 1, "freeze_epoch": 3,
                                                "tau_start": 1.0, "tau_end": 0.25, "tau_epochs": 2})
    watch = Watch()
    fit(module, 4, [watch])
    same = [all(torch.equal(a, b) for a, b in zip(s, e)) for s, e in zip(watch.starts, watch.ends)]
    assert same == [True, False, False, True]
    assert [noisy for _, noisy, _ in watch.noise] == [False, False, True, True, True, True, False, False]
    assert [tau for _, _, tau in watch.noise] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25]


def test_gumbel_training_resumes_bit_exact_without_saving_noise(tmp_path):
    """Two epochs straight, or one epoch, a checkpoint, and a fresh module resumed from it (which regroups at
    the start of epoch 1 as the straight run does): same weights. And the noise mattered: another seed's
    noise ends elsewhere."""
    def run(assign_grad, epochs, ckpt=None, seed=11):
        pl.seed_everything(0)
        module = classifier(assign_grad, assign_optim={"lr_mult": 20.0, "regroup_epochs": [1]}, dense_weight_grad=True)
        module.run_seed = seed
        trainer = fit(module, epochs, ckpt_path=ckpt)
        return module, trainer

    straight, _ = run("gumbel", 2)
    half, trainer = run("gumbel", 1)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed, _ = run("gumbel", 2, ckpt=str(tmp_path / "half.ckpt"))
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other_seed, _ = run("gumbel", 2, seed=12)
    assert not all(torch.equal(a[k], other_seed.state_dict()[k]) for k in a if k.endswith("_assign"))


# ---- resume checks --------------------------------------------------------------------------------------
def test_old_checkpoints_compare_as_defaults_and_an_estimator_change_is_a_warning():
    target = {"_target_": "flgc_lightning.models.MobileNetV2", "groups": 8, "use_flgc": True}
    old = {"hyper_parameters": {"model": dict(target)}}  # written before the estimator keys existed
    assert check_resume_compatible({**target, "assign_grad": "reference", "dense_weight_grad": False}, old, "x") == []
    changed = check_resume_compatible({**target, "assign_grad": "ste"}, old, "x")
    assert changed == ["model.assign_grad: checkpoint has 'reference', this run has 'ste'"]
    saved = {"assign_optim": {"lr_mult": 1.0, "weight_decay": None}}
    now = {"assign_optim": {"lr_mult": 1.0, "weight_decay": None, "warmup_epochs": 0, "freeze_epoch": None,
                            "tau_start": 1.0, "tau_end": 0.1, "tau_epochs": None}}
    assert resume_setting_changes(now, saved) == []
    assert resume_setting_changes(now, {}) == []  # a run config from before assign_optim existed
    now["assign_optim"]["freeze_epoch"] = 9
    assert resume_setting_changes(now, saved) == ["assign_optim.freeze_epoch: checkpoint None, now 9"]


def test_a_checkpoint_without_the_new_keys_loads_for_testing():
    module = classifier()
    hparams = dict(module.hparams)
    hparams["model"] = {k: v for k, v in hparams["model"].items() if k not in ("assign_grad", "dense_weight_grad")}
    hparams["assign_optim"] = {"lr_mult": 1.0, "weight_decay": None}
    rebuilt = ImageClassifier(**hparams)  # what test.py does with a checkpoint's hyperparameters
    rebuilt.load_state_dict(module.state_dict())
    assert all(m.assign_grad == "reference" for m in rebuilt.net.modules() if isinstance(m, Flgc2d))
    assert rebuilt.assign_schedule == AssignSchedule()


# ---- compiled -----------------------------------------------------------------------------------------
def small_net(assign_grad: str, dense: bool) -> nn.Module:
    torch.manual_seed(6)
    return nn.Sequential(
        Flgc2d(16, 32, 1, groups=4, bias=False, assign_grad=assign_grad, dense_weight_grad=dense), nn.BatchNorm2d(32),
        nn.ReLU(), Flgc2d(32, 24, 1, groups=3, bias=False, assign_grad=assign_grad, dense_weight_grad=dense),
        nn.BatchNorm2d(24))


def test_refreshed_noise_and_temperature_never_recompile():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    net = small_net("gumbel", True)
    compiled = torch.compile(net, backend=backend)
    layers = [(i, m) for i, m in enumerate(m for m in net.modules() if isinstance(m, Flgc2d))]
    schedule = AssignSchedule(tau_epochs=4)
    for step in range(4):
        refresh_assignment_noise(layers, schedule, 0, step, epoch=step, max_epochs=None)
        compiled(torch.randn(4, 16, 3, 3)).square().mean().backward()
    assert len(graphs) == 1


@pytest.mark.parametrize("assign_grad", ["ste", "gumbel"])
def test_compiled_estimators_match_eager(assign_grad):
    torch._dynamo.reset()
    eager, compiled = small_net(assign_grad, True), small_net(assign_grad, True)
    layers = [[(i, m) for i, m in enumerate(m for m in net.modules() if isinstance(m, Flgc2d))]
              for net in (eager, compiled)]
    for group in layers:
        refresh_assignment_noise(group, AssignSchedule(), 3, 5, 0, 10)
    x = torch.randn(8, 16, 4, 4)
    run = torch.compile(compiled)
    outs = [eager(x), run(x)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    target = torch.randn_like(outs[0])
    for out in outs:
        (out - target).square().mean().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        scale = a.grad.abs().max()
        assert (a.grad - b.grad).abs().max() <= 1e-5 * scale, name


# ---- regrouping by co-clustering |W| ---------------------------------------------------------------
def test_cocluster_finds_planted_blocks_of_unequal_sizes():
    from sklearn.metrics import adjusted_rand_score

    from flgc_lightning.assignments.planted import make_teacher
    from flgc_lightning.layers.regroup import cocluster

    for seed in range(4):
        teacher = make_teacher(48, 40, 6, seed=seed)
        filters, inputs = cocluster(teacher.weight.abs().numpy(), 6)
        assert adjusted_rand_score(teacher.filter_groups, filters) == 1.0
        assert adjusted_rand_score(teacher.input_groups, inputs) == 1.0


def test_regroup_writes_the_proposal_into_the_logits_and_moves_only_what_changes():
    from flgc_lightning.layers.regroup import apply_groups, propose_groups, regroup

    torch.manual_seed(0)
    layer = Flgc2d(24, 20, 3, groups=4, bias=False)
    with torch.no_grad():  # |W| block-structured along the layer's own groups: nothing to move
        layer.weight.mul_(layer.connection_mask()[:, :, None, None] + 0.01)
    start = (layer.in_assign.detach().clone(), layer.out_assign.detach().clone())
    assert regroup(layer) == 0
    assert torch.equal(layer.in_assign, start[0]) and torch.equal(layer.out_assign, start[1])
    filters, inputs = np.arange(20) % 4, (np.arange(24) * 7) % 4  # some other grouping
    moved = apply_groups(layer, filters, inputs)
    assert layer.filter_groups().tolist() == filters.tolist() and layer.input_groups().tolist() == inputs.tolist()
    assert moved == int((filters != start[1].argmax(1).numpy()).sum() + (inputs != start[0].argmax(1).numpy()).sum())
    for now, before in zip((layer.in_assign, layer.out_assign), start):  # each row's values, permuted
        assert torch.equal(now.detach().sort(dim=1).values, before.sort(dim=1).values)
    ties = Flgc2d(4, 4, 1, groups=3)
    with torch.no_grad():
        ties.in_assign.copy_(torch.tensor([[1.0, 1.0, 0.0]] * 4))
    apply_groups(ties, np.zeros(4, dtype=np.int64), np.array([1, 1, 2, 0]))
    assert ties.input_groups().tolist() == [1, 1, 2, 0]  # a tie with an earlier group is broken upwards
    balanced = BalancedFlgc2d(16, 8, 1, groups=4)
    apply_groups(balanced, *propose_groups(balanced))
    assert [s.tolist() for s in balanced.group_sizes()] == [[4] * 4, [2] * 4]


class Regrouped(pl.Callback):
    """The proposal at the start of epoch 1, and the groups the network runs with in that epoch's first step."""

    def on_train_epoch_start(self, trainer, module):
        from flgc_lightning.layers.regroup import propose_groups

        if trainer.current_epoch == 1:
            self.layers = [m for m in module.net.modules() if isinstance(m, Flgc2d)]
            self.before = [(m.filter_groups().clone(), m.input_groups().clone()) for m in self.layers]
            self.proposal = [propose_groups(m, seed=module.run_seed) for m in self.layers]

    def on_before_backward(self, trainer, module, loss):
        if trainer.current_epoch == 1 and not hasattr(self, "used"):
            self.used = [(m.filter_groups().clone(), m.input_groups().clone()) for m in self.layers]


def test_the_module_regroups_at_the_start_of_the_scheduled_epochs():
    pl.seed_everything(0)
    module = classifier("ste", assign_optim={"regroup_epochs": [1]}, dense_weight_grad=True)
    check = Regrouped()
    fit(module, 2, [check])
    for (filters, inputs), (f, i) in zip(check.used, check.proposal):
        assert filters.tolist() == f.tolist() and inputs.tolist() == i.tolist()
    assert sum(int((a[0] != b[0]).sum() + (a[1] != b[1]).sum()) for a, b in zip(check.used, check.before)) > 0

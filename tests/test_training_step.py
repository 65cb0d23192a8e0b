"""The training step on GPUs: no host synchronisation per step, deferred non-finite check, opt-in compile."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from flgc_lightning.callbacks import HostSyncCounter
from flgc_lightning.callbacks.host_syncs import SyncingOpCounter as SyncCounter
from flgc_lightning.data import DigitsDataModule
from flgc_lightning.errors import NonFiniteLossError
from flgc_lightning.training.module import ImageClassifier

def module(lr: float = 0.05, assign_optim: dict | None = None, **model) -> ImageClassifier:
    net = {"_target_": "flgc_lightning.models.MobileNetV2", "num_classes": 10, "groups": 4, "use_flgc": True,
           "width_mult": 0.25, "in_channels": 1, **model}
    return ImageClassifier(net, {"_target_": "torch.optim.SGD", "lr": lr, "momentum": 0.9}, None, (1, 16, 16),
                           assign_optim=assign_optim)


def fit(pl_module, callbacks=(), steps=6, **trainer):
    options = dict(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=0, log_every_n_steps=50)
    trainer = pl.Trainer(callbacks=list(callbacks), **{**options, **trainer})
    trainer.fit(pl_module, datamodule=DigitsDataModule(limit_train=256, batch_size=32))
    return trainer


@pytest.mark.parametrize("model", [dict(assignment="learned"), dict(assignment="balanced"),
                                   dict(assign_grad="ste", dense_weight_grad=True),
                                   dict(assignment="balanced", assign_grad="gumbel", dense_weight_grad=True)],
                         ids=["learned", "balanced", "ste+dw", "balanced-gumbel+dw"])
def test_no_host_sync_inside_training_steps(model):
    """Whole steps (HostSyncCounter: from one batch end to the next, data and every hook inside), after two;
    Gumbel noise and temperature are refreshed inside that window (the module's batch-start hook)."""
    counter = HostSyncCounter(skip_steps=2)
    fit(module(**model), [counter], steps=6)
    assert len(counter.per_step) == 4
    assert counter.per_step == [[]] * 4, counter.per_step[0][:10]


class PythonIntWeight(ImageClassifier):
    """The step before the fix found on an H200: MeanMetric's weight a Python int, which MeanMetric turns into a
    tensor on the device, a blocking host-to-device copy every step."""

    def _step(self, batch, loss_metric, acc_metric):
        images, targets = batch
        logits = self(images)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        loss_metric.update(loss.detach(), weight=targets.numel())
        acc_metric.update(logits.detach(), targets)
        return loss


def test_the_counter_sees_a_python_number_made_into_a_tensor_inside_a_step():
    """On the CPU a host-to-device copy is no op, but the tensor made from host data (lift_fresh) is: counted."""
    net = {"_target_": "flgc_lightning.models.MobileNetV2", "num_classes": 10, "groups": 4, "use_flgc": True,
           "width_mult": 0.25, "in_channels": 1}
    counter = HostSyncCounter(skip_steps=2, steps=2)
    fit(PythonIntWeight(net, {"_target_": "torch.optim.SGD", "lr": 0.05}, None, (1, 16, 16)), [counter], steps=5)
    assert counter.summary()["where"] == {"lift_fresh.default": 2}


def test_train_py_syncs_only_at_its_deferred_checks(tmp_path, cifar_subset, monkeypatch):
    """train.py's whole path: its config and callbacks (conf/callbacks/default.yaml: checkpoints, run summary,
    assignment tracker, preemption, LR monitor), the default CIFAR pipeline (resident images, augmentation on the
    device), counted from one batch end to the next. The only syncs are the planned ones: the deferred non-finite
    check after every log_every_n_steps-th step and the step checkpoint written every N steps (Lightning runs the
    module's batch-end hook, and checkpoint callbacks, after the counter's: they land in the next step's window)."""
    from omegaconf import open_dict

    from flgc_lightning.config import compose
    from flgc_lightning.training import run as run_module

    built = []
    build = run_module.build_trainer
    monkeypatch.setattr(run_module, "build_trainer", lambda cfg, **kw: built.append(build(cfg, **kw)) or built[-1])
    log_every, every, steps = 4, 6, 14
    cfg = compose("train", [f"data.root={cifar_subset}", f"data.limit_train={16 * steps}", "data.limit_test=16",
                            "data.batch_size=16", "model.width_mult=0.25", "trainer=cpu", "trainer.max_epochs=1",
                            "logger=csv", f"trainer.log_every_n_steps={log_every}", "trainer.enable_progress_bar=false",
                            f"callbacks.step_checkpoint.every_n_train_steps={every}",
                            "+callbacks.host_syncs._target_=flgc_lightning.callbacks.HostSyncCounter",
                            "+callbacks.host_syncs.skip_steps=0"])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    run_module.train(cfg)
    (trainer,) = built
    names = {type(c).__name__ for c in trainer.callbacks}
    assert names >= {"ModelCheckpoint", "LearningRateMonitor", "StepCheckpoint", "RunSummary", "AssignmentTracker",
                     "Preemption", "HostSyncCounter"}, names
    counter = next(c for c in trainer.callbacks if isinstance(c, HostSyncCounter))
    assert len(counter.per_step) == steps - 1  # windows of steps 2..14 (the first opens at the end of step 1)
    for step, calls in enumerate(counter.per_step, start=2):
        checked, written = (step - 1) % log_every == 0, (step - 1) % every == 0  # at the end of the step before
        reads = calls.count("_local_scalar_dense.default")
        assert reads == checked + written, (step, calls)  # one read of the non-finite record per check
        # the checkpoint's own host bookkeeping (Lightning's epoch and step as CPU tensors) is the only other op
        assert all(c == "_local_scalar_dense.default" or (written and c == "lift_fresh.default") for c in calls), (
            step, calls)
    # checks after steps 4, 8, 12 and writes after 6, 12: windows of steps 5, 7, 9 and 13 (both)
    assert [step for step, calls in enumerate(counter.per_step, start=2) if calls] == [5, 7, 9, 13]


class ReadsTheLoss(ImageClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        loss.item()  # a host sync in every step
        return loss


def test_host_sync_counter_callback_counts_whole_steps():
    """The callback any run can add: windows from one batch end to the next, after skip_steps."""
    clean = HostSyncCounter(skip_steps=2)
    fit(module(), [clean], steps=6)
    assert clean.summary() == {"device": "cpu", "steps": 4, "syncs": 0, "steps_with_syncs": 0, "where": {}}
    net = {"_target_": "flgc_lightning.models.MobileNetV2", "num_classes": 10, "groups": 4, "use_flgc": True,
           "width_mult": 0.25, "in_channels": 1}
    syncing = HostSyncCounter(skip_steps=2, steps=2)
    fit(ReadsTheLoss(net, {"_target_": "torch.optim.SGD", "lr": 0.05}, None, (1, 16, 16)), [syncing], steps=6)
    summary = syncing.summary()
    assert summary["steps"] == 2 and summary["steps_with_syncs"] == 2
    assert summary["where"] == {"_local_scalar_dense.default": 2}


def test_compile_modes_in_the_config():
    from flgc_lightning.config import compose
    from flgc_lightning.training.schema import schema_problems

    for value, ok in (("true", True), ("false", True), ("reduce-overhead", True), ("max-autotune", True),
                      ("fast", False)):
        cfg = compose("train", [f"compile={value}", "run_dir=/tmp/x"])
        assert (schema_problems(cfg) == []) is ok, (value, schema_problems(cfg))


def test_the_sync_counter_sees_a_sync():
    """The counter is not blind: the old per-step check (`if not torch.isfinite(loss)`) is one sync."""
    loss = torch.tensor(1.0)  # made outside the window: a tensor made from a Python number is counted too
    with SyncCounter() as mode:
        if not torch.isfinite(loss):
            pass
        loss.item()
    assert len(mode.calls) == 2


def test_non_finite_loss_is_caught_at_the_next_check_and_names_its_step():
    pl.seed_everything(0)
    with pytest.raises(NonFiniteLossError, match="not finite at global step 1;"):  # step 0 is finite, step 1 not
        fit(module(lr=1e30), steps=60, log_every_n_steps=5)


class RecordLosses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


class Float64Step(ImageClassifier):
    """The training step in float64 (Trainer precision="64-true" converts the module; the batch is cast here,
    after the data module's float32 augmentation)."""

    def _step(self, batch, *metrics):
        images, targets = batch
        return super()._step((images.to(torch.float64), targets), *metrics)


# three blocks (no expand conv / stride 2 / identity residual): every kind of layer the full network has, at a third
# of the test's time with empty caches on 2 cores (118 s with the 17-block network, 33-40 s); the full network with
# -m exhaustive
@pytest.mark.slow
@pytest.mark.parametrize("settings", [[[1, 16, 1, 1], [6, 24, 2, 2]], pytest.param(None, marks=pytest.mark.exhaustive)],
                         ids=["three-blocks", "full-network"])
def test_compiled_training_follows_eager_training(tmp_path, settings):
    """compile=true as train.py sets it (module.compile_network: the network compiled in place when fit starts, by
    torch.compile's default inductor backend): four optimizer steps of Trainer.fit from the same weights on the same
    batches as eager training give the same losses and parameters, the assignment logits included; a checkpoint
    keeps the eager parameter names (train.py's checkpoints resume and deploy). In float64: in float32 the two
    agree on the first loss, but rounding differences in BatchNorm's backward over this data's near-constant
    channels already make the first gradient differ by 0.5 % (torch 2.14), compounding over steps; in float64 they
    agree to about 1e-10, so a real difference (another estimator, a parameter left out) cannot hide."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config, cpu_vec_isa

    net = {"_target_": "flgc_lightning.models.MobileNetV2", "num_classes": 10, "groups": 4, "use_flgc": True,
           "width_mult": 0.25, "in_channels": 1, **({} if settings is None else {"settings": settings})}
    torch.manual_seed(0)
    eager, compiled = (Float64Step(net, {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9}, None,
                                   (1, 16, 16)) for _ in range(2))
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_network = True
    runs = {}
    torch._dynamo.reset()
    counters.clear()
    # unset here; fit sets it: the compile cache keyed by this CPU's vector width (flgc_lightning/utils/inductor.py)
    with inductor_config.patch({"cpp.simdlen": None}):
        for name, pl_module in (("eager", eager), ("compiled", compiled)):
            start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            losses = RecordLosses()
            runs[name] = fit(pl_module, [losses], steps=4, precision="64-true"), losses.losses
        width = inductor_config.cpp.simdlen
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled run really ran compiled code
    assert not [k for k, n in counters["graph_break"].items() if n], dict(counters["graph_break"])
    isa = cpu_vec_isa.pick_vec_isa()
    assert width == (isa.bit_width() if isa else None)
    (_, eager_losses), (trainer, compiled_losses) = runs["eager"], runs["compiled"]
    assert len(eager_losses) == 4 and compiled_losses == pytest.approx(eager_losses, rel=1e-8)
    after_eager, after_compiled = eager.state_dict(), compiled.state_dict()
    assert list(after_compiled) == list(after_eager)
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], after_eager[k])]
    assert any(k.endswith("in_assign") for k in moved)  # the assignment logits trained too
    for k in moved:  # each tensor's update, compiled vs eager; an absolute floor for the directions whose
        # gradient is zero up to rounding (biases and filter logits a train-mode BatchNorm cancels)
        update = (after_eager[k] - start[k]).norm().item()
        error = (after_compiled[k] - after_eager[k]).norm().item()
        assert error <= 1e-6 * update + 1e-8, (k, error, update)
    trainer.save_checkpoint(tmp_path / "compiled.ckpt")
    saved = torch.load(tmp_path / "compiled.ckpt", weights_only=True)["state_dict"]
    assert list(saved) == list(after_eager)  # no _orig_mod prefixes


class CheckBalancedGroups(pl.Callback):
    """After every optimizer step: each balanced FLGC layer of the network has equal group sizes."""

    def __init__(self):
        self.steps, self.layers, self.moved, self.previous, self.groups = 0, 0, 0, None, set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from flgc_lightning.layers.flgc import BalancedFlgc2d

        layers = [m for m in pl_module.net.modules() if isinstance(m, BalancedFlgc2d)]
        ids = []
        for layer in layers:
            for side in layer.group_sizes():
                assert side.tolist() == [int(side.sum()) // len(side)] * len(side), (trainer.global_step, side)
            ids.append(layer.input_groups().clone())
            self.groups.add(len(layer.group_sizes()[0]))
        if self.previous is not None:
            self.moved += sum(int((a != b).sum()) for a, b in zip(ids, self.previous))
        self.previous, self.steps, self.layers = ids, self.steps + 1, len(layers)


def test_every_balanced_layer_has_equal_groups_after_every_training_step():
    torch.manual_seed(0)
    check = CheckBalancedGroups()
    # lr_mult large so that assignments do move (the check must see changing memberships, not a fixed one).
    fit(module(assignment="balanced", assign_optim={"lr_mult": 200.0}), [check], steps=8)
    assert check.steps == 8 and check.layers == 17 and check.groups == {4}
    assert check.moved > 0


def test_assignment_knobs_reach_the_optimizer():
    """assign_optim.lr_mult and weight_decay give the assignment logits their own parameter group."""
    default = module().configure_optimizers()
    assert len(default.param_groups) == 1  # the reference: one group, assignments included
    custom = module(lr=0.05, assign_optim={"lr_mult": 10.0, "weight_decay": 0.0})
    optimizer = custom.configure_optimizers()
    assert len(optimizer.param_groups) == 2
    names = {id(p): n for n, p in custom.named_parameters()}
    rest, assign = optimizer.param_groups
    assert all(names[id(p)].endswith((".in_assign", ".out_assign")) for p in assign["params"])
    assert not any(names[id(p)].endswith((".in_assign", ".out_assign")) for p in rest["params"])
    assert len(assign["params"]) + len(rest["params"]) == len(names)
    assert assign["lr"] == pytest.approx(0.5) and assign["weight_decay"] == 0.0
    assert rest["lr"] == pytest.approx(0.05)

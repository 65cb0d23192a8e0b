"""What ``test.py`` does: rebuild a model from its checkpoint alone and evaluate it."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from flgc_lightning.callbacks.ema import has_averaged_weights
from flgc_lightning.deploy import deployed_complexity
from flgc_lightning.errors import CheckpointError
from flgc_lightning.training.checkpoints import load_checkpoint
from flgc_lightning.training.module import ImageClassifier
from flgc_lightning.training.schema import TestKeys, instantiate_checked
from flgc_lightning.training.validation import validate_config
from flgc_lightning.utils.complexity import complexity_summary, format_millions

log = logging.getLogger(__name__)


def data_config(cfg: DictConfig, saved: dict, overrides: list[str]) -> DictConfig:
    """The checkpoint's data config with the command line's ``data``/``data.*`` overrides on top. The saved part
    passed :func:`~flgc_lightning.training.checkpoints.load_checkpoint`'s check (an allowed data module, plain
    values); what the command line adds is the user's own."""
    chosen = OmegaConf.create(saved.get("data") or OmegaConf.to_container(cfg.data, resolve=True))
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key == "data":  # a different data config group: use it whole
            return cfg.data
        if key.startswith("data."):
            OmegaConf.update(chosen, key[len("data."):], OmegaConf.select(cfg, key), force_add=True)
    return chosen


def evaluate(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Test-split accuracy, params and MACs of the checkpoint ``cfg.ckpt_path``."""
    if overrides is None:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    if not cfg.get("ckpt_path"):
        raise CheckpointError("no checkpoint given: run `python test.py ckpt_path=PATH/TO/last.ckpt`")
    validate_config(cfg, TestKeys)
    checkpoint = load_checkpoint(cfg.ckpt_path)
    pl.seed_everything(cfg.seed, workers=True)
    trainer = instantiate_checked(cfg.trainer, "trainer", logger=False, enable_checkpointing=False,
                                  default_root_dir=cfg.run_dir)
    datamodule = instantiate_checked(data_config(cfg, checkpoint["flgc_config"], overrides), "data")
    datamodule.prepare_data()
    module = ImageClassifier(**checkpoint["hyper_parameters"], config_origin=f"checkpoint '{cfg.ckpt_path}'")
    module.load_state_dict(checkpoint["state_dict"])
    (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)
    result: dict[str, Any] = {
        "checkpoint": str(cfg.ckpt_path),
        "epochs_trained": epochs_trained(checkpoint),
        "test_acc": float(metrics["test/acc"]),
        "test_loss": float(metrics["test/loss"]),
        **({"weights": "averaged (EMA)"} if has_averaged_weights(checkpoint) else {}),
        **complexity_summary(module.net, tuple(module.hparams.input_size)),
        **deployed_complexity(module.net, tuple(module.hparams.input_size)),
    }
    print(format_result(result))
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.run_dir) / "test_results.json").write_text(json.dumps(result, indent=2))
    return result


def epochs_trained(checkpoint: dict) -> int:
    """Epochs whose training batches all ran (Lightning's ``epoch`` key depends on when the file was saved)."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("total", {})
    return int(progress.get("processed", checkpoint.get("epoch", 0)))


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def format_result(result: dict[str, Any]) -> str:
    lines = [
        f"checkpoint : {result['checkpoint']} ({plural(result['epochs_trained'], 'epoch')} trained)",
        f"test acc   : {100 * result['test_acc']:.2f} %   (loss {result['test_loss']:.4f})",
        *([f"weights    : {result['weights']}"] if "weights" in result else []),
        f"params     : {result['params']:,}",
        f"MACs       : {format_millions(result['macs'])} (as the network runs)",
    ]
    if "macs_nominal" in result:
        lines.append(f"MACs FLGC  : {format_millions(result['macs_nominal'])} nominal (uniform groups), "
                     f"{format_millions(result['macs_learned'])} with the learned groups")
    if "macs_deployed" in result:
        lines.append(f"deployed   : {format_millions(result['macs_deployed'])} MACs, {result['params_deployed']:,} params "
                     "(BN folded, learned groups as real grouped convs: python -m flgc_lightning.deploy)")
    return "\n".join(lines)

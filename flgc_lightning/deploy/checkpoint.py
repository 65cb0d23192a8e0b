"""From a train.py checkpoint to the trained network and its deployed form."""
from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from torch import nn

from flgc_lightning.deploy.convert import deploy_model
from flgc_lightning.training.checkpoints import load_checkpoint


def load_trained_network(path: str | Path) -> nn.Module:
    """The checkpoint's network (rebuilt from its saved model config), eval mode, on CPU."""
    checkpoint = load_checkpoint(path)
    net = instantiate(checkpoint["hyper_parameters"]["model"])
    prefix = "net."
    net.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)})
    return net.eval()


def deploy_checkpoint(path: str | Path, channels_last: bool = True) -> nn.Module:
    return deploy_model(load_trained_network(path), channels_last=channels_last)

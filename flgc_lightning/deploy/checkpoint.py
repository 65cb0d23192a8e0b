"""From a train.py checkpoint to the trained network and its deployed form."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from flgc_lightning.deploy.convert import deploy_model
from flgc_lightning.training.checkpoints import load_checkpoint
from flgc_lightning.training.file_config import instantiate_from_file


def load_trained_network(path: str | Path) -> tuple[nn.Module, tuple[int, int, int]]:
    """The checkpoint's network (rebuilt from its saved model config, an allowed class only), eval mode, on CPU,
    and the C x H x W input size it was trained on."""
    checkpoint = load_checkpoint(path)
    net = instantiate_from_file(checkpoint["hyper_parameters"]["model"], "model", f"checkpoint '{path}'")
    prefix = "net."
    net.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)})
    input_size = tuple(checkpoint["hyper_parameters"].get("input_size", (3, 32, 32)))
    return net.eval(), input_size


def deploy_checkpoint(path: str | Path, channels_last: bool = True, kernel: str = "auto") -> nn.Module:
    """:func:`deploy_model` of a checkpoint's network (``auto`` kernels timed at its input size)."""
    net, input_size = load_trained_network(path)
    return deploy_model(net, channels_last=channels_last, kernel=kernel, input_size=input_size)

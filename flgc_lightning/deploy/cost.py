"""What a deployed network costs: MACs from the learned group sizes, checked by ptflops."""
from __future__ import annotations

import copy

from torch import nn

from flgc_lightning.deploy.grouped import UnequalGroupConv2d


def _unequal_group_hook(connections: str):
    """ptflops hook: ``module.<connections>`` multiply-adds per output position, plus the bias adds and the
    fused ReLU6 (so fusing never changes the count)."""
    def hook(module: UnequalGroupConv2d, inputs, output) -> None:
        positions = output[0, 0].numel()
        macs = getattr(module, connections) * positions
        outputs = module.out_channels if connections == "learned_connections" else module.executed_outputs
        if module.conv.bias is not None:
            macs += outputs * positions
        if module.relu6:  # a fused ReLU6 counts as ptflops counts an nn.ReLU6: one per output element
            macs += outputs * positions
        module.__flops__ += int(macs * output.shape[0])

    return hook


def _ptflops_macs(model: nn.Module, input_size, connections: str) -> int:
    from ptflops import get_model_complexity_info

    probe = copy.deepcopy(model).cpu().eval()  # ptflops adds and removes attributes; leave the original alone
    for block in probe.modules():  # count each conv on its own (the fused depthwise + projection kernel
        if hasattr(block, "fuse_depthwise"):  # computes exactly the two convs' products)
            block.fuse_depthwise = False
    macs, _ = get_model_complexity_info(
        probe, tuple(input_size), as_strings=False, print_per_layer_stat=False, backend="pytorch",
        custom_modules_hooks={UnequalGroupConv2d: _unequal_group_hook(connections)},
        backend_specific_config={"count_functional": False},
    )
    return int(macs)


def deployed_macs(model: nn.Module, input_size=(3, 32, 32)) -> int:
    """ptflops MACs of a deployed network; unequal-group layers count sum_g |in_g| * |out_g| (+ bias)."""
    return _ptflops_macs(model, input_size, "learned_connections")


def executed_macs(model: nn.Module, input_size=(3, 32, 32)) -> int:
    """MACs the deployed kernels really run: unequal-group layers counted with zeros / unused vector lanes."""
    return _ptflops_macs(model, input_size, "executed_connections")


def deployed_parameters(model: nn.Module) -> int:
    """Parameters the deployed network needs; unequal-group layers count only weights inside groups."""
    unequal = [m for m in model.modules() if isinstance(m, UnequalGroupConv2d)]
    stored = {id(p) for m in unequal for p in m.parameters()}  # dense, zero between groups
    plain = sum(p.numel() for p in model.parameters() if id(p) not in stored)
    return plain + sum(m.learned_connections + (m.out_channels if m.conv.bias is not None else 0) for m in unequal)


def deployed_complexity(model: nn.Module, input_size=(3, 32, 32)) -> dict[str, int]:
    """``macs_deployed`` / ``params_deployed`` of ``model`` after :func:`deploy_model`; ``{}`` if it cannot deploy."""
    from flgc_lightning.deploy.convert import DeployError, deploy_model

    try:
        deployed = deploy_model(model, channels_last=False, kernel="blockdiag")  # counts only: no kernel timing
    except DeployError:
        return {}
    return {"macs_deployed": deployed_macs(deployed, input_size), "params_deployed": deployed_parameters(deployed)}

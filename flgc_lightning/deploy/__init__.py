"""Deploy trained networks: BN folded, FLGC layers as real (unequal) grouped convolutions, export."""
from flgc_lightning.deploy.convert import DeployError, deploy_model
from flgc_lightning.deploy.cost import deployed_complexity, deployed_macs, executed_macs, deployed_parameters
from flgc_lightning.deploy.export import export_onnx, export_program, onnxruntime_logits, onnxruntime_session
from flgc_lightning.deploy import ops  # noqa: F401  (registers torch.ops.flgc.fused_step)
from flgc_lightning.deploy.grouped import UnequalGroupConv2d, refresh_tables
from flgc_lightning.deploy.compiled import compile_deployed
from flgc_lightning.deploy.program_file import ProgramFileError, load_program



def __getattr__(name):
    """Checkpoint loading on first use: it imports the training code (Lightning, Hydra), which running a
    deployed network or its ONNX file does not need."""
    if name in ("deploy_checkpoint", "load_trained_network"):
        from flgc_lightning.deploy import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DeployError", "UnequalGroupConv2d", "compile_deployed", "refresh_tables", "deploy_checkpoint", "deploy_model", "deployed_complexity", "deployed_macs", "deployed_parameters", "executed_macs",
    "export_onnx", "export_program", "load_program", "load_trained_network", "ProgramFileError",
    "onnxruntime_logits", "onnxruntime_session",
]

"""``python -m flgc_lightning.deploy CKPT --out DIR [--onnx]``, or ``--build-kernel`` alone.

Deploys a train.py checkpoint, prints nominal vs deployed MACs/params and the largest logit
difference to the trained network (eval mode) on random inputs, and writes ``deployed.pt`` (the module),
``deployed.pt2`` (``torch.export`` program) and, with ``--onnx``, ``deployed.onnx``, each reloaded and checked.
The ONNX file's fused FLGC blocks are custom ops (:mod:`flgc_lightning.deploy.onnx_custom_ops`) that
:func:`flgc_lightning.deploy.onnxruntime_session` runs with our kernel.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from flgc_lightning.cli import report_user_errors
from flgc_lightning.deploy.checkpoint import load_trained_network
from flgc_lightning.deploy.convert import deploy_model
from flgc_lightning.deploy import native
from flgc_lightning.deploy.cost import deployed_macs, deployed_parameters, executed_macs
from flgc_lightning.deploy.grouped import UnequalGroupConv2d
from flgc_lightning.deploy.export import ONNX_KERNELS, export_onnx, export_program, onnxruntime_logits
from flgc_lightning.deploy.program_file import load_program
from flgc_lightning.errors import UserError
from flgc_lightning.data.cifar_files import DataNotFoundError
from flgc_lightning.predict import PREPROCESSING_FILE, write_preprocessing
from flgc_lightning.utils.complexity import complexity_summary, format_millions


def run(args: argparse.Namespace) -> None:
    trained, input_size = load_trained_network(args.checkpoint)
    deployed = deploy_model(trained, kernel=args.kernel, input_size=input_size)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output folder '{out}': {err.strerror}") from None
    summary = complexity_summary(trained, input_size)
    images = torch.randn(8, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = trained(images)
        diff = (deployed(images.contiguous(memory_format=torch.channels_last)) - reference).abs().max().item()
    print(f"trained  : params {summary['params']:,}, MACs {format_millions(summary['macs'])} as it runs"
          + (f", {format_millions(summary['macs_nominal'])} nominal" if "macs_nominal" in summary else ""))
    print(f"deployed : params {deployed_parameters(deployed):,}, MACs {format_millions(deployed_macs(deployed, input_size))} "
          f"(learned groups); its kernels execute {format_millions(executed_macs(deployed, input_size))}")
    kernels = Counter(m.kernel for m in deployed.modules() if isinstance(m, UnequalGroupConv2d))
    if kernels:
        print(f"FLGC layer kernels ({args.kernel}): " + ", ".join(f"{k} x{n}" for k, n in kernels.most_common()))
    print(f"max |logit difference| deployed vs trained (eval mode, 8 random images): {diff:.3g}")
    torch.save(deployed, out / "deployed.pt")
    print(f"wrote {out / 'deployed.pt'} (torch.save of the module)")
    export_program(deployed, out / "deployed.pt2", images[:2])
    with torch.no_grad():
        pt2_diff = (load_program(out / "deployed.pt2")(images) - reference).abs().max().item()
    print(f"wrote {out / 'deployed.pt2'} (torch.export program); max |logit difference| reloaded vs trained: "
          f"{pt2_diff:.3g}")
    try:
        print(f"wrote {write_preprocessing(args.checkpoint, out)} (image size, channels, normalisation, class names: "
              "for predict.py)")
    except (UserError, DataNotFoundError) as err:  # the deployed network is fine without it
        print(f"note: no {PREPROCESSING_FILE} written: {err}. predict.py then needs --preprocessing FILE")
    if args.onnx:
        kernel = args.export_kernel or default_export_kernel()
        network = deployed if kernel == args.kernel == "fused" else onnx_network(trained, kernel, input_size)
        path = export_onnx(network, out / "deployed.onnx", images[:2], kernel=kernel)
        ort_diff = (onnxruntime_logits(path, images) - reference).abs().max().item()
        how = ("custom ops: load with flgc_lightning.deploy.onnxruntime_session" if kernel == "fused"
               else "stock ONNX ops")
        print(f"wrote {path} (FLGC layers {kernel}, {how}); max |logit difference| ONNX Runtime vs trained: "
              f"{ort_diff:.3g}")


def default_export_kernel() -> str:
    """``fused`` (custom ops running our kernel) where the kernel builds, else the fastest stock-op form."""
    if native.available():
        return "fused"
    print("note: the fused kernel cannot be built here (no C compiler); the ONNX file uses stock ops (blockdiag)")
    return "blockdiag"


def onnx_network(trained, kernel: str, input_size):
    """The deployed network written to ONNX with FLGC layers as ``kernel`` (every layer ``fused``, so that the
    custom nodes form one chain; for stock ops, hidden widths multiples of 16: ONNX Runtime's fast (NCHWc) convs
    need them). The CLI reuses its deployed network where that is the same (``--kernel fused``)."""
    return deploy_model(trained, kernel=kernel, input_size=input_size, align_hidden=8 if kernel == "fused" else 16)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flgc_lightning.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="a checkpoint written by train.py")
    parser.add_argument("--out", help="folder for deployed.pt and the exports (required with a checkpoint)")
    parser.add_argument("--build-kernel", action="store_true",
                        help="only build (or find) the fused CPU kernel for this CPU and say what was built: once per "
                             "machine, e.g. in a setup script, so no later deploy or ONNX Runtime session compiles")
    parser.add_argument("--onnx", action="store_true", help="also export ONNX and check it with ONNX Runtime")
    parser.add_argument("--kernel", choices=["auto", "fused", "blockdiag"], default="auto",
                        help="how FLGC layers run: auto (default) times the two per layer on this machine at "
                             "batch 64 and keeps the faster; fused = compiled CPU kernel, learned connections only; "
                             "blockdiag = dense conv with zeros between groups (stock ops)")
    parser.add_argument("--export-kernel", choices=list(ONNX_KERNELS), default=None,
                        help="form of the FLGC layers in the ONNX file: fused (default where a C compiler works) = "
                             "custom ops that run our kernel in ONNX Runtime (load with "
                             "flgc_lightning.deploy.onnxruntime_session); stock ops only: blockdiag (default without "
                             "a compiler) is a dense conv with zeros outside the groups")
    args = parser.parse_args(argv)
    if args.build_kernel:
        report_user_errors(build_kernel)
        return
    if args.checkpoint is None or args.out is None:
        parser.error("a checkpoint and --out are required (or --build-kernel alone)")
    report_user_errors(lambda: run(args))


def build_kernel() -> None:
    try:
        library = native.load_library()
    except native.NativeKernelUnavailable as err:
        raise UserError(f"the fused kernel cannot be built here: {err}. Deploy still works with stock PyTorch ops "
                        "(--kernel blockdiag)") from None
    print(f"fused kernel for this CPU ({native.instruction_set()}): {library.path}")
    print(native.describe(library))


if __name__ == "__main__":
    main()

"""Files can't run code (issue 20).

Checkpoints: a real train.py checkpoint with planted configs (``os.makedirs`` as the network, optimizer,
scheduler or data module, a ``_target_`` nested in an argument, Hydra's ``_args_``, an interpolation that
decodes to a ``_target_``) is refused with a clear message by every program that reads checkpoints, and the
planted directory is never made. Kernel tables: tables the C kernel would index out of bounds are refused on
every path that hands them to C (direct op calls, a ``.pt2`` program, ONNX Runtime), and, where a C compiler
with AddressSanitizer exists, a sanitized build shows that the checked path never reads or writes out of bounds.
Deployed files: a ``.pt2`` program with code planted where ``torch.export.load`` runs it (guards, symbolic sizes,
pickled payloads, an operator) and an ONNX file that reads other files are refused before anything runs.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, run_cli
from flgc_lightning.deploy import native, tables
from flgc_lightning.deploy.onnxruntime_ops import OnnxFileError
from flgc_lightning.deploy.program_file import ProgramFileError, load_program
from flgc_lightning.errors import CheckpointError

# --------------------------------------------------------------------------------------------------------------
# Checkpoints can't choose code
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_subset) -> Path:
    """A real checkpoint of ``python train.py`` (one tiny epoch on the CIFAR subset)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    run_cli("train.py", f"data.root={cifar_subset}", *TINY, "trainer.max_epochs=1", "model.width_mult=0.25",
            "groups=2", f"hydra.run.dir={run}")
    return run / "checkpoints" / "last.ckpt"


def makedirs(made: Path) -> dict:
    """A config that, built by Hydra, creates the directory ``made``: the side effect the checks must prevent."""
    return {"_target_": "os.makedirs", "name": str(made)}


def _model_and_run_config(c, made):
    c["hyper_parameters"]["model"] = makedirs(made)
    c["flgc_config"]["model"] = makedirs(made)


def _optimizer(c, made):
    c["hyper_parameters"]["optimizer"] = makedirs(made)
    c["flgc_config"]["optimizer"] = makedirs(made)


def _scheduler(c, made):
    c["hyper_parameters"]["scheduler"] = makedirs(made)


def _data(c, made):
    c["flgc_config"]["data"] = makedirs(made)


def _nested(c, made):
    c["hyper_parameters"]["model"]["width_mult"] = makedirs(made)


def _nested_in_list(c, made):
    c["hyper_parameters"]["scheduler"]["milestones"] = [150, makedirs(made)]


def _args(c, made):
    c["hyper_parameters"]["model"]["_args_"] = [makedirs(made)]


def _interpolation(c, made):
    c["hyper_parameters"]["model"]["width_mult"] = "${oc.decode:'{_target_: os.makedirs, name: " + str(made) + "}'}"


PLANTS = {  # name: (what the file says, what the refusal must name)
    "model": (_model_and_run_config, r"hyper_parameters\.model\._target_: 'os\.makedirs' is not one of the classes "
                                     r"a file may build"),
    "optimizer": (_optimizer, r"hyper_parameters\.optimizer\._target_: 'os\.makedirs'"),
    "scheduler": (_scheduler, r"hyper_parameters\.scheduler\._target_: 'os\.makedirs'"),
    "data": (_data, r"flgc_config\.data\._target_: 'os\.makedirs'"),
    "nested": (_nested, r"hyper_parameters\.model\.width_mult: a nested _target_"),
    "nested-in-list": (_nested_in_list, r"hyper_parameters\.scheduler\.milestones\[1\]: a nested _target_"),
    "args": (_args, r"hyper_parameters\.model\._args_: Hydra key"),
    "interpolation": (_interpolation, r"hyper_parameters\.model\.width_mult: .*interpolation"),
}


def plant(trained: Path, folder: Path, name: str) -> tuple[Path, Path, str]:
    """A copy of the trained checkpoint with plant ``name``: (file, the directory it would make, message regex)."""
    edit, message = PLANTS[name]
    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    made = folder / f"made-by-{name}"
    edit(checkpoint, made)
    path = folder / "checkpoints" / "planted.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(checkpoint, path)
    return path, made, message


def test_real_checkpoints_still_load_everywhere(trained, tmp_path):
    """The allow-list lets train.py's own checkpoints through (every saved config passes its schema check); a
    config the user composes is trusted (any optimizer class), the same config from a file is not."""
    from flgc_lightning.deploy.checkpoint import load_trained_network
    from flgc_lightning.training.checkpoints import load_checkpoint
    from flgc_lightning.training.file_config import TRUSTED
    from flgc_lightning.training.module import ImageClassifier

    checkpoint = load_checkpoint(trained)
    module = ImageClassifier.load_from_checkpoint(trained)
    net, input_size = load_trained_network(trained)
    assert input_size == (3, 32, 32) and type(net) is type(module.net)
    assert module.configure_optimizers()["optimizer"].__class__.__name__ == "SGD"
    hparams = {**checkpoint["hyper_parameters"], "optimizer": {"_target_": "torch.optim.RMSprop", "lr": 0.1}}
    assert type(ImageClassifier(**hparams, config_origin=TRUSTED).configure_optimizers()["optimizer"]).__name__ == "RMSprop"
    with pytest.raises(CheckpointError, match=r"'torch\.optim\.RMSprop' is not one of the classes"):
        ImageClassifier(**hparams)


@pytest.mark.parametrize("name", PLANTS)
def test_every_reader_refuses_a_planted_checkpoint(name, trained, tmp_path, capsys):
    """In-process, every program that reads a checkpoint: the test and deploy steps, Lightning's
    ``load_from_checkpoint``, resume, the assignment tools; each names the file and what it refused."""
    from flgc_lightning.assignments.report import main as assignments
    from flgc_lightning.cli import report_user_errors
    from flgc_lightning.config import compose
    from flgc_lightning.deploy.checkpoint import load_trained_network
    from flgc_lightning.training.checkpoints import load_checkpoint
    from flgc_lightning.training.evaluate import evaluate
    from flgc_lightning.training.module import ImageClassifier
    from flgc_lightning.training.run import train

    path, made, message = plant(trained, tmp_path, name)
    readers = {
        "load_checkpoint": lambda: load_checkpoint(path),
        "test.py": lambda: evaluate(compose("test", [f"ckpt_path={path}", f"run_dir={tmp_path / 'test'}"]), []),
        "deploy": lambda: load_trained_network(path),
        "load_from_checkpoint": lambda: ImageClassifier.load_from_checkpoint(path),
        "resume": lambda: train(compose("train", [f"ckpt_path={path}", f"run_dir={tmp_path / 'run'}",
                                                  "trainer.accelerator=cpu"])),
        "assignments": lambda: assignments(["--from-checkpoints", str(path.parent)]),
    }
    for reader, read in readers.items():
        with pytest.raises(CheckpointError, match=message) as refused:
            read()
        assert f"'{path}' refused" in str(refused.value), reader
    if name == "model":  # a reader of the whole file names every place
        with pytest.raises(CheckpointError, match=r"(?s)hyper_parameters\.model\._target_.*flgc_config\.model\._target_"):
            load_checkpoint(path)
    with pytest.raises(SystemExit) as stopped:  # as the assignments command line reports it
        report_user_errors(lambda: assignments(["--from-checkpoints", str(path.parent)]))
    assert stopped.value.code == 1
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")] == [
        f"error: checkpoint '{path}' refused (a file cannot choose the code that runs):"]
    assert not made.exists() and not (tmp_path / "test").exists() and not (tmp_path / "run").exists()


def _one_error_line(proc: subprocess.CompletedProcess, path: Path) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: checkpoint '{path}' refused (a file cannot choose the code that runs):"], proc.stderr
    assert "'os.makedirs' is not one of the classes a file may build" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_command_lines_refuse_a_planted_checkpoint(trained, tmp_path):
    """The real commands (test.py, the deploy step, a resume) on a checkpoint whose network is ``os.makedirs``:
    exit 1 with one ``error:`` line, the directory never made, nothing written."""
    path, made, _ = plant(trained, tmp_path, "model")
    _one_error_line(run_cli("test.py", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'test'}", check=False), path)
    _one_error_line(run_cli("-m", "flgc_lightning.deploy", str(path), "--out", str(tmp_path / "deployed"),
                            check=False), path)
    _one_error_line(run_cli("train.py", f"ckpt_path={path}", "trainer.accelerator=cpu",
                            f"hydra.run.dir={tmp_path / 'resumed'}", check=False), path)
    assert not made.exists()
    assert not any((tmp_path / d).exists() for d in ("test", "deployed", "resumed"))


# --------------------------------------------------------------------------------------------------------------
# Kernel tables are validated before C sees them
# --------------------------------------------------------------------------------------------------------------

needs_kernel = pytest.mark.skipif(not native.available(), reason="no working C compiler: no table reaches C code")


def fused_layer(c_in: int, c_out: int, seed: int):
    from flgc_lightning.deploy.grouped import UnequalGroupConv2d

    gen = torch.Generator().manual_seed(seed)
    return UnequalGroupConv2d(torch.randn(c_out, c_in, generator=gen), torch.randn(c_out, generator=gen),
                              torch.randint(0, 3, (c_in,), generator=gen), torch.randint(0, 3, (c_out,), generator=gen),
                              3, "fused")


def kernel_case(seed: int = 0, size: tuple[int, int, int] = (2, 7, 6)) -> dict:
    """Valid inputs of the three kinds of step: a 16 -> 24 expand conv, 3x3 depthwise taps over 24 channels, a
    24 -> 16 projection (all unequal groups), inputs of 16 and 24 channels (batch, height, width: ``size``)."""
    gen = torch.Generator().manual_seed(seed)
    n, h, w = size
    return {"expand": dict(fused_layer(16, 24, seed + 1).tables()),
            "projection": dict(fused_layer(24, 16, seed + 2).tables()),
            "dw_taps": torch.randn(9, 24, generator=gen), "dw_bias": torch.randn(24, generator=gen),
            "x16": torch.randn(n, 16, h, w, generator=gen), "x24": torch.randn(n, 24, h, w, generator=gen)}


KINDS = ("conv1x1", "depthwise", "block")


def make_step(kind: str, case: dict, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``case`` as a step of ``kind``: the projection alone, after the depthwise conv, or the whole block."""
    p, e = case["projection"], case["expand"]
    if kind == "conv1x1":
        return tables.make_step(p, 24, 16)
    if kind == "depthwise":
        return tables.make_step(p, 24, 16, True, dw_taps=case["dw_taps"], dw_bias=case["dw_bias"], stride=stride)
    return tables.make_step(p, 16, 16, False, e, case["dw_taps"], case["dw_bias"], stride)


def run_op(kind: str, case: dict, stride: int = 1, step=None) -> torch.Tensor:
    """``torch.ops.flgc.fused_step`` called directly: ``case`` as a step of ``kind`` (or ``step``'s tensors)."""
    ints, floats = step if step is not None else make_step(kind, case, stride)
    x = case["x16"] if kind == "block" else case["x24"]
    return torch.ops.flgc.fused_step(x, ints, floats, None, 16, 1 if kind == "conv1x1" else stride)


def table_slice(ints, name: str) -> slice:
    """Where table ``name`` (``tasks``, ``e_out_index``, ...) lies in a step's ``ints`` (rows flattened)."""
    head = dict(zip(tables.HEADER, [int(v) for v in ints[:len(tables.HEADER)]]))
    at = len(tables.HEADER)
    for table in (*("e_" + t for t in tables.TABLES[:3]), *tables.TABLES[:3]):
        size = head[table] * {"tasks": tables.TASK_FIELDS, "segments": tables.SEGMENT_FIELDS}.get(
            table.removeprefix("e_"), 1)
        if table == name:
            return slice(at, at + size)
        at += size
    raise KeyError(name)


def _set(name: str, index, value):
    """An edit of one table entry (on a copy: the tables of the case stay valid)."""
    def edit(tables):
        t = tables[name] = tables[name].clone()
        t[index] = value(tables) if callable(value) else value
    return edit


TABLE_CRAFTS = {  # name: (edit of a table set, what the refusal says)
    "negative entry": (_set("segments", (0, 0), -1), r"negative or huge"),
    "huge entry": (_set("tasks", (0, 0), 1 << 62), r"negative or huge"),
    "weights past the end": (_set("segments", (-1, 2), lambda t: int(t["segments"][-1, 2]) + 8),
                             r"weights past the end of weight"),
    "segments past the end": (_set("tasks", (-1, 1), lambda t: len(t["segments"]) + 1 - int(t["tasks"][-1, 0])),
                              r"segments past the end of segments"),
    "bias past the end": (_set("tasks", (-1, 2), lambda t: len(t["bias"])), r"bias vector past the end"),
    "more filters than lanes": (_set("tasks", (0, 3), 17), r"more filters than vector lanes"),
    "outputs past out_index": (_set("tasks", (-1, 4), lambda t: len(t["out_index"])), r"past the end of out_index"),
    "out_index past the output": (_set("out_index", 0, 10_000), r"write output channel 10000, the output has"),
    "input past the input": (_set("segments", (-1, 0), 10_000), r"read 100\d\d input channels, the input has"),
    "an output never written": (_set("tasks", (-1, 3), lambda t: int(t["tasks"][-1, 3]) - 1), r"is never written"),
    "consecutive but not full": (_set("tasks", 0, lambda t: t["tasks"][0] * torch.tensor([1, 1, 1, 0, 1, 0])
                                      + torch.tensor([0, 0, 0, 3, 0, tables.CONSECUTIVE])),
                                 r"consecutive outputs in a task that is not full"),
}


def _header(field: str, value):
    def edit(ints, floats):
        ints = ints.clone()
        ints[tables.HEADER.index(field)] = value(ints) if callable(value) else value
        return ints, floats
    return edit


STEP_CRAFTS = {  # name: (edit of (ints, floats), what the refusal says)
    "ints as float64": (lambda i, f: (i.double(), f), r"ints must be a contiguous 1-d torch\.int64"),
    "floats as float64": (lambda i, f: (i, f.double()), r"floats must be a contiguous 1-d torch\.float32"),
    "ints not contiguous": (lambda i, f: (torch.stack([i, i], 1)[:, 0], f), r"ints must be a contiguous"),
    "header cut short": (lambda i, f: (i[:10].clone(), f), r"the header alone has"),
    "negative header entry": (_header("out_index", -1), r"negative or huge header entry"),
    "unknown kind": (_header("kind", 7), r"inconsistent header"),
    "stride 3": (_header("stride", 3), r"inconsistent header"),
    "hidden one more": (_header("hidden", lambda i: int(i[4]) + 1), r"inconsistent header|its header gives"),
    "a table one row longer": (_header("segments", lambda i: int(i[tables.HEADER.index("segments")]) + 1),
                               r"its header gives"),
    "one float missing": (lambda i, f: (i, f[:-1].clone()), r"its header gives"),
    "fewer outputs": (_header("out_channels", 1), r"write output channel \d+, the output has 1"),
}


@needs_kernel
def test_direct_op_calls_with_crafted_tables_are_refused():
    """The op called directly with steps it has never seen: every crafted table (offsets past the ends, outputs past
    the output, inputs past the input, too many lanes) in every role of every kind of step, and every crafted step
    (wrong dtype or layout, a header that does not describe its tensors) is a clear error before any C code runs;
    the valid steps still give the stock-op numbers."""
    case = kernel_case()
    for kind in KINDS:
        step = make_step(kind, case)
        x = case["x16"] if kind == "block" else case["x24"]
        torch.testing.assert_close(run_op(kind, case), tables.checked_step(*step).reference(x), atol=1e-4, rtol=0)
        for role in ("projection", "expand") if kind == "block" else ("projection",):
            for name, (edit, message) in TABLE_CRAFTS.items():
                crafted = {**case, role: dict(case[role])}
                edit(crafted[role])
                with pytest.raises(tables.TableError, match=message):
                    run_op(kind, crafted)
        for name, (edit, message) in STEP_CRAFTS.items():
            with pytest.raises(tables.TableError, match=message):
                run_op(kind, case, step=edit(*step))
        with pytest.raises(tables.TableError, match="called for 16 outputs at stride 2"):
            torch.ops.flgc.fused_step(x, *step, None, 16, 2)  # the call's shape arguments must be the step's
    run_op("block", case, stride=2)  # the valid case again: nothing above poisoned the cache


@needs_kernel
def test_steps_are_checked_once_per_pair_of_tensors(monkeypatch):
    """Tables are validated once per step's pair of tensors, not per call; a step changed in place, or new tensors
    with the same (or crafted) contents, are validated again."""
    calls = []
    validate = tables.validate_tables
    monkeypatch.setattr(tables, "validate_tables", lambda t: calls.append(1) or validate(t))
    case = kernel_case(seed=3)
    block, depthwise = make_step("block", case), make_step("depthwise", case)
    for _ in range(3):
        run_op("block", case, step=block)
        run_op("depthwise", case, step=depthwise)
    assert len(calls) == 3  # the block's expand and projection tables, the depthwise step's projection tables
    depthwise[0][table_slice(depthwise[0], "out_index")][0] = 10_000  # in place: its version counter moved
    with pytest.raises(tables.TableError, match="write output channel 10000"):
        run_op("depthwise", case, step=depthwise)
    run_op("depthwise", case, step=make_step("depthwise", case))  # new tensors, same contents
    assert len(calls) == 5


@needs_kernel
def test_a_checked_step_is_a_private_copy():
    """What the C code reads is the checker's own copy: edits of the caller's tensors that move no version counter
    (through a NumPy alias, inside inference mode) cannot slip past the check, and cached steps do not keep the
    caller's tensors alive (nothing accumulates)."""
    import gc

    case = kernel_case(seed=4)
    ints, floats = make_step("block", case)
    first = run_op("block", case, step=(ints, floats))
    ints.numpy()[table_slice(ints, "tasks")][3] = 10 ** 6  # filter count of task 0: no version change
    torch.testing.assert_close(run_op("block", case, step=(ints, floats)), first, atol=0, rtol=0)
    with torch.inference_mode():  # inference tensors keep no version count at all
        ints, floats = make_step("depthwise", case)
        first = run_op("depthwise", case, step=(ints, floats))
        ints[table_slice(ints, "out_index")] = 10_000
        torch.testing.assert_close(run_op("depthwise", case, step=(ints, floats)), first, atol=0, rtol=0)
    del ints, floats
    gc.collect()
    before = len(tables._checked)
    for seed in range(5):
        run_op("conv1x1", case, step=make_step("conv1x1", kernel_case(seed=seed)))
    gc.collect()
    assert len(tables._checked) == before


@needs_kernel
def test_empty_images_and_older_files(tmp_path):
    """Zero-sized images give empty outputs from every kind of step; an ONNX file with the custom nodes of an older
    version, and a pickled network of the older (padded) layout, are refused with a message that says so."""

    import onnx

    from flgc_lightning.deploy import deploy_model, export_onnx, onnxruntime_session
    from flgc_lightning.deploy.grouped import UnequalGroupConv2d
    from flgc_lightning.deploy.onnx_custom_ops import custom_nodes
    from flgc_lightning.models import MobileNetV2

    case = kernel_case(size=(2, 0, 5))
    for kind in KINDS:
        assert run_op(kind, case).shape == (2, 16, 0, 5)
    torch.manual_seed(0)
    net = deploy_model(MobileNetV2(groups=4, use_flgc=True, width_mult=0.25).eval(), kernel="fused")
    model = onnx.load(str(export_onnx(net, tmp := tmp_path / "older.onnx", input_size=(3, 16, 16))))
    custom_nodes(model)[0].op_type = "FlgcInvertedResidual"
    onnx.save(model, str(tmp))
    with pytest.raises(OnnxFileError, match="older flgc_lightning .*FlgcInvertedResidual.*export it again"):
        onnxruntime_session(tmp)
    layer = next(m for m in net.modules() if isinstance(m, UnequalGroupConv2d))
    layer.register_buffer("in_index", torch.arange(layer.in_channels))  # what the padded layout held
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    with pytest.raises(RuntimeError, match="saved by an older flgc_lightning"):
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)


@needs_kernel
def test_a_tampered_pt2_program_is_refused(tmp_path):
    """A ``.pt2`` program's steps are constants in the file: tampered in the file, or in place in the loaded
    program after it ran, the op refuses them with a clear error."""
    from flgc_lightning.deploy import deploy_model, export_program
    from flgc_lightning.models import MobileNetV2

    torch.manual_seed(0)
    net = deploy_model(MobileNetV2(groups=4, use_flgc=True, width_mult=0.25).eval(), kernel="fused")
    program = export_program(net, tmp_path / "net.pt2", input_size=(3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = net(x)
    # the first fused op (features.1: depthwise conv + projection): x, ints, floats, residual, out_channels, stride
    node = next(n for n in program.graph.nodes if n.op == "call_function" and "flgc" in str(n.target))
    constant = {s.arg.name: s.target for s in program.graph_signature.input_specs if s.target is not None}
    ints_name, floats_name = constant[node.args[1].name], constant[node.args[2].name]

    def out_index(t):
        t[table_slice(t, "out_index")] = 10_000

    def bias_offset(t):
        t[table_slice(t, "tasks").start + 2] = 10_000

    for name, edit, message in ((ints_name, out_index, "write output channel 10000"),
                                (ints_name, bias_offset, "bias vector past the end"),
                                (floats_name, lambda t: t[:-1].clone(), r"its header gives")):
        loaded = torch.export.load(str(tmp_path / "net.pt2"))
        tampered = edit(loaded.constants[name])
        if tampered is not None:
            loaded.constants[name] = tampered
        torch.export.save(loaded, str(tmp_path / "tampered.pt2"))
        with pytest.raises(tables.TableError, match=message):
            load_program(tmp_path / "tampered.pt2")(x)  # the file check passes: its tables are plain tensors
    module = load_program(tmp_path / "net.pt2")
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, atol=1e-4, rtol=0)
        out_index(getattr(module.get_submodule("features.1"), ints_name.rpartition(".")[2]))  # in place, after a run
        with pytest.raises(tables.TableError, match="write output channel 10000"):
            module(x)


# --------------------------------------------------------------------------------------------------------------
# .pt2 programs and ONNX files can't choose code
# --------------------------------------------------------------------------------------------------------------


class _MakeDir:
    """Unpickled, makes a directory: a pickle's way to run code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


def _pickle_bytes(made: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(_MakeDir(made), buffer)
    return buffer.getvalue()


def _rewrite(src: Path, dst: Path, edit=None, members: dict | None = None) -> Path:
    """A copy of the ``.pt2`` archive ``src`` with ``edit(model_json)`` applied and ``members`` (name below the
    archive's top folder -> bytes) replaced or added."""
    members = dict(members or {})
    with zipfile.ZipFile(src) as archive, zipfile.ZipFile(dst, "w") as out:
        root = archive.namelist()[0].split("/", 1)[0] + "/"
        for item in archive.infolist():
            data = archive.read(item)
            name = item.filename[len(root):]
            if name == "models/model.json" and edit is not None:
                program = json.loads(data)
                edit(program)
                data = json.dumps(program).encode()
            out.writestr(item, members.pop(name, data))
        for name, data in members.items():
            out.writestr(root + name, data)
    return dst


def _guards(made):
    return dict(edit=lambda p: p.__setitem__("guards_code", [f"__import__('os').makedirs({str(made)!r}) is None"]))


def _symbolic_size(made):
    def edit(program):
        size = program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]
        size["expr_str"] = f"__import__('os').makedirs({str(made)!r}) or " + size["expr_str"]
    return dict(edit=edit)


def _pickled_weight(made):  # marked as torch.export.save marks tensors it cannot write raw
    return dict(members={"data/weights/weight_0": _pickle_bytes(made)},
                weight_entry=lambda entry: entry.__setitem__("use_pickle", True))


def _weight_without_data(made):  # torch allocates and zeroes what the entry declares
    return dict(members={"data/weights/weight_0": b""},
                weight_entry=lambda entry: entry["tensor_meta"].__setitem__("sizes", [{"as_int": 1 << 40}]))


def _sample_inputs(made):
    return dict(members={"data/sample_inputs/model.pt": _pickle_bytes(made)})


def _operator(made):
    def edit(program):
        node = next(n for n in program["graph_module"]["graph"]["nodes"] if n["target"].startswith("torch.ops.aten"))
        node["target"] = "torch.os.makedirs"
    return dict(edit=edit)


def _extra_member(made):
    return dict(members={"data/aotinductor/model.so": b"\x7fELF"})


def _renamed(value, old: str, new: str):
    """``value`` (JSON) with every key or string equal to ``old`` replaced by ``new``."""
    if isinstance(value, dict):
        return {(new if k == old else k): _renamed(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v, old, new) for v in value]
    return new if value == old else value


def _input_name(made):  # FX writes placeholder names into the forward's source: a default argument runs at load
    def edit(program):
        old = next(i["as_tensor"]["name"] for i in program["graph_module"]["graph"]["inputs"]
                   if i["as_tensor"]["name"].startswith("b_"))
        program["graph_module"] = _renamed(program["graph_module"], old,
                                           f"b=__import__('os').makedirs({str(made)!r}), *c")
    return dict(edit=edit)


def _buffer_name(made):  # written into get_attr source unescaped: runs on the first call
    return dict(buffer_name=f'q") if getattr(__import__("os"), "makedirs")("{made}") else getattr(self, "q')


def _call_structure(made):  # a treespec may name a module to import and an attribute to call
    def edit(program):
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        signature["in_spec"] = signature["in_spec"].replace('"context": "[]"', '"context": "[\\"x\\"]"')
    return dict(edit=edit)


def _file_writing_operator(made):  # ATen can create and map a file
    def edit(program):
        graph = program["graph_module"]["graph"]
        graph["nodes"].insert(0, {"target": "torch.ops.aten.from_file.default", "name": "opened", "metadata": {},
                                  "inputs": [{"name": "filename", "arg": {"as_string": str(made)}, "kind": 1},
                                             {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                                             {"name": "size", "arg": {"as_int": 4}, "kind": 1},
                                             {"name": "dtype", "arg": {"as_scalar_type": 1}, "kind": 2}],
                                  "outputs": [{"as_tensor": {"name": "opened"}}]})
        graph["tensor_values"]["opened"] = {
            "dtype": 1, "sizes": [{"as_int": 4}], "requires_grad": False, "device": {"type": "cpu", "index": None},
            "strides": [{"as_int": 1}], "storage_offset": {"as_int": 0}, "layout": 7}
    return dict(edit=edit)


def _member_twice(made):  # zip readers differ on which copy of a name they read
    return dict(twice=json.dumps({"guards_code": [f"__import__('os').makedirs({str(made)!r}) is None"]}))


# (plant, what the refusal says, whether torch.export.load(...).module() of it runs the plant here)
PROGRAM_PLANTS = {
    "guards code": (_guards, "guards_code, Python that torch would run", True),
    "symbolic size": (_symbolic_size, "symbolic size that is not a plain expression", True),
    "pickled weight": (_pickled_weight, "stores weight .* as a pickle, which loading would run", True),
    "pickled sample inputs": (_sample_inputs, "not a readable program", True),
    "weight without data": (_weight_without_data, r"declares weight .* of \[1099511627776\] with no data", False),
    "operator": (_operator, "calls 'torch.os.makedirs', which a deployed network never calls", False),
    "extra member": (_extra_member, "holds 'data/aotinductor/model.so'", False),
    "input name": (_input_name, "has a name that is not a plain name", True),
    "buffer name": (_buffer_name, "has a buffer_name that is not a plain name", True),
    "call structure": (_call_structure, "has an in_spec other than one tensor", False),
    "file-writing operator": (_file_writing_operator, "calls 'torch.ops.aten.from_file.default'", True),
    "member twice": (_member_twice, "holds two members of one name", False),
}


@pytest.fixture(scope="module")
def program_file(tmp_path_factory) -> Path:
    from flgc_lightning.deploy import deploy_model, export_program
    from flgc_lightning.models import MobileNetV2

    torch.manual_seed(0)
    net = deploy_model(MobileNetV2(groups=2, use_flgc=True, width_mult=0.25).eval(), kernel="blockdiag")
    path = tmp_path_factory.mktemp("program") / "net.pt2"
    export_program(net, path, input_size=(3, 16, 16))
    return path


def _planted_program(program_file: Path, name: str, made: Path, folder: Path) -> Path:
    plant = PROGRAM_PLANTS[name][0](made)
    members = plant.get("members")
    if plant.get("weight_entry"):  # the config entry of the first weight, edited
        with zipfile.ZipFile(program_file) as archive:
            root = archive.namelist()[0].split("/", 1)[0] + "/"
            config = json.loads(archive.read(root + "data/weights/model_weights_config.json"))
        plant["weight_entry"](next(v for v in config["config"].values() if v["path_name"] == "weight_0"))
        members = {**members, "data/weights/model_weights_config.json": json.dumps(config).encode()}
    edit = plant.get("edit")
    if plant.get("buffer_name"):  # a buffer renamed in the signature and the constants config
        with zipfile.ZipFile(program_file) as archive:
            root = archive.namelist()[0].split("/", 1)[0] + "/"
            config = json.loads(archive.read(root + "data/constants/model_constants_config.json"))
            program = json.loads(archive.read(root + "models/model.json"))
        old = next(spec["buffer"]["buffer_name"] for spec in program["graph_module"]["signature"]["input_specs"]
                   if "buffer" in spec)
        new = old.rpartition(".")[0] + "." + plant["buffer_name"]
        config["config"][new] = config["config"].pop(old)
        members = {"data/constants/model_constants_config.json": json.dumps(config).encode()}
        edit = lambda p: p["graph_module"].__setitem__(  # noqa: E731
            "signature", _renamed(p["graph_module"]["signature"], old, new))
    planted = _rewrite(program_file, folder / f"{name.replace(' ', '_')}.pt2", edit, members)
    if plant.get("twice"):
        with zipfile.ZipFile(planted) as archive:
            first = archive.namelist()[0].split("/", 1)[0] + "/models/model.json"
            program = {**json.loads(archive.read(first)), **json.loads(plant["twice"])}
        with zipfile.ZipFile(planted, "a") as archive, pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr(first, json.dumps(program))
    return planted


@pytest.mark.parametrize("name", PROGRAM_PLANTS)
def test_a_pt2_program_that_would_run_code_is_refused_before_torch_reads_it(name, program_file, tmp_path):
    """``torch.export.load`` runs code a ``.pt2`` file chooses (each plant marked so does, here: the control);
    :func:`load_program` refuses every plant with a clear error, and the planted side effect never happens."""
    made = tmp_path / "made"
    planted = _planted_program(program_file, name, made, tmp_path)
    _, message, torch_runs_it = PROGRAM_PLANTS[name]
    with pytest.raises(ProgramFileError, match=message):
        load_program(planted)
    assert not made.exists()
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    if torch_runs_it:  # the control: the plant is live, so the refusal above is what kept it from running
        try:
            torch.export.load(str(planted)).module()(x)  # guards run on the first call
        except Exception:  # noqa: BLE001  (some plants break the program after they ran)
            pass
        assert made.exists(), "torch.export.load no longer runs this plant: check the refusal still matters"
    assert load_program(program_file)(x).shape == (2, 10)  # the untouched file loads


def _two_directories(program_file: Path, made: Path) -> bytes:
    """The program, with a second central directory that lists a ``model.json`` carrying ``guards_code``: Python's
    zipfile takes the zip64 end record just before the locator (the clean directory), torch's reader the one the
    locator points at (the planted one)."""
    import struct

    def build(members):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as out:
            for name, data in members:
                out.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data)
        b = buffer.getvalue()
        count, size, offset = struct.unpack("<10xHII2x", b[-22:])
        return b[:offset], b[offset:offset + size], count

    def entries(directory):
        out, pos = [], 0
        while pos < len(directory):
            end = pos + 46 + sum(struct.unpack("<HHH", directory[pos + 28:pos + 34]))
            out.append(directory[pos:end])
            pos = end
        return out

    with zipfile.ZipFile(program_file) as archive:
        members = [(i.filename, archive.read(i)) for i in archive.infolist()]
    name = next(n for n, _ in members if n.endswith("/models/model.json"))
    program = json.loads(dict(members)[name])
    program["guards_code"] = [f"__import__('os').makedirs({str(made)!r}) is None"]
    clean_locals, clean_directory, count = build(members)
    planted_local, planted_directory, _ = build([(name, json.dumps(program).encode())])
    planted_entry = bytearray(entries(planted_directory)[0])
    struct.pack_into("<I", planted_entry, 42, len(clean_locals))
    torch_directory = b"".join(bytes(planted_entry) if e[46:46 + len(name)] == name.encode() else e
                               for e in entries(clean_directory))
    body = clean_locals + planted_local
    torch_offset = len(body)
    body += torch_directory
    torch_record = len(body)
    body += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(torch_directory), torch_offset)
    clean_offset = len(body)
    body += clean_directory
    body += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(clean_directory), clean_offset)
    body += struct.pack("<IIQI", 0x07064B50, 0, torch_record, 1)
    return body + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(torch_directory), torch_offset, 0)


def test_torch_loads_only_the_members_that_were_checked(program_file, tmp_path):
    """Zip readers can disagree about what an archive holds. :func:`load_program` hands torch an archive it wrote
    from the members it checked, so an archive that shows torch another ``model.json`` (the control) runs nothing."""
    made = tmp_path / "made"
    planted = tmp_path / "two_directories.pt2"
    planted.write_bytes(_two_directories(program_file, made))
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(load_program(planted)(x), load_program(program_file)(x), rtol=0, atol=0)
    assert not made.exists()
    torch.export.load(str(planted)).module()(x)  # the control: torch's reader sees the planted copy
    assert made.exists(), "torch reads this archive as zipfile does now: check the test still plants anything"


def test_predict_refuses_a_planted_program_with_one_error(program_file, tmp_path):
    """The command line that reads ``.pt2`` files from others: one clear error, non-zero exit, nothing made."""
    from PIL import Image

    made = tmp_path / "made"
    planted = _planted_program(program_file, "guards code", made, tmp_path)
    (tmp_path / "preprocessing.json").write_text(json.dumps(
        {"channels": 3, "height": 16, "width": 16, "mean": [0.5] * 3, "std": [0.25] * 3,
         "classes": [str(c) for c in range(10)]}))
    Image.new("RGB", (16, 16)).save(tmp_path / "image.png")
    proc = run_cli("predict.py", str(planted), str(tmp_path / "image.png"), check=False)
    assert proc.returncode != 0 and "is refused: it carries guards_code" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not made.exists()


def test_an_onnx_file_that_reads_other_files_or_runs_other_operators_is_refused(tmp_path):
    """An ONNX file whose weights live in another file would make the session read whatever path the file names
    (the control: ``onnx.load`` does read it); one with the session's own rewritten nodes would run weights of
    another session in this process; onnxruntime-extensions' other operators parse the file's bytes in code we
    never use. :func:`onnxruntime_session` refuses all three."""
    import onnx

    from flgc_lightning.deploy import deploy_model, export_onnx, onnxruntime_session
    from flgc_lightning.models import MobileNetV2

    torch.manual_seed(0)
    net = deploy_model(MobileNetV2(groups=2, use_flgc=True, width_mult=0.25).eval(), kernel="blockdiag")
    path = export_onnx(net, tmp_path / "net.onnx", kernel="blockdiag", input_size=(3, 16, 16))
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x01\x02\x03\x04")
    model = onnx.load(str(path))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "secret.bin"), ("offset", "0"), ("length", "4")):
        weight.external_data.add(key=key, value=value)
    onnx.save(model, str(tmp_path / "external.onnx"))
    read = onnx.load(str(tmp_path / "external.onnx"))  # the control: the default loader reads the named file
    assert next(t for t in read.graph.initializer if t.name == weight.name).raw_data == secret.read_bytes()
    with pytest.raises(OnnxFileError, match="keeps tensors in other files"):
        onnxruntime_session(tmp_path / "external.onnx")

    model = onnx.load(str(path))
    model.graph.node.insert(0, onnx.helper.make_node("FlgcChainCached", ["images"], ["unused"],
                                                     domain="ai.onnx.contrib", key="0"))
    onnx.save(model, str(tmp_path / "cached.onnx"))
    with pytest.raises(OnnxFileError, match="ai.onnx.contrib::FlgcChainCached nodes; a file of the deploy step"):
        onnxruntime_session(tmp_path / "cached.onnx")
    model = onnx.load(str(path))  # an operator onnxruntime-extensions registers (a parser of the file's bytes)
    model.graph.node.insert(0, onnx.helper.make_node("StringRegexReplace", ["images"], ["unused"],
                                                     domain="ai.onnx.contrib"))
    onnx.save(model, str(tmp_path / "extension.onnx"))
    with pytest.raises(OnnxFileError, match="ai.onnx.contrib::StringRegexReplace nodes"):
        onnxruntime_session(tmp_path / "extension.onnx")
    onnxruntime_session(path)  # the untouched file loads


def _tamper(model, node_index: int, input_name: str, edit, path: Path) -> Path:
    """A copy of the ONNX ``model`` whose custom node ``node_index`` has input ``input_name`` edited."""
    import onnx
    from onnx import numpy_helper

    from flgc_lightning.deploy.onnx_custom_ops import INPUTS, custom_nodes

    model = onnx.ModelProto.FromString(model.SerializeToString())
    stored = custom_nodes(model)[node_index].input[INPUTS.index(input_name)]
    for i, init in enumerate(model.graph.initializer):
        if init.name == stored:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(init).copy()), stored))
    onnx.save(model, str(path))
    return path


PLAIN_SESSION = """
import sys, numpy as np, onnxruntime
from onnxruntime_extensions import get_library_path
import flgc_lightning.deploy.onnxruntime_ops  # defines the custom ops
options = onnxruntime.SessionOptions()
options.register_custom_ops_library(get_library_path())
session = onnxruntime.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
print("session made", flush=True)
session.run(None, {"images": np.zeros((2, 3, 16, 16), np.float32)})
print("ran", flush=True)
"""


@needs_kernel
def test_a_tampered_onnx_file_is_refused(tmp_path):
    """An ONNX file's steps are initializers: tampered ones (an output index past the output, a bias offset
    past the end, a float missing, ints of the wrong type) are refused when the session helper loads the
    file. In a plain onnxruntime session the custom op refuses them on its first call; onnxruntime-extensions turns
    an op's exception into a process abort (no Python exception crosses it), so that runs in its own process."""
    import numpy as np
    import onnx

    from flgc_lightning.deploy import deploy_model, export_onnx, onnxruntime_session
    from test_deploy_export import onnx_step_kinds
    from flgc_lightning.models import MobileNetV2

    torch.manual_seed(0)
    net = deploy_model(MobileNetV2(groups=4, use_flgc=True, width_mult=0.25).eval(), kernel="fused")
    model = onnx.load(str(export_onnx(net, tmp_path / "net.onnx", input_size=(3, 16, 16))))
    kinds = onnx_step_kinds(model)
    block = kinds.index(tables.BLOCK)

    def edited(name, value):
        def edit(a):
            a[table_slice(a, name)] = value(a[table_slice(a, name)])
            return a
        return edit

    cases = [
        (block, "ints", edited("out_index", lambda t: len(t)), r"write output channel"),
        (block, "ints", edited("e_tasks", lambda t: np.where(np.arange(len(t)) == 2, 10_000, t)), r"bias vector past"),
        (block, "floats", lambda a: a[:-1], r"its header gives"),
        (kinds.index(tables.DEPTHWISE), "ints", lambda a: a.astype(np.float32), r"ints must be"),
    ]
    for i, (node, name, edit, message) in enumerate(cases):
        path = _tamper(model, node, name, edit, tmp_path / f"tampered{i}.onnx")
        with pytest.raises(ValueError, match=message):
            onnxruntime_session(path)
    proc = run_cli("-c", PLAIN_SESSION, str(tmp_path / "tampered0.onnx"), timeout=300, check=False)
    assert "session made" in proc.stdout and "ran" not in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert proc.returncode != 0 and "TableError: fused step: tables: write output channel" in proc.stderr


# Run in a process with the kernel built with AddressSanitizer: the checked paths on valid tables of several shapes
# and thread counts (direct ops, a deployed network, the ONNX session's one-call chain), then every crafted table.
ASAN_CHECKED = """
import sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from flgc_lightning.deploy import deploy_model, native, onnxruntime_session, tables
from flgc_lightning.models import MobileNetV2
from test_file_safety import KINDS, STEP_CRAFTS, TABLE_CRAFTS, kernel_case, make_step, run_op
assert "-fsanitize=address" in native.load_library().flags, native.load_library().flags
for threads in (1, 2):
    torch.set_num_threads(threads)
    for seed, size in enumerate([(2, 7, 6), (1, 1, 1), (3, 9, 17), (1, 8, 8)]):
        case = kernel_case(seed, size)
        for kind in KINDS:
            for stride in (1,) if kind == "conv1x1" else (1, 2):
                step = tables.checked_step(*make_step(kind, case, stride))
                x = case["x16"] if kind == "block" else case["x24"]
                torch.testing.assert_close(run_op(kind, case, stride), step.reference(x), atol=1e-4, rtol=0)
refused = 0
for kind in KINDS:
    for role in ("projection", "expand") if kind == "block" else ("projection",):
        for edit, message in TABLE_CRAFTS.values():
            case = kernel_case()
            case[role] = dict(case[role])
            edit(case[role])
            try:
                run_op(kind, case)
            except tables.TableError:
                refused += 1
    for edit, message in STEP_CRAFTS.values():
        case = kernel_case()
        try:
            run_op(kind, case, step=edit(*make_step(kind, case)))
        except tables.TableError:
            refused += 1
torch.manual_seed(0)
net = deploy_model(MobileNetV2(groups=4, use_flgc=True, width_mult=0.25, group_expand=True).eval(), kernel="fused")
with torch.no_grad():
    for n in (1, 3):
        net(torch.randn(n, 3, 16, 16).contiguous(memory_format=torch.channels_last))
session = onnxruntime_session(sys.argv[2])
for n in (1, 2, 5):
    session.run(None, {"images": np.random.default_rng(n).standard_normal((n, 3, 16, 16)).astype(np.float32)})
print("refused", refused, flush=True)
"""
# The same build reading weights past the end of a step's floats, its tables changed after they were checked and
# run straight through ctypes: ASan must see it, or a clean run above would prove nothing.
ASAN_UNCHECKED = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from flgc_lightning.deploy import native, tables
from test_file_safety import kernel_case, make_step
case = kernel_case()
ints, floats = make_step("conv1x1", case)
step = tables.checked_step(ints, floats)
step.projection["segments"][-1, 2] = len(floats)  # in place, after the check
x = case["x24"].contiguous(memory_format=torch.channels_last)
y = torch.empty(2, 16, 7, 6, memory_format=torch.channels_last)
native.run_chain(step.record(0, 1, -1, 7, 6), [x.data_ptr(), y.data_ptr()], 2, 1)
print("no report", flush=True)
"""


def _asan_environment(folder: Path) -> dict:
    """Environment of a process whose fused kernel is built with AddressSanitizer, or skip where that cannot be."""
    import os
    import shutil

    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    runtime = [subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
               for name in ("libasan.so", "libstdc++.so.6")] if compiler else []
    if not runtime or not all(os.path.isabs(path) and os.path.exists(path) for path in runtime):
        pytest.skip("no AddressSanitizer runtime (libasan) next to the C compiler")
    return {**os.environ, "FLGC_NATIVE_CACHE": str(folder), "ASAN_OPTIONS": "detect_leaks=0",
            "FLGC_NATIVE_FLAGS": f"-O1 -g -fsanitize=address -fno-omit-frame-pointer {' '.join(native.load_library().flags[1:])}",
            # libstdc++ too: loaded after ASan, C++ exceptions thrown by torch abort ASan's interceptor
            "LD_PRELOAD": " ".join(runtime)}


@needs_kernel
def test_checked_kernels_stay_in_bounds_under_address_sanitizer(tmp_path):
    """With the C kernel built with AddressSanitizer, the checked paths (valid tables of several shapes, strides
    and thread counts; a deployed network; the ONNX session's chain of kernels; every crafted table, refused)
    run without a report, while the same build handed a crafted table straight through ctypes is reported."""
    from flgc_lightning.deploy import deploy_model, export_onnx
    from flgc_lightning.models import MobileNetV2

    env = _asan_environment(tmp_path / "asan-cache")
    torch.manual_seed(1)
    net = deploy_model(MobileNetV2(groups=4, use_flgc=True, width_mult=0.25).eval(), kernel="fused")
    onnx_file = export_onnx(net, tmp_path / "net.onnx", input_size=(3, 16, 16))
    tests = str(Path(__file__).parent)
    checked = subprocess.run([sys.executable, "-c", ASAN_CHECKED, tests, str(onnx_file)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    if "NativeKernelUnavailable" in checked.stderr:
        pytest.skip(f"the kernel does not build with AddressSanitizer here: {checked.stderr.strip().splitlines()[-1]}")
    assert "AddressSanitizer" not in checked.stderr, checked.stderr[-5000:]
    expected = len(TABLE_CRAFTS) * 4 + len(STEP_CRAFTS) * 3
    assert checked.returncode == 0 and f"refused {expected}" in checked.stdout, checked.stdout + checked.stderr[-3000:]
    unchecked = subprocess.run([sys.executable, "-c", ASAN_UNCHECKED, tests], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=600)
    assert unchecked.returncode != 0 and "no report" not in unchecked.stdout
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in unchecked.stderr, unchecked.stderr[-3000:]

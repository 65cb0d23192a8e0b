"""Reading a ``.pt2`` program someone else wrote: only if it is what :func:`~flgc_lightning.deploy.export_program`
writes, checked before torch reads any of it.

``torch.export.load`` runs code the file chooses (torch 2.14; each shown with a planted file in
tests/test_file_safety.py): it evaluates every symbolic-shape string with ``sympy.sympify`` (``eval``), turns the
file's ``guards_code`` into Python that the loaded module runs on its first call, unpickles weights and constants marked ``use_pickle`` (and legacy ones, and sample inputs
that fail a ``weights_only`` load) with ``weights_only=False``, and resolves a node's target as any attribute path
under ``torch``. :func:`load_program` reads the file once, checks all of that in the archive's own JSON, and only
then hands the same bytes to ``torch.export.load``; the fused steps the program calls are checked by the op itself
(:func:`~flgc_lightning.deploy.tables.checked_step`).
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from flgc_lightning.errors import UserError

# Operators a deployed network's program calls: ATen kernels, our fused step, and tuple indexing.
TARGET = re.compile(r"torch\.ops\.aten\.\w+\.\w+|torch\.ops\.flgc\.fused_step\.default|_operator\.getitem")
# A symbolic size is sympy's repr of integers and size symbols: these tokens only (no attribute access, no other
# names), so the ``eval`` inside ``sympify`` can only build sympy numbers and symbols.
EXPRESSION_TOKEN = re.compile(r"\s+|\d+|'[su]\d+'|[(),=*+-]|[A-Za-z]\w*")
EXPRESSION_NAMES = {"Symbol", "Integer", "Add", "Mul", "FloorDiv", "Mod", "positive", "integer", "True", "False"}
# Members of the archive (below its one top folder); anything else is refused.
MEMBER = re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                    r"|models/model\.json|data/sample_inputs/model\.pt"
                    r"|data/weights/(weight_\d+|model_weights_config\.json)"
                    r"|data/constants/(tensor_\d+|model_constants_config\.json)")
PAYLOAD = {"weights": re.compile(r"weight_\d+"), "constants": re.compile(r"tensor_\d+")}
MAX_BYTES = 1 << 30  # uncompressed; a deployed CIFAR network is a few MB


class ProgramFileError(UserError):
    """A ``.pt2`` file that is not a program this package writes, or that asks torch to run code."""


def _expression_ok(text: str) -> bool:
    pos = 0
    while pos < len(text):
        match = EXPRESSION_TOKEN.match(text, pos)
        if match is None or (match.group()[0].isalpha() and match.group() not in EXPRESSION_NAMES):
            return False
        pos = match.end()
    return True


def _walk(value, found: list[str]) -> None:
    """Every operator, symbolic size and nested graph in the program's JSON, wherever it sits."""
    if isinstance(value, dict):
        if isinstance(value.get("target"), str) and "inputs" in value and not TARGET.fullmatch(value["target"]):
            found.append(f"calls {value['target'][:80]!r}, which a deployed network never calls")
        if "expr_str" in value and not (isinstance(value["expr_str"], str) and _expression_ok(value["expr_str"])):
            found.append(f"has a symbolic size that is not a plain expression ({str(value['expr_str'])[:80]!r})")
        if "as_graph" in value:
            found.append("has a nested graph (a deployed network has none)")
        for item in value.values():
            _walk(item, found)
    elif isinstance(value, list):
        for item in value:
            _walk(item, found)


def check_program_bytes(data: bytes) -> None:
    """Raise :class:`ProgramFileError` unless ``data`` is a ``.pt2`` archive that ``torch.export.load`` reads without
    running anything the file chose (see the module docstring)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
        roots = {m.filename.split("/", 1)[0] for m in members}
        if len(roots) != 1:
            raise ProgramFileError("is not one program (the archive has no single top folder)")
        root = roots.pop() + "/"
        names = {m.filename[len(root):] for m in members}
        strange = sorted(name for name in names if not MEMBER.fullmatch(name))
        if strange:
            raise ProgramFileError(f"holds {strange[0][:80]!r}, which no program export_program writes has")
        if sum(m.file_size for m in members) > MAX_BYTES:
            raise ProgramFileError(f"unpacks to more than {MAX_BYTES >> 20} MiB")
        program = json.loads(archive.read(root + "models/model.json"))
        if program["guards_code"]:
            raise ProgramFileError("carries guards_code, Python that torch would run (a deployed network has none)")
        if program["graph_module"]["graph"]["custom_obj_values"]:
            raise ProgramFileError("holds custom objects, which loading would unpickle")
        for kind, pattern in PAYLOAD.items():
            config_name = f"data/{kind}/model_{kind}_config.json"
            config = json.loads(archive.read(root + config_name))["config"] if config_name in names else {}
            for key, entry in config.items():
                if entry.get("use_pickle") is not False or not pattern.fullmatch(str(entry.get("path_name"))):
                    raise ProgramFileError(f"stores {kind[:-1]} {str(key)[:60]!r} as a pickle, which loading would run")
        if "data/sample_inputs/model.pt" in names:  # torch retries a failed weights_only load without it
            torch.load(io.BytesIO(archive.read(root + "data/sample_inputs/model.pt")), weights_only=True)
        found: list[str] = []
        _walk(program, found)
        if found:
            raise ProgramFileError(found[0])
    except ProgramFileError:
        raise
    except Exception as err:  # noqa: BLE001  (a broken zip or JSON, or what a weights_only load refuses)
        raise ProgramFileError(f"is not a readable program ({type(err).__name__}: {str(err)[:160]})") from None


def load_program(path: str | Path) -> nn.Module:
    """The module of a ``.pt2`` program :func:`~flgc_lightning.deploy.export_program` wrote (anyone's copy of one):
    the file is read once, checked (:func:`check_program_bytes`), then loaded from those bytes. Raises
    :class:`ProgramFileError` naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ProgramFileError(f"cannot read '{path}': {err.strerror}") from None
    try:
        check_program_bytes(data)
    except ProgramFileError as err:
        raise ProgramFileError(f"'{path}' is refused: it {err}") from None
    try:
        return torch.export.load(io.BytesIO(data)).module()
    except Exception as err:  # noqa: BLE001
        raise ProgramFileError(f"'{path}' cannot be loaded as a torch.export program: {str(err)[:200]}") from None

"""Reading a ``.pt2`` program someone else wrote: only if it is what :func:`~flgc_lightning.deploy.export_program`
writes, checked before torch reads any of it.

``torch.export.load`` runs code the file chooses (torch 2.14; each shown with a planted file in
tests/test_file_safety.py): it evaluates every symbolic-shape string with ``sympy.sympify`` (``eval``), turns the
file's ``guards_code`` into Python that the loaded module runs on its first call, unpickles weights and constants
marked ``use_pickle`` (and legacy ones, and sample inputs that fail a ``weights_only`` load) with
``weights_only=False``, and resolves a node's target as any attribute path under ``torch``; it also writes the
file's parameter, buffer and input names into Python source that it runs, and imports any module a treespec
names. :func:`load_program` reads the file once, checks everything in the archive's
JSON against what :func:`~flgc_lightning.deploy.export_program` writes (operators from a short list, names that are
plain dotted names, the one input and output structure), and hands torch an archive it wrote itself from exactly the
members it checked, so no trick of the zip format (a name twice, two central directories) can show torch anything
else. The fused steps the program calls are checked by the op itself
(:func:`~flgc_lightning.deploy.tables.checked_step`).
"""
from __future__ import annotations

import io
import json
import math
import re
import zipfile
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import nn

from flgc_lightning.errors import UserError

# Operators a deployed network's program calls (every variant, kernel and group count the tests export): a list, not
# the ATen namespace, which has operators that write files (``from_file(shared=True)`` + ``fill_``).
TARGET = re.compile(r"torch\.ops\.aten\.(conv2d\.default|hardtanh_?\.default|clamp\.default|add_?\.Tensor|mean\.dim"
                    r"|linear\.default|flatten\.using_ints|view\.default|reshape\.default)"
                    r"|torch\.ops\.flgc\.fused_step\.default|_operator\.getitem")
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
# Every other string and key is a plain dotted name: torch writes names into Python source it runs (FX code of
# placeholders and get_attr targets). Free text torch keeps as text only: these keys.
PLAIN = re.compile(r"[A-Za-z0-9_.]*")
FREE_TEXT = {"stack_trace", "nn_module_stack", "torch_fn", "torch_version"}
# The call structure export_program writes, one tensor in, one out (a treespec can name any module to import). From
# torch's own writer, so a new torch that writes them differently fails the export tests, not silently.
SPECS = {"in_spec": pytree.treespec_dumps(pytree.tree_structure(((0,), {}))),
         "out_spec": pytree.treespec_dumps(pytree.tree_structure(0))}
MAX_BYTES = 1 << 30  # uncompressed; a deployed CIFAR network is a few MB


class ProgramFileError(UserError):
    """A ``.pt2`` file that is not a program this package writes, or that asks torch to run code."""


def _expression_ok(text: str) -> bool:
    if "**" in text:  # a power tower would keep sympify busy for ever
        return False
    pos = 0
    while pos < len(text):
        match = EXPRESSION_TOKEN.match(text, pos)
        if match is None or (match.group()[0].isalpha() and match.group() not in EXPRESSION_NAMES):
            return False
        pos = match.end()
    return True


def _walk(value, found: list[str]) -> None:
    """Every operator, symbolic size, name and nested structure in the program's JSON, wherever it sits."""
    if isinstance(value, dict):
        if isinstance(value.get("target"), str) and "inputs" in value and not TARGET.fullmatch(value["target"]):
            found.append(f"calls {value['target'][:80]!r}, which a deployed network never calls")
        for key in ("as_graph", "as_operator"):  # a nested graph; an operator as an argument (resolved under torch)
            if key in value:
                found.append(f"has an argument of kind {key}, which a deployed network never has")
        for key, item in value.items():
            if not PLAIN.fullmatch(key):
                found.append(f"has a key that is not a plain name ({key[:80]!r})")
            elif key == "expr_str":
                if not (isinstance(item, str) and _expression_ok(item)):
                    found.append(f"has a symbolic size that is not a plain expression ({str(item)[:80]!r})")
            elif key in SPECS:
                if item != SPECS[key]:
                    found.append(f"has an {key} other than one tensor ({str(item)[:80]!r})")
            elif isinstance(item, str) and key not in FREE_TEXT and not PLAIN.fullmatch(item):
                found.append(f"has a {key} that is not a plain name ({item[:80]!r})")
            else:
                _walk(item, found)
    elif isinstance(value, list):
        for item in value:
            _walk(item, found)


def checked_archive(data: bytes) -> bytes:
    """A ``.pt2`` archive, written here, of the members of ``data`` once they are checked; raise
    :class:`ProgramFileError` unless ``data`` is a program that ``torch.export.load`` reads without running anything
    the file chose (see the module docstring)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
        if len({m.filename for m in members}) != len(members):
            raise ProgramFileError("holds two members of one name")
        roots = {m.filename.split("/", 1)[0] for m in members}
        if len(roots) != 1 or not PLAIN.fullmatch(next(iter(roots))):
            raise ProgramFileError("is not one program (the archive has no single, plainly named top folder)")
        root = roots.pop() + "/"
        strange = sorted(m.filename[len(root):] for m in members if not MEMBER.fullmatch(m.filename[len(root):]))
        if strange:
            raise ProgramFileError(f"holds {strange[0][:80]!r}, which no program export_program writes has")
        if sum(m.file_size for m in members) > MAX_BYTES:
            raise ProgramFileError(f"unpacks to more than {MAX_BYTES >> 20} MiB")
        contents = {m.filename[len(root):]: archive.read(m) for m in members}
        program = json.loads(contents["models/model.json"])
        if program["guards_code"]:
            raise ProgramFileError("carries guards_code, Python that torch would run (a deployed network has none)")
        if program["graph_module"]["graph"]["custom_obj_values"]:
            raise ProgramFileError("holds custom objects, which loading would unpickle")
        for kind, pattern in PAYLOAD.items():
            config = json.loads(contents.get(f"data/{kind}/model_{kind}_config.json", b'{"config": {}}'))["config"]
            for key, entry in config.items():
                if entry.get("use_pickle") is not False or not pattern.fullmatch(str(entry.get("path_name"))):
                    raise ProgramFileError(f"stores {kind[:-1]} {str(key)[:60]!r} as a pickle, which loading would run")
                sizes = [size["as_int"] for size in entry["tensor_meta"]["sizes"]]
                if not contents[f"data/{kind}/{entry['path_name']}"] and math.prod(sizes):  # torch would allocate it
                    raise ProgramFileError(f"declares {kind[:-1]} {str(key)[:60]!r} of {sizes} with no data")
        if "data/sample_inputs/model.pt" in contents:  # torch retries a failed weights_only load without it
            torch.load(io.BytesIO(contents["data/sample_inputs/model.pt"]), weights_only=True)
        found: list[str] = []
        _walk(program, found)
        if found:
            raise ProgramFileError(found[0])
    except ProgramFileError:
        raise
    except Exception as err:  # noqa: BLE001  (a broken zip or JSON, or what a weights_only load refuses)
        raise ProgramFileError(f"is not a readable program ({type(err).__name__}: {str(err)[:160]})") from None
    rebuilt = io.BytesIO()
    with zipfile.ZipFile(rebuilt, "w", zipfile.ZIP_STORED) as out:
        for name, content in contents.items():
            out.writestr(root + name, content)
    return rebuilt.getvalue()


def load_program(path: str | Path) -> nn.Module:
    """The module of a ``.pt2`` program :func:`~flgc_lightning.deploy.export_program` wrote (anyone's copy of one):
    the file is read once and checked, and torch loads the archive :func:`checked_archive` writes of what it checked.
    Raises :class:`ProgramFileError` naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ProgramFileError(f"cannot read '{path}': {err.strerror}") from None
    try:
        checked = checked_archive(data)
    except ProgramFileError as err:
        raise ProgramFileError(f"'{path}' is refused: it {err}") from None
    try:
        return torch.export.load(io.BytesIO(checked)).module()
    except Exception as err:  # noqa: BLE001
        raise ProgramFileError(f"'{path}' cannot be loaded as a torch.export program: {str(err)[:200]}") from None

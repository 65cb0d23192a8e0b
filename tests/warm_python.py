"""Documented command lines (``python train.py ...``) run in child processes forked from a Python that has already
imported torch, Lightning, Hydra and torchvision.

On our 2-core machines a ``python train.py`` spends 5-8 s importing those libraries before it reads its config: more
than half of what most command-line tests cost, and the suite runs about a hundred of them. This server imports
them once per pytest worker; each command is then a fork of it that runs the script's ``__main__`` with the
command's own argv, working directory, environment, stdout, stderr and exit code, as a process of its own
(``os.getpid()`` differs, signals and ``os._exit`` behave as in any process). Our package is *not* imported here:
every command imports ``flgc_lightning`` itself, as a fresh interpreter does.

What a fork shares with the server, and how :func:`conftest.run_cli` keeps that from mattering:
- the environment at import time: only commands whose environment equals the server's (up to the per-test
  variables in ``PER_TEST``) run here; any other runs as a plain ``python`` (e.g. the tests without a C compiler);
- the string hash seed (``PYTHONHASHSEED``): the uninterrupted runs that resumed runs must match bit for bit come
  from plain processes (:func:`conftest.run_cli` ``plain=True``), so a run that depended on set order would
  still fail those tests;
- nothing else that a command can observe: ``tests/test_end_to_end.py`` runs one command both ways and
  compares every saved tensor and metric.

``FLGC_TESTS_PLAIN_PROCESSES=1`` runs every command as a plain process.

Protocol (one JSON line per request on stdin, replies on stdout): ``{"argv", "cwd", "env", "stdout", "stderr"}``
(the last two: file paths) -> ``{"pid"}`` once forked, then ``{"returncode"}`` (``subprocess`` convention:
negative for a signal).
"""
from __future__ import annotations

import json
import os
import signal
import sys

PER_TEST = {"PYTEST_CURRENT_TEST"}  # variables that differ between tests, read by nothing at import time


def _run_command(request: dict) -> int:
    """In the forked child: become the command, run it, return its exit code (what ``python ARGV`` returns)."""
    import atexit
    import io
    import runpy
    import threading
    import traceback

    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, fd)
        os.close(out)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    def binary(fd: int):  # as the interpreter opens its standard streams (PYTHONUNBUFFERED: no buffer)
        raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
        return raw if unbuffered and fd else io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)

    sys.stdin = io.TextIOWrapper(binary(0))
    sys.stdout = io.TextIOWrapper(binary(1), write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(binary(2), errors="backslashreplace", line_buffering=True, write_through=unbuffered)
    sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    argv = request["argv"]
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's file first, as python -m does
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[0] = ""
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:  # what the interpreter does with it
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001  (an uncaught exception: traceback, exit 1)
        traceback.print_exc()
        code = 1
    threading._shutdown()  # the interpreter's own exit sequence: non-daemon threads, then atexit, then flush
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    return code & 0xFF


def serve() -> None:
    # what every command imports first (their import is what the server saves); not our package
    import hydra  # noqa: F401
    import omegaconf  # noqa: F401
    import pytorch_lightning  # noqa: F401
    import torch  # noqa: F401
    import torchmetrics  # noqa: F401
    import torchvision  # noqa: F401
    import torchvision.transforms.v2  # noqa: F401

    reply = os.fdopen(os.dup(1), "w", buffering=1)
    print(json.dumps({"ready": os.getpid()}), file=reply)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                reply.close()
                code = _run_command(request)
            finally:
                os._exit(code)
        print(json.dumps({"pid": pid}), file=reply)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=reply)


if __name__ == "__main__":
    serve()

"""Documented command lines (``python train.py ...``) run in child processes forked from a Python that has already
imported torch, Lightning, Hydra and torchvision.

On our 2-core machines a ``python train.py`` spends 5-8 s importing those libraries before it reads its config: more
than half of what most command-line tests cost, and the suite runs about a hundred of them. This server imports
them once per pytest worker; each command is then a fork of it that runs the script as ``__main__`` with the
command's own argv, working directory, stdout, stderr and exit code, as a process of its own (``os.getpid()``
differs, signals behave as in any process, and it ends as the interpreter ends a script: excepthook, exit code,
threads, atexit and flushing, see :func:`_finish`). Our package is *not* imported here:
every command imports ``flgc_lightning`` itself, as a fresh interpreter does.

What a fork shares with the server, and how :func:`conftest.run_cli` keeps that from mattering:
- the environment at import time: only commands whose environment equals the server's, up to the variables
  :func:`per_command` names (which nothing the server imports reads), run here; any other runs as a plain
  ``python`` (e.g. the tests without a C compiler). The child keeps the server's environment (with what the imports
  set in it, as a fresh process would have) and takes the command's values of those variables;
- output printed while the libraries were imported: replayed at the start of every command's output;
- the string hash seed (``PYTHONHASHSEED``): the uninterrupted runs that resumed runs must match bit for bit come
  from plain processes (:func:`conftest.run_cli` ``plain=True``), so a run that depended on set order would
  still fail those tests;
- nothing else that a command can observe: ``tests/test_interruptions.py`` runs one command both ways and
  compares every saved tensor and metric.

Like ``subprocess.run(capture_output=True)``, a command is finished when its output pipes are closed by every
process holding them (e.g. Lightning's DDP rank 1, which rank 0 does not wait for) and it has exited.

``FLGC_TESTS_PLAIN_PROCESSES=1`` runs every command as a plain process.

Protocol (one JSON line per request on stdin, replies on stdout): ``{"id", "argv", "cwd", "env", "stdout",
"stderr", "new_session"}`` (file paths for the output; a session of its own, as ``start_new_session``) ->
``{"id", "pid"}`` once forked, then ``{"id", "returncode"}`` (``subprocess`` convention: negative for a signal).
``{"quit": true}`` ends the server (so does the end of its input, but a process the test forked later, e.g. a
loader's worker still alive, holds a copy of the pipe's other end and would keep that end from coming).
"""
from __future__ import annotations

import json
import os
import selectors
import sys
import tempfile

PER_TEST = {"PYTEST_CURRENT_TEST"}  # set by pytest for every test


def per_command(name: str) -> bool:
    """Variables a command may set differently from the server: pytest's per-test one, and this package's own
    (``FLGC_*``, e.g. the kernel's cache folder), which only our code reads, and the server never imports it."""
    return name in PER_TEST or name.startswith("FLGC_")


def _import_libraries() -> tuple[bytes, bytes]:
    """Import what every command imports first (what the server saves); what that printed on fds 1 and 2."""
    saved, captured = [os.dup(1), os.dup(2)], [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    for fd, f in zip((1, 2), captured):
        os.dup2(f.fileno(), fd)
    try:
        import hydra  # noqa: F401
        import omegaconf  # noqa: F401
        import pytorch_lightning  # noqa: F401
        import torch  # noqa: F401
        import torchmetrics  # noqa: F401
        import torchvision  # noqa: F401
        import torchvision.transforms.v2  # noqa: F401
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
    out = []
    for f in captured:
        f.seek(0)
        out.append(f.read())
    return out[0], out[1]


def _become(request: dict, printed: tuple[bytes, bytes], pipes: tuple[int, int]) -> None:
    """In the forked child: the command's standard streams, directory, environment, signal dispositions."""
    import io
    import signal

    if request.get("new_session"):
        os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, pipe in zip((1, 2), pipes):
        os.dup2(pipe, fd)
        os.close(pipe)
    for fd, text in zip((1, 2), printed):
        if text:
            os.write(fd, text)
    os.chdir(request["cwd"])
    for name in filter(per_command, {*os.environ, *request["env"]}):  # the rest equal the server's (differences)
        if name in request["env"]:
            os.environ[name] = request["env"][name]
        else:
            os.environ.pop(name, None)
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))

    def stream(fd: int, like, **kwargs):  # as the interpreter opens its standard streams
        raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
        binary = raw if unbuffered and fd else io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
        return io.TextIOWrapper(binary, encoding=like.encoding, errors=like.errors, **kwargs)

    sys.stdin = sys.__stdin__ = stream(0, sys.__stdin__)
    sys.stdout = sys.__stdout__ = stream(1, sys.__stdout__, write_through=unbuffered)
    sys.stderr = sys.__stderr__ = stream(2, sys.__stderr__, line_buffering=True, write_through=unbuffered)
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _run_script(argv: list[str]) -> None:
    """``python ARGV`` from the script on."""
    import runpy
    import types

    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's file first, as python -m does
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path[0] = ""
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        exec(compile(argv[1], "<string>", "exec"), main.__dict__)
    else:
        sys.argv = list(argv)
        path = os.path.abspath(argv[0])  # a fresh python's __main__.__file__ is absolute too
        sys.path[0] = os.path.dirname(path)
        runpy.run_path(path, run_name="__main__")


def _finish(argv: list[str]) -> None:
    """Run the script, then end the process as the interpreter ends one: an uncaught exception through
    ``sys.excepthook`` (exit 1; ``KeyboardInterrupt``: killed by SIGINT), ``SystemExit``'s code, then non-daemon
    threads joined, atexit handlers, Python and C standard streams flushed. Not the interpreter's teardown of every
    module (1.4 s with these libraries): Python does not promise finalizers of objects alive at exit either."""
    import atexit
    import ctypes
    import signal
    import threading

    code, interrupted = 0, False
    try:
        _run_script(argv)
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException as err:  # noqa: BLE001
        sys.excepthook(type(err), err, err.__traceback__)
        code, interrupted = 1, isinstance(err, KeyboardInterrupt)
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001  (as at exit: a broken stream is not an error of the command)
            pass
    ctypes.CDLL(None).fflush(None)  # what native code printed with C stdio
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def _copy_until_closed(pipes: list[int], paths: list[str]) -> None:
    """The child's output pipes into its files, until every process holding them has closed them."""
    files = [open(p, "wb") for p in paths]
    selector = selectors.DefaultSelector()
    for fd, f in zip(pipes, files):
        selector.register(fd, selectors.EVENT_READ, f)
    while selector.get_map():
        for key, _ in selector.select():
            chunk = os.read(key.fd, 65536)
            if chunk:
                key.data.write(chunk)
            else:
                selector.unregister(key.fd)
                os.close(key.fd)
    for f in files:
        f.close()


def serve() -> None:
    printed = _import_libraries()
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    print(json.dumps({"ready": os.getpid()}), file=reply)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                reply.close()
                os.close(out_r)
                os.close(err_r)
                _become(request, printed, (out_w, err_w))
            except BaseException:  # noqa: BLE001  (the set-up failed: say so where the test looks)
                import traceback

                traceback.print_exc()
                os._exit(1)
            _finish(request["argv"])
        os.close(out_w)
        os.close(err_w)
        print(json.dumps({"id": request["id"], "pid": pid}), file=reply)
        _copy_until_closed([out_r, err_r], [request["stdout"], request["stderr"]])
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"id": request["id"], "returncode": os.waitstatus_to_exitcode(status)}), file=reply)


if __name__ == "__main__":
    serve()

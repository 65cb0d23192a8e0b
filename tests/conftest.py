"""Shared fixtures: repo paths, the shared real CIFAR-10 subset, and a subprocess runner."""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests import conftest / probes by name

import pytest
from warm_python import per_command

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each, for the tests and the command lines they start (two threads per
    # worker oversubscribe the cores: 1.1x faster than one process instead of 1.7x). Tests of threading set theirs.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
SUBSET = REPO.parent / "shared" / "data" / "cifar10-subset"


@pytest.fixture(scope="session")
def cifar_subset() -> Path:
    """Real CIFAR-10 images (official python layout) shipped beside the repo in ../shared.

    Missing data fails the tests that need it: a green run must mean they ran. Set
    ``FLGC_SKIP_DATA_TESTS=1`` to skip them knowingly on a machine without the subset.
    """
    if not (SUBSET / "cifar-10-batches-py" / "test_batch").is_file():
        message = (f"real CIFAR-10 subset not found at {SUBSET} (see README: Tests); "
                   "set FLGC_SKIP_DATA_TESTS=1 to skip the tests that need it")
        if os.environ.get("FLGC_SKIP_DATA_TESTS") == "1":
            pytest.skip(message)
        pytest.fail(message)
    return SUBSET


# Variables the libraries set in this process when tests train, compile or load data in it (seed_everything,
# deterministic mode, inductor, protobuf users, scikit-learn's import): process state a user's shell does not have,
# so the commands do not get it either.
PROCESS_STATE = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG",
                 "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION",
                 "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK")
_SESSION_START = {name: os.environ[name] for name in PROCESS_STATE if name in os.environ}


def cli_env() -> dict[str, str]:
    """The environment of a command line: this process's, without what the libraries set in it since it started."""
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_STATE}
    return {**env, **_SESSION_START, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}


class Forked:
    """A command started by :meth:`WarmPython.start`: the ``subprocess.Popen`` calls the tests use (``pid``,
    ``returncode``, ``poll``, ``wait``, ``communicate``, ``send_signal``, ``kill``, ``terminate``); its output is
    captured (``communicate`` returns it as text)."""

    def __init__(self, warm: "WarmPython", number: int, pid: int, args: list[str], out: Path, err: Path) -> None:
        self.warm, self.number, self.pid, self.args, self.out, self.err = warm, number, pid, args, out, err
        self.returncode: int | None = None

    def _collect(self, timeout: float | None) -> None:
        try:
            done = self.warm._reply(timeout=timeout)
        except TimeoutError:
            return
        except BaseException:
            self.warm.stop()
            raise
        if done.get("id") != self.number or "returncode" not in done:
            self.warm.stop()
            raise RuntimeError(f"warm Python server: unexpected reply {done}")
        self.returncode, self.warm.running = done["returncode"], None

    def poll(self) -> int | None:
        if self.returncode is None and self.warm.running is self:
            self._collect(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if self.warm.running is not self:
                raise RuntimeError("warm Python server stopped while the command ran")
            self._collect(timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def output(self) -> tuple[str, str]:
        return tuple(p.read_bytes().decode(errors="replace") if p.exists() else "" for p in (self.out, self.err))

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.output()

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class WarmPython:
    """The pytest worker's :mod:`warm_python` server (started on first use, stopped with the worker)."""

    def __init__(self) -> None:
        self.env = cli_env()
        self.server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("warm_python.py"))], cwd=REPO,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env)
        self.folder = Path(tempfile.mkdtemp(prefix="warm-python-"))
        self.pending, self.requests, self.running = b"", 0, None
        try:
            self._reply(timeout=300)  # ready: the libraries are imported
        except BaseException:
            self.stop()
            raise

    def _reply(self, timeout: float | None = None) -> dict:
        """The server's next reply line (read from its pipe unbuffered: select must see every byte not yet read)."""
        fd = self.server.stdout.fileno()
        while b"\n" not in self.pending:
            if timeout is not None and not select.select([fd], [], [], max(0.0, timeout))[0]:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the warm Python server exited ({self.server.poll()})")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def differences(self, env: dict[str, str]) -> set[str]:
        """The variables in which ``env`` differs from the environment the server imported its libraries under,
        other than those a command may set (:func:`warm_python.per_command`): empty if the server can run it."""
        return {k for k in {*env, *self.env} if env.get(k) != self.env.get(k) and not per_command(k)}

    def ready(self) -> bool:
        """No command started with :meth:`start` is still running (the server runs one at a time)."""
        if self.running is not None:
            self.running.poll()
        return self.running is None

    def start(self, args: tuple[str, ...], cwd: Path, env: dict[str, str], new_session: bool = False) -> "Forked":
        """``args`` forked from the server, returning once it runs. Any failure of the exchange stops the server
        (the next command starts a new one), so no reply is ever misread."""
        assert self.ready(), "the warm Python server runs one command at a time"
        self.requests += 1
        number = self.requests
        out, err = self.folder / f"{number}.out", self.folder / f"{number}.err"
        request = {"id": number, "argv": list(args), "cwd": str(cwd), "env": env, "stdout": str(out),
                   "stderr": str(err), "new_session": new_session}
        try:
            self.server.stdin.write(json.dumps(request) + "\n")
            self.server.stdin.flush()
            started = self._reply(timeout=60)
            assert started.get("id") == number and "pid" in started, started
        except BaseException:
            self.stop()
            raise
        self.running = Forked(self, number, started["pid"], [sys.executable, *args], out, err)
        return self.running

    def run(self, args: tuple[str, ...], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        """``args`` forked from the server, to its end; a ``CompletedProcess`` with ``forked`` (its pid) added."""
        proc = self.start(args, cwd, env)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:  # as subprocess.run: kill it, then report what it printed
            proc.kill()
            self.stop()
            raise subprocess.TimeoutExpired(proc.args, timeout, *proc.output()) from None
        done = subprocess.CompletedProcess(proc.args, code, *proc.output())
        done.forked = proc.pid
        proc.out.unlink(missing_ok=True)
        proc.err.unlink(missing_ok=True)
        return done

    def stop(self) -> None:
        """Stop the server (after the command it runs, if any: at most a minute) and forget it."""
        global _warm
        if _warm is self:
            _warm = None
        if self.running is not None and self.running.returncode is None:
            self.running.kill()
        try:
            self.server.stdin.write('{"quit": true}\n')
            self.server.stdin.close()
            self.server.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.server.kill()
            self.server.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


_warm: WarmPython | None = None
_plain_because: dict[str, int] = {}


def warm_python() -> WarmPython | None:
    """This worker's warm Python server, or None (``FLGC_TESTS_PLAIN_PROCESSES=1``, or it could not start)."""
    global _warm
    if os.environ.get("FLGC_TESTS_PLAIN_PROCESSES") == "1":
        return None
    if _warm is None:
        try:
            _warm = WarmPython()
        except Exception as err:  # noqa: BLE001  (plain processes then: slower, the same checks)
            import warnings

            warnings.warn(f"warm Python server unavailable ({err}); command lines run as plain processes")
            os.environ["FLGC_TESTS_PLAIN_PROCESSES"] = "1"
            return None
    return _warm


@pytest.fixture(scope="session", autouse=True)
def _stop_warm_python():
    yield
    if _warm is not None:
        _warm.stop()
    if _plain_because:
        import warnings

        warnings.warn("command lines run as plain processes because these variables differed from the warm Python "
                      f"server's environment (variable: commands): {_plain_because}")


def _warm_for(env: dict[str, str]) -> WarmPython | None:
    """The warm Python server if it can run a command with ``env`` now; else None, and the variables that kept it
    from it are counted (reported at the end of the run: each such command paid for its imports)."""
    warm = warm_python()
    if warm is None or not warm.ready() or warm.server.poll() is not None:
        return None
    differences = warm.differences(env)
    for name in differences:
        _plain_because[name] = _plain_because.get(name, 0) + 1
    return None if differences else warm


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600, check: bool = True, plain: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a documented command line (``python train.py ...``) as a user would: a process of its own with its own
    argv, environment (``env``, default :func:`cli_env`), output and exit code. Forked from this worker's warm Python
    server (:mod:`warm_python`: the libraries already imported) unless ``plain`` (a fresh ``python``: the README's
    commands, and the uninterrupted runs resumed runs must match, so that a run depending on the string hash seed
    still fails) or ``env`` differs from the server's in more than :func:`warm_python.per_command` variables."""
    env = cli_env() if env is None else env
    warm = None if plain else _warm_for(env)
    if warm is not None:
        proc = warm.run(args, cwd, env, timeout)
    else:
        proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env=env)
        proc.forked = None
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc


def start_cli(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None, new_session: bool = False,
              capture: bool = False):
    """Start a command line and return at once, for tests that signal or kill it: forked from the warm Python
    server like :func:`run_cli` (a :class:`Forked`, its output always captured), or a ``subprocess.Popen`` (another
    ``env``, or a command of the server still running; output captured if ``capture``). ``new_session``: the
    command leads a process group of its own (``os.killpg(proc.pid, ...)`` stops it and what it started)."""
    env = cli_env() if env is None else env
    warm = _warm_for(env)
    if warm is not None:
        return warm.start(args, cwd, env, new_session)
    pipe = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=True,
                            start_new_session=new_session)


# Settings that keep a real-data run to a few seconds of training on 2 CPU cores.
TINY = (
    "data.limit_train=64", "data.limit_test=32", "data.batch_size=32",
    "trainer.accelerator=cpu", "logger=csv", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
)


# Small deterministic CPU runs for the kill / stop / resume tests: width 0.25, batches of 32, 2 epochs.
BASE = (*TINY, "model.width_mult=0.25", "trainer.deterministic=true", "trainer.max_epochs=2")
# 3 steps per epoch; validation in 4 batches of 8, so a stop signal during validation meets a batch that is not the
# last one (Lightning itself stops after any batch but the last: one batch would hide a missing deferral).
SHORT = (*BASE, "data.limit_train=96", "data.eval_batch_size=8")


def probe(path: Path, pause: float = 0.0) -> tuple[str, ...]:
    """Overrides adding tests/probes.py's StepRecorder (one JSON line per step and validation start/end)."""
    return ("+callbacks.probe._target_=tests.probes.StepRecorder", f"+callbacks.probe.path={path}",
            f"+callbacks.probe.pause_in_validation={pause}")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, cifar_subset) -> tuple[Path, Path]:
    """The uninterrupted SHORT run (run directory, its step records) that the stopped, killed and requeued runs
    must end identical to, trained once for all of them. Their checkpoint intervals differ from its own (the
    default): where checkpoints are written does not change what a run computes, so this is checked too."""
    folder = tmp_path_factory.mktemp("reference")
    run_cli("train.py", f"data.root={cifar_subset}", *SHORT, *probe(folder / "full.jsonl"),
            f"hydra.run.dir={folder / 'full'}", plain=True)
    return folder / "full", folder / "full.jsonl"

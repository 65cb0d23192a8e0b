"""Runs that are stopped from outside: SIGTERM / Ctrl-C / SLURM requeue, a killed sweep, a full disk.

All through the real command lines, with the default data settings.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SHORT, cli_env, probe, run_cli, start_cli  # SHORT: 3 steps per epoch, 2 epochs, validation in 4 batches
from probes import hold, read_records
from test_resume import assert_same_run, last_step, wait_until

pytestmark = pytest.mark.slow


def start(args, run_dir: Path, env=None):
    return start_cli("train.py", *args, f"hydra.run.dir={run_dir}", env=env, capture=True)


def steps(records) -> list[int]:
    return [r["step"] for r in records if r["event"] == "step"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_writes_a_checkpoint_at_the_next_step_and_resume_is_exact(tmp_path, cifar_subset, signum,
                                                                             reference_run):
    data = f"data.root={cifar_subset}"
    cut, records = tmp_path / "cut", tmp_path / "cut.jsonl"
    proc = start((data, *SHORT, *probe(records)), cut)
    wait_until(lambda: records.exists() and 1 in steps(read_records(records)), proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-2000:]
    last = cut / "checkpoints" / "last.ckpt"
    stopped_at = steps(read_records(records))[-1]
    assert stopped_at < 6, "the run finished before the signal"
    assert last_step(last) == stopped_at  # written at the step boundary where it stopped: nothing lost
    message = err.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert message.startswith(f"stopped: {name} received; training stopped, resumable checkpoint written at "
                              f"global step {stopped_at}: {last}"), err[-2000:]
    assert "Traceback" not in err
    run_cli("train.py", data, *SHORT, *probe(records), f"ckpt_path={last}")
    # the two processes together trained each step once: the resume continued at stopped_at + 1 (a restart
    # from scratch would train steps 1.. again, and end bit-identical all the same)
    assert steps(read_records(records)) == list(range(1, 7))
    assert_same_run(reference_run[0], cut)


def test_a_command_forked_from_the_warm_server_runs_as_a_fresh_python_does(tmp_path, cifar_subset, reference_run):
    """run_cli forks most command lines from a Python that has imported torch and Lightning already
    (tests/warm_python.py); the reference run is a fresh ``python``. The same command both ways: the same steps,
    every tensor, optimizer state, learning rate, validation metric and assignment record equal, in a process of
    its own."""
    from conftest import warm_python

    warm = warm_python()
    if warm is None:
        pytest.skip("FLGC_TESTS_PLAIN_PROCESSES=1: every command runs in a fresh python")
    run, records = tmp_path / "warm", tmp_path / "warm.jsonl"
    proc = run_cli("train.py", f"data.root={cifar_subset}", *SHORT, *probe(records), f"hydra.run.dir={run}")
    assert proc.forked, "the command ran as a plain process (its environment differs from the server's?)"
    assert steps(read_records(records)) == steps(read_records(reference_run[1])) == list(range(1, 7))
    assert {r["pid"] for r in read_records(records)} == {proc.forked}
    assert_same_run(reference_run[0], run)


def test_stop_signal_during_validation_lets_it_finish_first(tmp_path, cifar_subset, reference_run):
    """Validation has 4 batches (SHORT), each followed by a pause; the signal arrives during the first."""
    data = f"data.root={cifar_subset}"
    cut, records = tmp_path / "cut", tmp_path / "cut.jsonl"
    proc = start((data, *SHORT, *probe(records, pause=0.5)), cut)
    wait_until(lambda: records.exists() and any(r["event"] == "validation_start" for r in read_records(records)), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    events = [r["event"] for r in read_records(records)]
    assert events[-2:] == ["validation_start", "validation_end"]  # validation completed after the signal
    assert last_step(cut / "checkpoints" / "last.ckpt") == 3  # the end-of-epoch-0 checkpoint
    run_cli("train.py", data, *SHORT, *probe(records), f"ckpt_path={cut / 'checkpoints' / 'last.ckpt'}")
    assert steps(read_records(records)) == list(range(1, 7))  # continued at step 4, not over
    assert_same_run(reference_run[0], cut)


def test_slurm_requeue_signal_checkpoints_requeues_and_the_same_command_continues(tmp_path, cifar_subset,
                                                                                 reference_run):
    """SIGUSR1 (Lightning's auto-requeue signal): checkpoint at the step boundary, `scontrol requeue <job>`; the
    requeued job runs the very same command in the same run directory and continues from its last.ckpt. The signal
    is sent once step 2 is recorded, so it lands in the epoch's last step (3 of 3): Lightning then starts the
    epoch's validation and would abort it at its first batch (4 here), before the epoch-end checkpoint; the stop
    must wait for validation and the checkpoint (Preemption.on_validation_start takes it back)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    fake = bin_dir / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**cli_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}  # plain: another PATH
    data = f"data.root={cifar_subset}"
    job, records = tmp_path / "job", tmp_path / "job.jsonl"
    args = (data, *SHORT, *probe(records))
    proc = start(args, job, env)
    wait_until(lambda: records.exists() and 2 in steps(read_records(records)), proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGUSR1, err[-2000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    stopped_at = steps(read_records(records))[-1]
    assert last_step(job / "checkpoints" / "last.ckpt") == stopped_at and "SLURM requeue requested" in err
    again = subprocess.run([sys.executable, "train.py", *args, f"hydra.run.dir={job}"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)  # the requeued job: same command
    assert again.returncode == 0, again.stderr[-2000:]
    assert "the run directory already holds this run: continuing from" in again.stderr + again.stdout
    assert steps(read_records(records)) == list(range(1, 7))  # each step trained once across both processes
    assert_same_run(reference_run[0], job)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_killed_sweep_run_again_skips_finished_jobs_resumes_the_cut_one_and_runs_the_rest(tmp_path, cifar_subset):
    data = f"data.root={cifar_subset}"
    sweep, records = tmp_path / "sweep", tmp_path / "sweep.jsonl"
    args = ["train.py", "-m", "groups=1,2,4", data, *SHORT, "callbacks.step_checkpoint.every_n_train_steps=1",
            *probe(records), f"hydra.sweep.dir={sweep}"]
    job1_last, held = sweep / "1" / "checkpoints" / "last.ckpt", tmp_path / "held"
    proc = start_cli(*args, *hold(job1_last, 4, held), new_session=True)
    wait_until(held.exists, proc)  # job 1 (groups=2) is in its second epoch, its step 4 checkpoint on disk
    assert last_step(job1_last) == 4
    os.killpg(proc.pid, signal.SIGKILL)  # a reboot / a lost SSH session
    proc.wait()
    finished_job0 = tree_digest(sweep / "0")
    assert not (sweep / "2").exists()
    run_cli(*args)  # the same command again
    again = tree_digest(sweep / "0")  # its results; Hydra rewrites its .hydra record and appends to train.log
    changed = [k for k, v in finished_job0.items() if again.get(k) != v and not k.startswith(".hydra")
               and not k.endswith(".log")]
    assert not changed, f"the finished job was touched: {changed}"
    by_pid: dict[int, list[dict]] = {}
    for r in read_records(records):
        by_pid.setdefault(r["pid"], []).append(r)
    second = list(by_pid.values())[1:]  # the processes of the second invocation (one process runs all jobs)
    second_steps = [r["step"] for run in second for r in run if r["event"] == "step"]
    assert second_steps == [5, 6, 1, 2, 3, 4, 5, 6]  # job 1 from its step 4 checkpoint, then job 2 whole
    # the resumed job ends as an uninterrupted run would (job 2 ran whole in the second invocation: its steps above)
    single = tmp_path / "single2"
    run_cli("train.py", data, *SHORT, "groups=2", f"hydra.run.dir={single}", plain=True)
    assert_same_run(single, sweep / "1")
    report = run_cli("-m", "flgc_lightning.report", str(sweep))
    assert report.stdout.count("| finished |") == 3 and "| unfinished |" not in report.stdout


def limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_checkpoint_that_cannot_be_written_stops_with_one_error_and_keeps_the_previous_one(tmp_path, cifar_subset):
    run = tmp_path / "run"
    data = f"data.root={cifar_subset}"
    run_cli("train.py", data, *SHORT, "trainer.max_epochs=1", f"hydra.run.dir={run}")
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    size = len(before)
    # Files may not grow past half a checkpoint (EFBIG, as a full disk or quota gives ENOSPC / EDQUOT).
    proc = subprocess.run([sys.executable, "train.py", data, *SHORT, f"ckpt_path={last}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size(size // 2))
    assert proc.returncode == 1, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: could not write checkpoint '{run / 'checkpoints'}/") and "File too large [EFBIG]" in message
    assert "Traceback" not in proc.stderr
    assert last.read_bytes() == before and torch.load(last, weights_only=True)["global_step"] == 3
    assert not [p.name for p in (run / "checkpoints").iterdir() if "tmp" in p.name]  # no temporary files left


def test_atomic_write_on_a_full_disk_removes_its_temporary_and_names_the_file(tmp_path):
    """A real ENOSPC from the kernel: the temporary file is a link to /dev/full."""
    from flgc_lightning.training.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(10)}, target)
    os.symlink("/dev/full", tmp_path / f".last.ckpt.tmp-{os.getpid()}")
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint '.*last.ckpt': No space left on device \[ENOSPC\]"):
        io.save_checkpoint({"w": torch.zeros(100_000)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(10))


@pytest.mark.parametrize("limit", [1, 4096 * 3 + 7, 300_000, 400_123, 799_999])
def test_atomic_write_past_a_file_size_limit_names_the_error_wherever_the_limit_falls(tmp_path, limit):
    """A file-size limit (EFBIG, like a quota) cut at any byte: one CheckpointWriteError, never torch's
    zip-writer RuntimeError, no temporary left, the previous checkpoint intact."""
    from flgc_lightning.training.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(10)}, target)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint '.*last.ckpt': File too large \[EFBIG\]"):
            io.save_checkpoint({"w": torch.zeros(200_000)}, target)  # 800 kB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(10))


def test_two_process_ddp_same_weights_disjoint_shards_rank0_writes_and_exact_resume(tmp_path):
    """CPU DDP (gloo, 2 processes) on the digits data: every step both ranks hold the same weights, they train
    on disjoint shards, only rank 0 writes into the run directory, and a run killed mid-epoch and resumed
    ends bit-identical to an uninterrupted 2-process run."""
    args = ("experiment=quickstart", "trainer=ddp_cpu", "trainer.devices=2", "trainer.max_epochs=2",
            "data.limit_train=256", "data.limit_test=64", "data.batch_size=32", "model.width_mult=0.25",
            "test_after_fit=false", "logger=csv", "num_threads=1", "callbacks.step_checkpoint.every_n_train_steps=1",
            "++trainer.enable_progress_bar=false")

    def probes(name: str, run: Path) -> tuple[str, ...]:
        return (*probe(tmp_path / f"{name}.jsonl"), "+callbacks.ranks._target_=tests.probes.RankProbe",
                f"+callbacks.ranks.folder={tmp_path / name}", f"+callbacks.ranks.run_dir={run}")

    full = tmp_path / "full"
    run_cli("train.py", *args, *probes("full", full), f"hydra.run.dir={full}", timeout=600, plain=True)
    ranks = {r["rank"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "full").glob("rank*.json"))}
    assert sorted(ranks) == [0, 1]
    assert ranks[0]["weights"] == ranks[1]["weights"] and len(ranks[0]["weights"]) == 8  # 256 / 2 ranks / 32 x 2 epochs
    per_epoch = 4 * 32
    for epoch in (0, 1):
        shard = [set(ranks[r]["samples"][epoch * per_epoch:(epoch + 1) * per_epoch]) for r in (0, 1)]
        assert len(shard[0]) == len(shard[1]) == per_epoch and not shard[0] & shard[1]
    assert ranks[1]["writes"] == [] and any(w.endswith("last.ckpt") or "last.ckpt" in w for w in ranks[0]["writes"])
    # nothing of rank 1 before the probe was set up either (Hydra's job log of the restarted command)
    assert not [p.name for p in full.rglob("*") if "process_1" in p.name]

    cut, records = tmp_path / "cut", tmp_path / "cut.jsonl"
    held = tmp_path / "held"
    proc = start_cli("train.py", *args, *probes("cut", cut), f"hydra.run.dir={cut}",
                     *hold(cut / "checkpoints" / "last.ckpt", 2, held), new_session=True)
    wait_until(held.exists, proc, timeout=600)  # mid epoch 0, its step 2 checkpoint on disk
    os.killpg(proc.pid, signal.SIGKILL)  # both processes
    proc.wait()
    saved = last_step(cut / "checkpoints" / "last.ckpt")
    before = len(read_records(records))
    run_cli("train.py", *args, *probes("cut", cut), f"ckpt_path={cut / 'checkpoints' / 'last.ckpt'}", timeout=600)
    resumed = [r for r in read_records(records)[before:] if r["event"] == "step"]
    assert {r["rank"] for r in resumed} == {0, 1}
    assert min(r["step"] for r in resumed) == saved + 1 and max(r["step"] for r in resumed) == 8
    assert_same_run(full, cut)


def test_two_process_ddp_with_a_learning_estimator_keeps_ranks_identical_through_a_regroup(tmp_path):
    """Gumbel noise, dense weight gradients and a regroup under DDP. DDP averages gradients, so steps keep the
    ranks identical whatever each rank's noise; what could split them is the regroup, which rewrites weights and
    logits outside the optimizer: the weights and logits of both ranks must still match after every step, and
    the regroup must really move channels (inputs and filters)."""
    run = tmp_path / "run"
    run_cli("train.py", "experiment=quickstart", "trainer=ddp_cpu", "trainer.devices=2", "trainer.max_epochs=2",
            "data.limit_train=128", "data.limit_test=64", "data.batch_size=32", "model.width_mult=0.25",
            "model.assign_grad=gumbel", "model.dense_weight_grad=true", "assign_optim.lr_mult=10",
            "assign_optim.regroup_epochs=[1]", "test_after_fit=false", "logger=csv", "num_threads=1",
            "++trainer.enable_progress_bar=false", "+callbacks.ranks._target_=tests.probes.RankProbe",
            f"+callbacks.ranks.folder={tmp_path / 'ranks'}", f"+callbacks.ranks.run_dir={run}",
            f"hydra.run.dir={run}", timeout=600)
    ranks = {r["rank"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "ranks").glob("rank*.json"))}
    assert sorted(ranks) == [0, 1] and len(ranks[0]["weights"]) == 4  # 128 / 2 ranks / 32 x 2 epochs
    assert ranks[0]["weights"] == ranks[1]["weights"]
    summary = json.loads((run / "summary.json").read_text())
    moves = summary["assignment_diagnostics"]
    assert summary["config"]["assign_grad"] == "gumbel" and summary["status"] == "finished"
    assert moves["moves_inputs"] > 0 and moves["moves_filters"] > 0, moves

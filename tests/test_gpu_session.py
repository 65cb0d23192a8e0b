"""benchmarks/gpu_session.py, rehearsed: its --dry-run runs every section on the CPU with tiny sizes."""
from __future__ import annotations

import json
import sys
import tarfile

import pytest

from conftest import REPO, run_cli


@pytest.mark.slow
def test_gpu_session_dry_run_runs_every_section(cifar_subset, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("benchmarks/gpu_session.py", "--dry-run", "--out", str(out), "--data", str(cifar_subset),
                   "--work", str(tmp_path / "work"), timeout=900, check=False)
    results = json.loads((out / "results.json").read_text())
    sections = results["sections"]
    assert list(sections) == ["a. correctness", "b. training throughput", "c. 400-epoch projection",
                              "d. learned-groups study"], proc.stdout[-3000:]
    for name, value in sections.items():
        assert value["status"] == "ok", (name, value.get("error"), proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]

    correctness = sections["a. correctness"]
    assert all(correctness["checks"].values()), correctness["checks"]
    assert {f["form"] for f in correctness["deployed"]} >= {"blockdiag eager", "fused eager", "blockdiag .pt2"}

    rows = sections["b. training throughput"]["rows"]
    measured = [r for r in rows if "images_per_s" in r]
    # every model of the matrix, the fixed-batch and cuDNN rows, and the parallel (compile) workers
    assert {r["model"] for r in measured} == {"dense", "grouped-8", "FLGC-8 reference", "FLGC-8 learning"}, rows
    assert any(r.get("fixed_batch") for r in measured) and any(r.get("parallel") for r in measured)
    assert all(r["host_syncs"]["steps"] >= 1 and r["host_syncs"]["syncs"] == 0 for r in measured)
    assert sections["b. training throughput"]["data_share"] is not None

    epochs = sections["c. 400-epoch projection"]
    assert len(epochs["epoch_times_s"]) == 2 and epochs["projected_400_epochs_min"] > 0
    assert epochs["host_syncs"]["steps"] > 0 and epochs["host_syncs"]["syncs"] == 0

    study = sections["d. learned-groups study"]
    assert {r["status"] for r in study["runs"]} == {"finished"}, study["runs"]
    assert all(r["test_acc"] is not None for r in study["runs"])

    markdown = (out / "results.md").read_text()
    for heading in ("## a.", "## b.", "## c.", "## d.", "Sweep report"):
        assert heading in markdown
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("summary.json") for n in names) and any(n.endswith("a_train.log") for n in names)


def test_gpu_session_sections_resume_from_saved_state(tmp_path):
    """A second command (--sections d) adds to the results the first one saved in the work folder."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_session import Results

    first = Results(tmp_path / "out1", tmp_path / "work" / "results.json")
    first.set("a. correctness", {"status": "ok"}, "## a. first")
    second = Results(tmp_path / "out2", tmp_path / "work" / "results.json")
    second.set("d. learned-groups study", {"status": "ok"}, "## d. second")
    assert list(json.loads((tmp_path / "out2" / "results.json").read_text())["sections"]) == [
        "a. correctness", "d. learned-groups study"]
    assert (tmp_path / "out2" / "results.md").read_text().index("## a.") < (tmp_path / "out2" / "results.md").read_text().index("## d.")

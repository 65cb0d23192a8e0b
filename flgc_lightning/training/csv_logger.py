"""Lightning's CSVLogger, with ``metrics.csv`` never left half-written.

Lightning's writer rewrites the whole file in place (truncate, then write every row again) each time a metric name
appears for the first time, e.g. the first epoch-level training metrics right after the first validation. A run
killed inside that rewrite lost every row logged so far (seen: SIGKILL after epoch 0's checkpoint, in
tests/test_resume.py), which resuming cannot bring back. Here the rewrite goes to a temporary file in the same
folder that then replaces ``metrics.csv`` in one step (``os.replace``). Appending new rows is left as it was.
"""
from __future__ import annotations

import csv
import os
import tempfile

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

# the method replaced below; if a Lightning release renames it, fail loudly instead of silently losing the fix
assert hasattr(ExperimentWriter, "_rewrite_with_new_header"), "pytorch_lightning's CSV writer changed"


class AtomicExperimentWriter(ExperimentWriter):
    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        path = self.metrics_file_path
        if "://" in str(path):  # a remote filesystem: Lightning's own rewrite
            return super()._rewrite_with_new_header(fieldnames)
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".metrics-", suffix=".csv")
        try:
            with os.fdopen(fd, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


class AtomicCSVLogger(CSVLogger):
    """:class:`~pytorch_lightning.loggers.CSVLogger` writing through :class:`AtomicExperimentWriter`."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AtomicExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AtomicExperimentWriter(log_dir=self.log_dir)
        return self._experiment

"""Assignment-change records of FLGC layers: computing, reading, tables, pictures (REFERENCE.md section 4).

The training-side writer is :class:`flgc_lightning.callbacks.AssignmentTracker`; the report
command is ``python -m flgc_lightning.assignments`` (see docs/assignments.md).
"""
from flgc_lightning.assignments.changes import assignment_groups, empty_groups, layer_record, side_change
from flgc_lightning.assignments.records import RECORDS_FILENAME, RecordsError, read_records
from flgc_lightning.assignments.table import layer_table, network_summary

__all__ = [
    "RECORDS_FILENAME", "RecordsError", "assignment_groups", "empty_groups", "layer_record", "layer_table",
    "network_summary", "read_records", "side_change",
]

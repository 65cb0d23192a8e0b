"""Entry point: ``python -m flgc_lightning.assignments RUN_DIR [--layer N] [--filters] [--plot]``."""
from flgc_lightning.assignments.report import main
from flgc_lightning.cli import report_user_errors

if __name__ == "__main__":
    report_user_errors(main)

"""Evaluate a checkpoint on the test split: `python test.py ckpt_path=PATH [data.root=...]`.

The model is rebuilt from the checkpoint's own saved config.
"""
import hydra
from omegaconf import DictConfig

import flgc_lightning.config  # noqa: F401
from flgc_lightning.cli import report_user_errors
from flgc_lightning.training.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="test")
def main(cfg: DictConfig) -> None:
    report_user_errors(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()

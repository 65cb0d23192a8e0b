"""Train MobileNetV2 (dense / grouped / FLGC) on CIFAR-10: `python train.py model.use_flgc=true groups=8`.

See README.md for the config reference; `python train.py --help` lists config groups.
"""
import hydra
from omegaconf import DictConfig

import flgc_lightning.config  # noqa: F401  (registers the run-directory resolvers)
from flgc_lightning.cli import report_user_errors
from flgc_lightning.training.objective import run_and_score
from flgc_lightning.training.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    # The value a Hydra sweeper optimises (hparams_search=optuna): the best held-out validation accuracy by
    # default (optimized_metric); never NaN.
    return report_user_errors(lambda: run_and_score(cfg, train))


if __name__ == "__main__":
    main()

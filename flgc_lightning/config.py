"""Hydra/OmegaConf glue: config location, run-directory resolvers, compose helper for tests."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def checkpoint_run_dir(ckpt_path: Optional[str]) -> Optional[Path]:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` with ``<run>/.hydra``)."""
    if not ckpt_path:
        return None
    path = Path(str(ckpt_path)).expanduser()
    run = path.parent.parent
    if path.parent.name == "checkpoints" and (run / ".hydra").is_dir():
        return run
    return None


def _run_dir(ckpt_path: Optional[str], fresh: str) -> str:
    run = checkpoint_run_dir(ckpt_path)
    return str(run) if run is not None and run.is_dir() else fresh


def _hydra_subdir(ckpt_path: Optional[str], stamp: str) -> str:
    # A resumed run keeps the original .hydra/config.yaml and adds its own beside it.
    return f".hydra/resume-{stamp}" if checkpoint_run_dir(ckpt_path) is not None else ".hydra"


def _job_log(output_dir: str, job_name: str) -> str:
    """Hydra's job log file; ``os.devnull`` for the DDP processes Lightning starts for ranks > 0."""
    import os
    import re

    return os.devnull if re.search(r"_ddp_process_[1-9]\d*$", str(job_name)) else f"{output_dir}/{job_name}.log"


# What each conv type of a study arm sets (defaults: FLGC, learned, reference estimator, logits at the
# optimizer's learning rate, no schedule). The learning settings are the planted-structure test's best
# (README, "Positive control: planted groups") scaled to the 6 epochs of experiment=subset_study_v2: regroup
# at epochs 2 and 4, groups frozen from epoch 4 (the last third trains the final architecture), the logits at
# 10x the learning rate, Gumbel temperature 5 -> 1.
ARM_DEFAULTS = {"use_flgc": True, "assignment": "learned", "assign_grad": "reference", "dense_weight_grad": False,
                "lr_mult": 1.0, "retrain": False, "groups_shuffle": False, "regroup_epochs": [],
                "freeze_epoch": None, "tau_start": 1.0, "tau_end": 0.1}
_LEARNING = {"dense_weight_grad": True, "lr_mult": 10.0, "regroup_epochs": [2, 4], "freeze_epoch": 4}
ARM_KINDS = {
    "grouped": {"use_flgc": False}, "FLGC": {}, "FLGC-frozen": {"assignment": "frozen"},
    "FLGC-balanced": {"assignment": "balanced"},
    "FLGC-ste+dw": {"assign_grad": "ste", "dense_weight_grad": True, "lr_mult": 10.0},
    "FLGC-gumbel+dw": {"assign_grad": "gumbel", "dense_weight_grad": True, "lr_mult": 10.0},
    "FLGC-ste+dw+rg": {"assign_grad": "ste", **_LEARNING},
    "FLGC-gumbel+dw+rg": {"assign_grad": "gumbel", **_LEARNING, "tau_start": 5.0, "tau_end": 1.0},
    "FLGC-retrain": {"retrain": True}, "FLGC-retrain-shuffled": {"retrain": True, "groups_shuffle": True},
}


def parse_arm(arm: str) -> dict:
    """A study arm, ``dense`` or ``<conv type>-<G>`` (``grouped-8``, ``FLGC-frozen-4``, ``FLGC-ste+dw-8``), as
    model settings (``retrain``: the groups come from another arm's run, see :func:`_retrain_source`)."""
    if arm == "dense":
        return {**ARM_DEFAULTS, "groups": 1, "use_flgc": False}
    kind, _, groups = str(arm).rpartition("-")
    if kind not in ARM_KINDS or not groups.isdigit() or int(groups) < 2:
        raise ValueError(f"arm must be 'dense' or '<{'|'.join(ARM_KINDS)}>-<groups >= 2>', got {arm!r}")
    return {**ARM_DEFAULTS, **ARM_KINDS[kind], "groups": int(groups)}


def _arm(field: str, arm: str):
    value = parse_arm(arm)[field]
    return OmegaConf.create(value) if isinstance(value, list) else value  # a node OmegaConf can hold


def _retrain_source(arm: str, source_arm: str, run_dir: str, seed) -> Optional[str]:
    """``model.groups_from`` of a retraining arm: the last checkpoint of ``source_arm``'s run with the same seed
    in the same sweep folder as this run (job folders are named ``<arm>-s<seed>``); null for other arms."""
    if not parse_arm(arm)["retrain"]:
        return None
    return str(Path(run_dir).parent / f"{source_arm}-s{seed}" / "checkpoints" / "last.ckpt")


def register_resolvers() -> None:
    for name, fn in (("flgc_run_dir", _run_dir), ("flgc_hydra_subdir", _hydra_subdir), ("flgc_arm", _arm),
                     ("flgc_job_log", _job_log), ("flgc_retrain_source", _retrain_source)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def compose(config_name: str = "train", overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Compose a config the way the command line would (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)

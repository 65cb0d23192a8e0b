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


ARM_KINDS = {  # conv type of a study arm -> (use_flgc, assignment)
    "grouped": (False, "learned"), "FLGC": (True, "learned"), "FLGC-frozen": (True, "frozen"),
    "FLGC-balanced": (True, "balanced"),
}


def parse_arm(arm: str) -> dict:
    """A study arm, ``dense`` or ``<conv type>-<G>`` (``grouped-8``, ``FLGC-frozen-4``), as model settings."""
    if arm == "dense":
        return {"groups": 1, "use_flgc": False, "assignment": "learned"}
    kind, _, groups = str(arm).rpartition("-")
    if kind not in ARM_KINDS or not groups.isdigit() or int(groups) < 2:
        raise ValueError(f"arm must be 'dense' or '<{'|'.join(ARM_KINDS)}>-<groups >= 2>', got {arm!r}")
    use_flgc, assignment = ARM_KINDS[kind]
    return {"groups": int(groups), "use_flgc": use_flgc, "assignment": assignment}


def _arm(field: str, arm: str):
    return parse_arm(arm)[field]


def register_resolvers() -> None:
    for name, fn in (("flgc_run_dir", _run_dir), ("flgc_hydra_subdir", _hydra_subdir), ("flgc_arm", _arm),
                     ("flgc_job_log", _job_log)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def compose(config_name: str = "train", overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Compose a config the way the command line would (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)

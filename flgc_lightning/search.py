"""Optuna hyperparameter search as a Hydra sweeper (``python train.py -m hparams_search=optuna ...``).

Why our own sweeper rather than hydra-optuna-sweeper: its last release (1.3.0) requires ``optuna<3``, whose SQLite
storage fails with SQLAlchemy 2 (it needs ``sqlalchemy<2`` and an old alembic pinned), and it numbers a search's
jobs from 0 in every invocation, so running the same command again would put new trials into the folders of
finished ones. This one uses current Optuna and is resumable the way this project's grid sweeps are:

- the study lives in ``<sweep dir>/optuna.db`` (SQLite), and trial N runs in ``<sweep dir>/N``, the same layout as
  any multirun (``python -m flgc_lightning.report <sweep dir>`` reads it);
- ``n_trials`` is the study's total: the same command again (same ``hydra.sweep.dir``) first continues trials that
  a killed search left running (each from its own ``last.ckpt``, as a killed grid sweep's job), then runs the
  trials still missing. A finished search run again runs nothing and prints the best trial;
- a trial's value is what ``train.py`` returns (:mod:`flgc_lightning.training.objective`): the held-out validation
  score, or the worst value for the direction when training failed (diverged). A job that raises (a config error
  found before training) fails the trial and stops the search.

The search space uses Hydra's override grammar, as hydra-optuna-sweeper's does: ``interval(a, b)`` (floats;
``tag(int, interval(a, b))`` for integers), ``tag(log, interval(a, b))`` (log-uniform), ``choice(a, b, c)`` or
``a,b,c`` (categorical), ``range(start, stop, step)``; anything else is fixed for every trial.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from flgc_lightning.errors import ConfigError

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")
SAMPLERS = ("tpe", "random")


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("hparams_search=optuna needs Optuna: pip install -e '.[search]'") from None
    return optuna


def search_space(arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Optuna distributions of the sweep overrides among ``arguments``, and the fixed overrides."""
    od = _optuna().distributions
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    space, fixed = {}, []
    for override in OverridesParser.create().parse_overrides(arguments):
        if not override.is_sweep_override():
            fixed.append(override.input_line)
            continue
        name, value = override.get_key_element(), override.value()
        tags = set(getattr(value, "tags", ()) or ())
        if isinstance(value, IntervalSweep):
            if "int" in tags:
                space[name] = od.IntDistribution(int(value.start), int(value.end), log="log" in tags)
            else:
                space[name] = od.FloatDistribution(float(value.start), float(value.end), log="log" in tags)
        elif isinstance(value, RangeSweep):
            values = list(override.sweep_iterator())
            if all(isinstance(v, int) for v in values):
                space[name] = od.IntDistribution(values[0], values[-1], step=int(value.step))
            else:
                space[name] = od.CategoricalDistribution(values)
        elif isinstance(value, ChoiceSweep):
            space[name] = od.CategoricalDistribution(list(value.list))
        else:
            raise ConfigError(f"hparams_search: cannot search {override.input_line!r} (use interval(), choice() or range())")
    if not space:
        raise ConfigError("hparams_search: nothing to search; set hydra.sweeper.params (e.g. "
                          "optimizer.lr: tag(log, interval(0.01, 0.5))) or give a sweep on the command line")
    return space, fixed


def override_value(value: Any) -> str:
    """A sampled value as Hydra's command line reads it back."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)


class OptunaSearch:
    """A resumable Optuna study whose trials are Hydra jobs, each in ``<sweep dir>/<trial number>``.

    Args:
        direction: ``maximize`` or ``minimize``: must match what ``optimized_metric`` measures.
        n_trials: trials the study should have in total (finished or failed); a rerun adds only the missing ones.
        n_jobs: trials launched together (useful with a parallel launcher, ``hydra/launcher=joblib``).
        storage: Optuna storage URL; null: ``sqlite:///<sweep dir>/optuna.db``.
        study_name: the study's name inside the storage.
        sampler: ``tpe`` (default) or ``random``, seeded with ``seed``. The sampler's own state is not stored, so
            trials after a resume are not the ones an uninterrupted search would have drawn.
        params: the search space, ``{override key: sweep}``, e.g. ``{"optimizer.lr": "tag(log, interval(0.01, 0.5))"}``.
    """

    def __init__(self, direction: str = "maximize", n_trials: int = 20, n_jobs: int = 1, storage: Optional[str] = None,
                 study_name: str = "flgc", sampler: str = "tpe", seed: Optional[int] = 0,
                 params: Optional[dict] = None) -> None:
        problems = []
        if direction not in DIRECTIONS:
            problems.append(f"hydra.sweeper.direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        if sampler not in SAMPLERS:
            problems.append(f"hydra.sweeper.sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        for key, value in (("n_trials", n_trials), ("n_jobs", n_jobs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"hydra.sweeper.{key} must be a positive integer, got {value!r}")
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
        self.direction, self.n_trials, self.n_jobs = direction, n_trials, n_jobs
        self.storage, self.study_name, self.sampler, self.seed = storage, study_name, sampler, seed
        self.params = dict(params or {})
        self.config: Optional[DictConfig] = None
        self.launcher = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    # -- the study ---------------------------------------------------------------------------
    def _study(self):
        optuna = _optuna()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = self.storage or f"sqlite:///{self.sweep_dir.resolve() / 'optuna.db'}"
        sampler = (optuna.samplers.TPESampler(seed=self.seed) if self.sampler == "tpe"
                   else optuna.samplers.RandomSampler(seed=self.seed))
        study = optuna.create_study(study_name=self.study_name, storage=storage, sampler=sampler,
                                    direction=self.direction, load_if_exists=True)
        if study.direction.name.lower() != self.direction:
            raise ConfigError(f"hparams_search: the study {self.study_name!r} in {storage} maximizes/minimizes the other "
                              f"way ({study.direction.name.lower()}); hydra.sweeper.direction={self.direction} does not "
                              "match it. Use another hydra.sweep.dir or study_name for a new study.")
        log.info("Optuna study %r in %s: %d of %d trials done", self.study_name, storage, self._done(study),
                 self.n_trials)
        return study

    @staticmethod
    def _done(study) -> int:
        from optuna.trial import TrialState

        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)))

    def _launch(self, study, trials: list, fixed: list[str]) -> None:
        """Run ``trials`` (consecutive numbers) as one batch of jobs, ``<sweep dir>/<number>``, and tell their values."""
        from optuna.trial import TrialState

        overrides = [tuple(fixed) + tuple(f"{k}={override_value(v)}" for k, v in trial.params.items())
                     for trial in trials]
        returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
        for trial, ret in zip(trials, returns):
            try:
                value = float(ret.return_value)  # re-raises the job's exception
            except Exception:
                study.tell(trial.number, state=TrialState.FAIL)
                raise
            if math.isnan(value):  # train.py never returns NaN; another task function might
                log.warning("trial %d returned NaN: recorded as failed", trial.number)
                study.tell(trial.number, state=TrialState.FAIL)
                continue
            study.tell(trial.number, value)
            log.info("trial %d: %s (%s)", trial.number, value, " ".join(overrides[trials.index(trial)][len(fixed):]))

    def sweep(self, arguments: list[str]) -> Any:
        from optuna.trial import TrialState

        from flgc_lightning.training.objective import check_search

        check_search(self.config, self.direction)  # before any study or trial folder exists (each trial checks too)
        space, fixed = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        study = self._study()
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")  # as Hydra's own sweeper does
        unfinished = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
        for trial in unfinished:  # left by a killed search: continue each in its own folder
            log.info("continuing trial %d, left unfinished by an earlier run of this search", trial.number)
            self._launch(study, [trial], fixed)
        while self._done(study) < self.n_trials:
            batch = min(self.n_jobs, self.n_trials - self._done(study))
            trials = [study.ask(space) for _ in range(batch)]
            if [t.number for t in trials] != list(range(trials[0].number, trials[0].number + batch)):
                for trial in trials:  # another process asked in between: one job each keeps folder = trial number
                    self._launch(study, [trial], fixed)
            else:
                self._launch(study, trials, fixed)
        return self._report(study)

    def _report(self, study) -> dict:
        completed = [t for t in study.trials if t.value is not None]
        if not completed:
            raise ConfigError(f"hparams_search: no trial of {self.study_name!r} finished")
        best = study.best_trial
        result = {"name": "optuna", "study_name": self.study_name, "direction": self.direction,
                  "best_trial": best.number, "best_value": best.value, "best_params": dict(best.params),
                  "trials": len(study.trials)}
        OmegaConf.save(OmegaConf.create(result), self.sweep_dir / "optimization_results.yaml")
        log.info("best trial %d: %s with %s (%s)", best.number, best.value,
                 " ".join(f"{k}={override_value(v)}" for k, v in best.params.items()),
                 self.sweep_dir / "optimization_results.yaml")
        return result

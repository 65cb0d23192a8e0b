"""Hydra finds sweepers only in the ``hydra_plugins`` namespace: this is the Optuna sweeper of flgc-lightning
(``hparams_search=optuna``); the work is done in :mod:`flgc_lightning.search`, imported only when a search runs."""
from __future__ import annotations

import sys
from typing import Any, Optional

from hydra.plugins.sweeper import Sweeper


class OptunaSweeper(Sweeper):
    """A resumable Optuna search: see :class:`flgc_lightning.search.OptunaSearch` for the arguments."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.search: Optional[Any] = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from flgc_lightning.search import OptunaSearch

        self.search = OptunaSearch(**self.settings)
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from flgc_lightning.errors import UserError

        try:
            return self.search.sweep(arguments)
        except UserError as err:  # the search's own settings: one message, exit 1, nothing started
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None

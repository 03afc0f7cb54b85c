"""The search as an Optuna study on disk, for optuna-dashboard and ``optuna.load_study``.

Every told trial is also written to an Optuna journal storage, ``optuna.journal`` (study
``evomerge``, one float parameter per gene), whatever the optimizer. It is a view, not the state:
Optuna's storage does not hold a sampler's random state, so resuming from it alone would not be
exact. It is rebuilt from the search's own journal when it is missing or behind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from evomerge.objectives import Objective
from evomerge.search.space import Genome

OPTUNA_VIEW = "optuna.journal"
STUDY = "evomerge"


class OptunaView:
    """The Optuna study ``STUDY`` in ``directory / OPTUNA_VIEW``: one trial per told trial of the search
    (baselines left out: they are not points of the optimizer's)."""

    def __init__(self, directory: Path, genome: Genome, objectives: Sequence[Objective]):
        self.path = directory / OPTUNA_VIEW
        self.genome, self.objectives = genome, list(objectives)
        self.study = None
        self._dists = None  # the same for every trial: built once

    def open(self, trials: Sequence) -> None:
        """Open the study, rebuilt from ``trials`` (the search's, in order) unless it holds exactly as
        many trials as they have told ones already."""
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        path = self.path
        told = [t for t in trials if t.status != "running" and t.unit is not None]
        if path.exists():
            try:
                study = optuna.load_study(study_name=STUDY, storage=JournalStorage(JournalFileBackend(str(path))))
                if len(study.trials) == len(told):
                    if study.metric_names is None:  # written by an earlier version
                        self._name_metrics(study)
                    self.study = study
                    return
            except Exception:  # unreadable or another study: rebuilt below
                pass
        staged = path.with_name(path.name + ".staged")
        staged.unlink(missing_ok=True)
        directions = [o.direction for o in self.objectives]
        study = optuna.create_study(
            study_name=STUDY, directions=directions, storage=JournalStorage(JournalFileBackend(str(staged)))
        )
        self._name_metrics(study)
        for trial in told:
            self._add_to(study, trial)
        os.replace(staged, path)
        self.study = optuna.load_study(study_name=STUDY, storage=JournalStorage(JournalFileBackend(str(path))))

    def add(self, trial) -> None:
        """Add a told trial (a ``Trial`` of the search) to the open study."""
        self._add_to(self.study, trial)

    def _name_metrics(self, study) -> None:
        """Name the study's objectives: what optuna-dashboard labels its axes and columns with."""
        import warnings

        with warnings.catch_warnings():  # optuna marks set_metric_names experimental
            warnings.simplefilter("ignore")
            study.set_metric_names([o.name for o in self.objectives])

    def _add_to(self, study, trial) -> None:
        import optuna

        if trial.unit is None:  # a baseline: not a point of the optimizer's
            return
        lo, hi = self.genome.bounds
        params = {g.name: min(max(v, a), b) for g, v, a, b in zip(self.genome.genes, trial.genome, lo, hi)}
        if self._dists is None:
            self._dists = {
                g.name: optuna.distributions.FloatDistribution(a, max(b, a + 1e-12))
                for g, a, b in zip(self.genome.genes, lo, hi)
            }
        dists = self._dists
        attrs = {
            "evomerge_trial": trial.id,
            "replicate": trial.replicate,
            **{k: v for k, v in trial.info.items() if isinstance(v, (int, float, str, bool))},
        }
        if trial.status == "done":
            study.add_trial(
                optuna.trial.create_trial(params=params, distributions=dists, values=trial.values, user_attrs=attrs)
            )
        else:
            study.add_trial(
                optuna.trial.create_trial(
                    params=params, distributions=dists, user_attrs=attrs, state=optuna.trial.TrialState.FAIL
                )
            )

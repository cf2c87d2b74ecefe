"""The sweep's Optuna searcher (told the truth, persisted), its trial budget and its scheduler.

Why a searcher of our own instead of Ray's ``OptunaSearch`` (ray/tune/search/optuna/): Ray's tells
Optuna that a trial the scheduler stopped is COMPLETE with its truncated value (so TPE models an
early-stopped configuration as one that finished badly), reports intermediate values by
``training_iteration`` (which restarts after a restore), never sees the result that made the
scheduler stop a trial (Tune skips ``on_trial_result`` for it), and pickles its study into Tune's
experiment state, where an RDB storage reconnects to the original URL on unpickling. Fixing that
in a subclass would override nearly every method and depend on its private attributes; this
``Searcher`` is short and owns its state:

* every epoch is an Optuna intermediate value at step = the reported, monotonic ``epoch``,
  including the stopping result (taken from ``on_trial_complete``); an epoch reported twice (a
  trial resumed from an older checkpoint) keeps its first value, as Optuna's ``Trial.report`` does;
* on completion: FAIL for an errored trial or one whose last result has a truthy ``diverged``;
  COMPLETE with the final value for a trial that reported ``max_epochs`` epochs; PRUNED (values
  None: Optuna keeps the last intermediate value) for a trial stopped earlier. TPE then ranks
  PRUNED trials after the COMPLETE ones, by step and value (optuna ``_split_trials``).
* multi-objective (nsga2: objective and epoch_seconds): Optuna has no intermediate values for
  several objectives (``Trial.report`` raises), so none are reported; the states are the same,
  PRUNED without values (NSGA-II selects parents from COMPLETE trials only).
* the study lives in an RDB storage (sqlite in the sweep directory by default), so
  ``optuna.load_study`` and ``optuna-dashboard`` open it. Tune's experiment checkpoint holds the
  storage URL, the sampler, the Tune-trial -> Optuna-trial map and a copy of the study's trials;
  ``--resume`` reopens the same study, keeps each resumed trial's Optuna trial, and continues the
  numbering. A database lost with its node (the default sqlite file when ``--storage`` is
  ``s3://``) is rebuilt from that copy.

``SweepGenerator`` is Tune's ``SearchGenerator`` with a budget that ``--resume --num-samples`` can
raise: Tune restores the sample count from its saved state and ignores a new one (Ray treats a
restore as fault tolerance, not as a changed experiment).
"""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
)
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator

from ifsearch.errors import IfsearchError
from ifsearch.tracking.server import redact_uri

if TYPE_CHECKING:
    from ifsearch.search.plan import SweepPlan

STUDY_FILE = "optuna.db"  # the default study database, in the sweep's local directory
TUNE_TRIAL_ATTR = "tune_trial_id"  # Optuna user attr: the Tune trial (and MLflow run tag) behind it
OPTUNA_LOG_LEVEL = optuna.logging.WARNING  # no "Trial N finished" lines between Tune's tables


def default_storage(local_dir: Path) -> str:
    """``sqlite:////abs/<sweep dir>/optuna.db``: the study next to best_config.yaml."""
    return f"sqlite:///{(Path(local_dir) / STUDY_FILE).resolve()}"


class OptunaSearcher(Searcher):
    """Suggests configs from an Optuna study in RDB storage and tells it what Tune did.

    Args:
        space: define-by-run function (``SearchSpace.define_by_run``): suggests on an Optuna
            trial, returns None or a dict of constants.
        metric: the objective, or ``[objective, cost]`` for multi-objective samplers.
        mode: ``min``/``max`` (a list for several metrics).
        sampler: the Optuna sampler; pickled with Tune's state so a resumed sweep continues it.
        storage: an SQLAlchemy URL (``sqlite:////abs/optuna.db``, ``postgresql://...``).
        study_name: the sweep name; a new sweep refuses an existing study of that name.
        max_epochs: epochs of a full trial; a trial stopped before them is PRUNED.
        points_to_evaluate: configs (dotted keys) evaluated first, e.g. the warm start.
    """

    def __init__(self, space: Callable[[Any], dict | None], metric: str | list[str],
                 mode: str | list[str], sampler: optuna.samplers.BaseSampler, storage: str,
                 study_name: str, max_epochs: int,
                 points_to_evaluate: list[dict] | None = None) -> None:
        super().__init__(metric=metric, mode=mode)
        self.space = space
        self.sampler = sampler
        self.storage = storage  # kept from the live object on restore: see restore()
        self.study_name = study_name
        self.max_epochs = max_epochs
        self._trials: dict[str, tuple[int, int]] = {}  # Tune id -> (Optuna number, storage id)
        self._last_step: dict[str, int] = {}  # Tune id -> last epoch told as intermediate value
        self._told: set[str] = set()  # Tune ids whose Optuna trial is finished
        self._study: optuna.Study | None = None  # opened lazily, never pickled
        self.enqueue_on_restore: list[dict] = []  # points the launcher adds to a resumed sweep
        try:
            self._study = self._create_study()
        except optuna.exceptions.DuplicatedStudyError:
            raise IfsearchError(
                f"the Optuna study {study_name!r} already exists in {redact_uri(storage)}: a new "
                f"sweep of that name would mix its trials with the old ones; continue it with "
                f"--resume --name {study_name}, pick another --name, or delete the study "
                f"(optuna delete-study --study-name {study_name} --storage URL)") from None
        for point in points_to_evaluate or []:
            self._study.enqueue_trial(point)

    # -- the study ------------------------------------------------------------------------------

    def rdb(self) -> optuna.storages.RDBStorage:
        """The storage, connected (a database that cannot be opened fails here).

        Our own object rather than the study's (a cache wrapper), for direct writes.
        """
        if getattr(self, "_storage_obj", None) is None:
            try:
                self._storage_obj = optuna.storages.RDBStorage(self.storage)
            except Exception as exc:  # sqlalchemy's ArgumentError, OperationalError, ...
                raise IfsearchError(f"cannot open the Optuna storage {redact_uri(self.storage)}: "
                                    f"{type(exc).__name__}: {exc}; check --optuna-storage") \
                    from None
        return self._storage_obj

    @property
    def study(self) -> optuna.Study:
        """The sweep's study, opened from its storage on first use (and after a restore)."""
        if self._study is None:
            optuna.logging.set_verbosity(OPTUNA_LOG_LEVEL)
            try:
                self._study = optuna.load_study(study_name=self.study_name, storage=self.rdb(),
                                                sampler=self.sampler)
            except KeyError:
                raise IfsearchError(
                    f"the Optuna study {self.study_name!r} is not in {redact_uri(self.storage)}, "
                    "where this sweep keeps it; if the database moved, pass its URL with "
                    "--optuna-storage") from None
        return self._study

    def _create_study(self) -> optuna.Study:
        metrics = self._metric if isinstance(self._metric, list) else [self._metric]
        modes = self._mode if isinstance(self._mode, list) else [self._mode]
        optuna.logging.set_verbosity(OPTUNA_LOG_LEVEL)
        study = optuna.create_study(
            storage=self.rdb(), study_name=self.study_name, sampler=self.sampler,
            directions=["minimize" if m == "min" else "maximize" for m in modes])
        with warnings.catch_warnings():  # experimental in Optuna 5; the dashboard shows names
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(metrics)
        return study

    def _rebuild(self, trials: list[optuna.trial.FrozenTrial]) -> None:
        """Recreate the study from the checkpoint's copy of its trials, with the same numbers."""
        study = self._create_study()
        study_id = self.rdb().get_study_id_from_name(self.study_name)
        for trial in sorted(trials, key=lambda t: t.number):  # numbers are given in order
            self.rdb().create_new_trial(study_id, template_trial=trial)
        self._trials = {
            tid: (number, self.rdb().get_trial_id_from_study_id_trial_number(study_id, number))
            for tid, (number, _) in self._trials.items()}
        self._study = study
        print(f"the Optuna study {self.study_name!r} was not in {redact_uri(self.storage)}: "
              f"rebuilt there from the sweep's checkpoint ({len(trials)} trials)", flush=True)

    # -- Tune's Searcher interface --------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict | None:
        trial = self.study.ask()
        constants = self.space(trial)
        trial.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        storage_id = self.rdb().get_trial_id_from_study_id_trial_number(
            self.rdb().get_study_id_from_name(self.study_name), trial.number)
        self._trials[trial_id] = (trial.number, storage_id)
        return {**trial.params, **(constants or {})}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._trials and trial_id not in self._told:
            self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        """Tell Optuna how the trial ended (see the module docstring for the rules).

        A scheduler's STOP reaches the searcher only here: Tune skips ``on_trial_result`` for
        the stopping result and passes it as ``result``.
        """
        if trial_id not in self._trials or trial_id in self._told:
            return
        if result and not error:
            self._report(trial_id, result)
        state, values = self._outcome(trial_id, result, error)
        self.study.tell(self._trials[trial_id][0], values, state=state, skip_if_finished=True)
        self._told.add(trial_id)

    def _report(self, trial_id: str, result: dict) -> None:
        """The result's objective as the intermediate value at step ``epoch`` (once per epoch)."""
        if isinstance(self._metric, list) or result.get("diverged"):
            return  # Optuna has no intermediate values for several objectives
        step, value = result.get("epoch"), result.get(self._metric)
        if step is None or value is None or int(step) <= self._last_step.get(trial_id, -1):
            return
        try:
            self.rdb().set_trial_intermediate_value(self._trials[trial_id][1], int(step),
                                                     float(value))
        except optuna.exceptions.UpdateFinishedTrialError:
            # The study is ahead of Tune's saved state (the launcher died between the two):
            # the trial was told already; later results cannot change it.
            self._told.add(trial_id)
            return
        self._last_step[trial_id] = int(step)

    def _outcome(self, trial_id: str, result: dict | None,
                 error: bool) -> tuple[TrialState, Any]:
        if error or (result and result.get("diverged")):
            return TrialState.FAIL, None
        if not result:  # removed while pending or paused (e.g. a HyperBand bracket cut it)
            return (TrialState.PRUNED if trial_id in self._last_step else TrialState.FAIL), None
        epoch = result.get("epoch")
        if epoch is None or int(epoch) < self.max_epochs:
            return TrialState.PRUNED, None
        metrics = self._metric if isinstance(self._metric, list) else [self._metric]
        values = [result.get(m) for m in metrics]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            return TrialState.FAIL, None  # Optuna refuses a COMPLETE trial without a value
        return TrialState.COMPLETE, values if isinstance(self._metric, list) else values[0]

    # -- persistence: Tune pickles the searcher into its experiment state -----------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_study"] = None  # database connections are reopened from the URL
        state["_storage_obj"] = None
        return state

    def save(self, checkpoint_path: str) -> None:
        state = self.__getstate__()
        state["_trials_copy"] = self.study.get_trials(deepcopy=False)
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        """Take the trial map and sampler from the checkpoint; keep this object's settings.

        Before Tune calls this, the launcher may point a resumed sweep at a moved database
        (``storage``, from ``--optuna-storage``) and add points to evaluate next
        (``enqueue_on_restore``, from ``--warm-start``). A study missing from the storage is
        rebuilt from the checkpoint's copy. Trials the study has as RUNNING but the checkpoint
        does not know were asked after Tune's last save and will never run: they are marked FAIL.
        """
        storage, points = self.storage, self.enqueue_on_restore
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        trials_copy = state.pop("_trials_copy", [])
        self.__dict__.update(state)
        self.storage, self.enqueue_on_restore = storage, []
        self._study, self._storage_obj = None, None
        if self.study_name not in optuna.study.get_all_study_names(self.rdb()):
            self._rebuild(trials_copy)
        known = {number for number, _ in self._trials.values()}
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number not in known:
                self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        for point in points:  # evaluated next, unless the study has tried it
            self.study.enqueue_trial(point, skip_if_exists=True)


class SweepGenerator(SearchGenerator):
    """Tune's ``SearchGenerator`` whose trial budget (``num_samples``) survives a restore.

    Tune restores ``SearchGenerator`` after the searcher and overwrites its sample count with the
    saved one; here the budget set on this object (by the launcher, for ``--resume
    --num-samples``) wins, so a finished sweep can be continued with more trials.
    """

    def __init__(self, searcher: Searcher, num_samples: int) -> None:
        super().__init__(searcher)
        self.num_samples = num_samples

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self._total_samples = self.num_samples
        self._finished = False  # our searcher never ends a sweep itself; the count does

    @property
    def optuna(self) -> OptunaSearcher:
        """The OptunaSearcher under the concurrency limiter."""
        searcher = self.searcher
        while not isinstance(searcher, OptunaSearcher):
            searcher = searcher.searcher
        return searcher


def restored_search(tuner: Any) -> SweepGenerator | None:
    """The search algorithm a ``Tuner.restore``-d tuner will run, so ``--resume`` can adjust it.

    Ray keeps it in a private attribute (there is no public accessor); None when it is missing or
    the sweep was started with Ray's own ``OptunaSearch`` (before ifsearch had its own).
    """
    config = getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None)
    search = getattr(config, "search_alg", None)
    return search if isinstance(search, SweepGenerator) else None


def build_searcher(plan: SweepPlan, storage: str) -> Searcher:
    """The sweep's searcher with the chosen sampler; creates its study in ``storage``.

    ``plan.searcher_impl == "ray"`` builds Ray's stock ``OptunaSearch`` instead of
    ``OptunaSearcher``, with the same sampler, seed, space, warm start, study name and storage:
    the old behaviour (stopped trials told COMPLETE with their truncated value, intermediate
    values by ``training_iteration``), kept only so benchmarks/search_efficiency.py can measure
    what telling the truth is worth.
    """
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(
            seed=plan.seed, n_startup_trials=plan.space.searcher.get("n_startup_trials", 10)),
        "random": lambda: optuna.samplers.RandomSampler(seed=plan.seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=plan.seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=plan.seed),
    }
    metric, mode = plan.metric, plan.mode
    if plan.searcher == "nsga2":  # quality vs cost
        metric, mode = [plan.metric, "epoch_seconds"], [plan.mode, "min"]
    if plan.searcher_impl == "ray":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(
            space=plan.space.define_by_run, metric=metric, mode=mode,
            sampler=samplers[plan.searcher](), study_name=plan.name,
            storage=optuna.storages.RDBStorage(storage),
            points_to_evaluate=[plan.warm_start] if plan.warm_start else None,
        )
    return OptunaSearcher(
        space=plan.space.define_by_run, metric=metric, mode=mode,
        sampler=samplers[plan.searcher](), storage=storage, study_name=plan.name,
        max_epochs=plan.max_epochs,
        points_to_evaluate=[plan.warm_start] if plan.warm_start else None,
    )


def build_search_alg(plan: SweepPlan, storage: str,
                     max_concurrent: int) -> SweepGenerator | ConcurrencyLimiter:
    """What the Tuner gets as ``search_alg``: budget, then concurrency, then the searcher.

    Ray's ``OptunaSearch`` (``--searcher-impl ray``) gets Tune's own budget instead (Tune wraps
    the limiter in a ``SearchGenerator``), so a resume treats it as a sweep started before
    ifsearch had its own searcher (``restored_search`` is None).
    """
    limited = ConcurrencyLimiter(build_searcher(plan, storage), max_concurrent)
    if plan.searcher_impl == "ray":
        return limited
    return SweepGenerator(limited, plan.num_samples)


def build_scheduler(plan: SweepPlan):
    """Tune scheduler on the reported, monotonic ``epoch`` (training_iteration restarts).

    Its rungs compare ``plan.rung_metric`` (default: the objective), which may differ from the
    objective the searcher optimises: a metric that separates young trials (val_loss, AP25)
    lets ASHA stop some where the objective is still tied (Ray stops only values strictly below
    a rung's cutoff, so a rung of zeros stops nothing).
    """
    common = dict(time_attr="epoch", metric=plan.rung_metric, mode=plan.rung_mode)
    reduction = plan.space.scheduler.get("reduction_factor", 2)
    if plan.scheduler == "asha":
        return ASHAScheduler(max_t=plan.max_epochs, grace_period=plan.grace_period,
                             reduction_factor=reduction, **common)
    if plan.scheduler == "hyperband":
        return HyperBandScheduler(max_t=plan.max_epochs, reduction_factor=reduction, **common)
    if plan.scheduler == "median":
        return MedianStoppingRule(grace_period=plan.grace_period, **common)
    return FIFOScheduler()

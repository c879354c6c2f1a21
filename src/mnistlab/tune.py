"""Hyperparameter search on Optuna: what Keras Tuner does, resumable and shared by many workers.

Reading order: the search space (a small TOML/dict, parsed and checked before anything runs) ->
TuneSettings (what defines a search; stored in the study itself, so every worker runs the same
one) -> search (the study, the objective that trains one trial with `train.fit`, pruning per
epoch, live lines) -> the results in the tune folder (trials.csv, best.json, plots) ->
best_config (what `mnistlab train --from-tune` trains).

The study lives in an Optuna RDB storage: `TUNE/study.db` (SQLite) by default, or any URL
(PostgreSQL) given with --storage, which is how several processes or machines share a search.
Trials validate on a split of the training set and never evaluate the test set.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import sys
import time
import tomllib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import models
from .callbacks import Callback
from .config import RECIPES, TrainConfig, _coerce
from .errors import MnistlabError
from .runfiles import atomic_path, write_csv, write_json

SETTINGS_FILE = "tune.json"
STUDY_FILE = "study.db"
OBJECTIVES = {"val_accuracy": "maximize", "val_loss": "minimize"}
SAMPLERS = ("random", "tpe")
PRUNERS = ("hyperband", "halving", "median", "none")
# Heartbeats let a worker see that another one died mid-trial (on any machine): a RUNNING trial
# silent for GRACE_S seconds is failed and queued again with the same hyperparameters.
HEARTBEAT_S, GRACE_S = 10, 30

# TrainConfig settings a search may vary. The rest stay fixed: the model (hyperparameters belong
# to one model), the data, the epoch budget, the validation split and the engine settings.
TUNABLE = ("batch_size", "optimizer", "lr", "lr_schedule", "label_smoothing", "ema",
           "reduce_lr_factor", "reduce_lr_patience", "early_stopping_patience",
           "rotation_range", "width_shift_range", "height_shift_range", "zoom_range", "horizontal_flip",
           "elastic_alpha", "elastic_sigma")
# `augment` = s sets all four augmentation ranges to s times the seed002 tutorial's (rotation 10
# degrees, shifts and zoom 0.1): one strength to search instead of four correlated settings.
AUGMENT = {"rotation_range": 10.0, "width_shift_range": 0.1, "height_shift_range": 0.1, "zoom_range": 0.1}
MAX_AUGMENT = 5.0  # zoom 0.5 and 50-degree rotations: far beyond what helps 28x28 images


# --- Search spaces --------------------------------------------------------------------------

def _int_range(allowed: range) -> dict:
    return {"int": [allowed.start, allowed.stop - 1], "step": allowed.step}


def _builtin_spaces() -> dict[str, dict]:
    space = models.SEED001_SPACE
    return {
        # The Keras Tuner tutorial: its model's five hyperparameters and Adam's learning rate
        # (hp.Choice 1e-2 or 1e-3), on top of the seed001 recipe (Adam, batch 32, 10% validation).
        "seed001": {"recipe": "seed001", "search": {
            **{name: _int_range(allowed) if isinstance(allowed, range) else {"choice": list(allowed)}
               for name, allowed in space.items()},
            "lr": {"choice": [1e-2, 1e-3]}}},
    }


SPACES = _builtin_spaces()


@dataclass(frozen=True)
class Distribution:
    """One searched value: an int range with a step, a float range (log-uniform with log), or choices."""
    kind: str                       # int | float | choice
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial, name: str):
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def values(self) -> list:
        """Every value it can give (int, choice), or its two ends (float)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return list(range(self.low, self.high + 1, self.step or 1))
        return [self.low, self.high]


@dataclass
class Space:
    fixed: dict                     # TrainConfig settings the space sets (recipe first)
    search: dict[str, Distribution]
    source: str                     # where it came from, for messages


SYNTAX = "write {int = [low, high], step = 1}, {float = [low, high], log = true} or {choice = [a, b]}"


def _number(value, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integer else isinstance(value, (int, float))


def parse_distribution(name: str, table, where: str) -> Distribution:
    """A space's `name = {int = [32, 128], step = 16}` entry, checked: one clear error per mistake."""
    if not isinstance(table, dict):
        raise MnistlabError(f"{where}: {name} = {table!r} is not a distribution; {SYNTAX}")
    kinds = [k for k in table if k in ("int", "float", "choice")]
    if len(kinds) != 1:
        raise MnistlabError(f"{where}: {name} has unknown distribution {', '.join(map(repr, table)) or '{}'}; {SYNTAX}")
    kind = kinds[0]
    options = {"int": {"step", "log"}, "float": {"step", "log"}, "choice": set()}[kind]
    extra = set(table) - {kind} - options
    if extra:
        raise MnistlabError(f"{where}: {name}: unknown option {', '.join(sorted(extra))} for {kind}; "
                            f"{kind} takes {', '.join(sorted(options)) or 'no options'}")
    if kind == "choice":
        choices = table["choice"]
        if not isinstance(choices, list) or not choices:
            raise MnistlabError(f"{where}: {name}: choice needs a non-empty list, e.g. {{choice = [3, 5]}}")
        return Distribution("choice", choices=tuple(choices))
    bounds, integer = table[kind], kind == "int"
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(_number(b, integer) for b in bounds)):
        raise MnistlabError(f"{where}: {name}: {kind} needs [low, high] as two {'integers' if integer else 'numbers'}, "
                            f"got {bounds!r}")
    low, high = bounds
    step, log = table.get("step"), table.get("log", False)
    if low > high:
        raise MnistlabError(f"{where}: {name}: low {low} is above high {high}; write [{high}, {low}]")
    if low == high:
        raise MnistlabError(f"{where}: {name}: the range [{low}, {high}] is empty; "
                            f"to fix the value, set {name} = {low} outside [search]")
    if not isinstance(log, bool):
        raise MnistlabError(f"{where}: {name}: log must be true or false")
    if step is not None and not (_number(step, integer) and step > 0):
        raise MnistlabError(f"{where}: {name}: step {step!r} must be a positive {'integer' if integer else 'number'}")
    if log and low <= 0:
        raise MnistlabError(f"{where}: {name}: a log range needs low > 0, got {low}")
    if log and step not in (None, 1):
        raise MnistlabError(f"{where}: {name}: a log range takes no step")
    if integer and step and (high - low) % step:
        raise MnistlabError(f"{where}: {name}: [{low}, {high}] is not a whole number of steps of {step}; "
                            f"end it at {high - (high - low) % step}")
    return Distribution(kind, low, high, step, log)


def parse_space(raw: dict, source: str) -> Space:
    """A space as a dict (a TOML file's content): fixed settings, and a [search] table."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    fixed, search = {}, raw.get("search")
    for key, value in raw.items():
        name = key.replace("-", "_")
        if key == "search":
            continue
        if name not in known:
            raise MnistlabError(f"space {source}: unknown setting {key!r}; a space holds settings of "
                                "`mnistlab train --help` and a [search] table")
        fixed[name] = _coerce(name, value, f"space {source}")
    if fixed.get("recipe") and fixed["recipe"] not in RECIPES:
        raise MnistlabError(f"space {source}: unknown recipe {fixed['recipe']!r}; choose one of: {', '.join(RECIPES)}")
    if not isinstance(search, dict) or not search:
        raise MnistlabError(f"space {source} has no [search] table; add e.g. [search] lr = {{float = [1e-4, 1e-2], log = true}}")
    where = f"space {source}"
    return Space(fixed, {name.replace("-", "_"): parse_distribution(name, table, where)
                         for name, table in search.items()}, source)


def load_space(spec: str | Path | dict) -> tuple[dict, str]:
    """(the raw space, its name): a built-in name, a TOML file, or a dict."""
    if isinstance(spec, dict):
        return spec, "(dict)"
    if str(spec) in SPACES:
        return SPACES[str(spec)], str(spec)
    path = Path(spec)
    if not path.is_file():
        raise MnistlabError(f"space {spec!r} is neither a built-in space ({', '.join(SPACES)}) nor a TOML file")
    try:
        return tomllib.loads(path.read_text()), str(path)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise MnistlabError(f"space {path} is not valid TOML ({err}); fix the line it names") from None


def check_space(space: Space, base: TrainConfig) -> None:
    """Every value the space can give must be one the model or the setting accepts: found now,
    not after an hour of trials."""
    spec = models.get_spec(base.model)
    where = f"space {space.source}"
    if "augment" in space.search and set(AUGMENT) & set(space.search):
        raise MnistlabError(f"{where}: search either augment (all four ranges) or the ranges themselves, not both")
    for name, dist in space.search.items():
        values = dist.values()
        if name in spec.defaults:
            allowed = spec.space.get(name)
            default = spec.defaults[name]
            if isinstance(default, int) and dist.kind == "float":
                raise MnistlabError(f"{where}: {base.model} {name} is an integer; use {{int = [...]}} or {{choice = [...]}}")
            outside = [v for v in values if allowed is not None and v not in allowed]
            if outside:
                raise MnistlabError(f"{where}: {name} value {outside[0]} is outside {base.model}'s space "
                                    f"({models.describe_space(allowed)}); narrow the range")
        elif name == "augment":
            if any(not _number(v, False) or not 0 <= v <= MAX_AUGMENT for v in values):
                raise MnistlabError(f"{where}: augment is a strength from 0 to {MAX_AUGMENT:g} (1 = the seed002 "
                                    "tutorial's rotation 10, shifts and zoom 0.1)")
        elif name in TUNABLE:
            for value in values:
                try:
                    dataclasses.replace(base, **{name: _coerce(name, value, where)}).validate()
                except MnistlabError as err:
                    raise MnistlabError(f"{where}: {name} = {value!r}: {err}") from None
        elif name in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise MnistlabError(f"{where}: {name} stays fixed during a search; set it outside [search] "
                                f"(searchable settings: {', '.join(TUNABLE)}, augment)")
        else:
            hparams = ", ".join(spec.defaults) or "none"
            raise MnistlabError(f"{where}: unknown search key {name!r}; search a hyperparameter of {base.model} "
                                f"({hparams}), augment, or one of: {', '.join(TUNABLE)}")


def trial_config(base: TrainConfig, params: dict) -> TrainConfig:
    """The TrainConfig of one trial: the base settings with the sampled values put in place."""
    spec = models.get_spec(base.model)
    hparams, settings = dict(base.hparams), {}
    for name, value in params.items():
        if name in spec.defaults:
            hparams[name] = value
        elif name == "augment":
            settings.update({key: scale * value for key, scale in AUGMENT.items()})
        else:
            settings[name] = _coerce(name, value, "trial")
    return dataclasses.replace(base, hparams=hparams, **settings)


# --- What defines a search ------------------------------------------------------------------

@dataclass
class TuneSettings:
    """One search; stored in the study, so every worker (and --resume) runs exactly this."""
    space: dict                      # the raw space (fixed settings + [search])
    config: dict                     # the resolved base TrainConfig of every trial (threads 0)
    trials: int = 20                 # finished trials (complete or pruned) the study should reach
    sampler: str = "tpe"
    pruner: str = "hyperband"
    objective: str = "val_accuracy"
    study_name: str = "mnistlab"
    space_name: str = ""

    def base(self) -> TrainConfig:
        return TrainConfig(**self.config)

    def parsed_space(self) -> Space:
        return parse_space(self.space, self.space_name)

    def same_search(self, other: "TuneSettings") -> bool:
        """Workers may differ in how many trials they ask for; nothing else."""
        return {**asdict(self), "trials": 0} == {**asdict(other), "trials": 0}


def make_settings(space: str | Path | dict, overrides: dict | None = None, trials: int = 20, sampler: str = "tpe",
                  pruner: str = "hyperband", objective: str = "val_accuracy", study_name: str = "mnistlab") -> TuneSettings:
    """Check everything a search needs before it starts: defaults < recipe < space < overrides."""
    raw, space_name = load_space(space)
    parsed = parse_space(raw, space_name)
    overrides = {k: v for k, v in (overrides or {}).items() if k != "threads"}
    fixed_names = set(overrides) | set(overrides.get("hparams", {})) | set(parsed.fixed.get("hparams", {}))
    clash = sorted(fixed_names & (set(parsed.search) | (set(AUGMENT) if "augment" in parsed.search else set())))
    if clash:
        raise MnistlabError(f"{', '.join(clash)} is searched by space {space_name}; drop the flag or the [search] entry")
    recipe = overrides.get("recipe") or parsed.fixed.get("recipe", "")
    base = TrainConfig(**{**RECIPES.get(recipe, {}), **parsed.fixed, **overrides, "recipe": recipe, "threads": 0})
    base.validate()
    checks = [(trials >= 1, f"--trials {trials} must be at least 1"),
              (sampler in SAMPLERS, f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}"),
              (pruner in PRUNERS, f"unknown pruner {pruner!r}; choose one of: {', '.join(PRUNERS)}"),
              (objective in OBJECTIVES, f"unknown objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}"),
              (base.val_data == "split" and base.val_split > 0,
               "a search validates on a split of the training set and never on the test set; "
               "set --val-split above 0 and --val-data split")]
    for ok, message in checks:
        if not ok:
            raise MnistlabError(message)
    check_space(parsed, base)
    models.create_model(base.model, **base.hparams)  # fixed hyperparameters outside the model's space fail now
    return TuneSettings(json.loads(json.dumps(raw)), asdict(base), trials, sampler, pruner, objective,
                        study_name, space_name)


# --- The study ----------------------------------------------------------------------------------

def _optuna():
    try:
        import optuna
    except ImportError:
        raise MnistlabError("tuning needs Optuna: pip install -e '.[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial replaces its log
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def storage_url(folder: Path, storage: str | None) -> str:
    return storage or f"sqlite:///{(Path(folder) / STUDY_FILE).resolve()}"


def open_storage(url: str):
    """An RDB storage with heartbeats; opening is retried because workers started together race
    to create the tables."""
    optuna = _optuna()
    import sqlalchemy.exc
    # SQLite: wait for another worker's write instead of failing with "database is locked".
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
        except ImportError as err:
            raise MnistlabError(f"no database driver for {_safe_url(url)} ({err.__cause__ or err}); for "
                                "PostgreSQL: pip install -e '.[tune]' (psycopg)") from None
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as err:
            if attempt == 4 or "could not connect" in str(err) or "unable to open" in str(err):
                first = str(err.orig if getattr(err, "orig", None) else err).strip().splitlines()[0]
                raise MnistlabError(f"cannot open the study storage {_safe_url(url)} ({first}); "
                                    "check --storage and that the database server runs") from None
            time.sleep(0.2 + random.random())
        except sqlalchemy.exc.ArgumentError as err:
            raise MnistlabError(f"--storage {_safe_url(url)} is not a database URL ({err}); "
                                "e.g. postgresql://user@host/db or sqlite:///path.db") from None


def _safe_url(url: str) -> str:
    """The URL without its password, for messages and tune.json."""
    try:
        from sqlalchemy.engine import make_url
        parsed = make_url(url)
        return parsed.set(password=None).render_as_string(hide_password=False) if parsed.password else url
    except Exception:  # not a URL at all: say so where it is used
        return url


def make_sampler(settings: TuneSettings, seed: int):
    optuna = _optuna()
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # TPE models the good and bad trials once a third of the budget (at least 2, at most Optuna's
    # default 10) was sampled at random: with a 10-trial budget a 10-trial start would be random search.
    startup = min(10, max(2, settings.trials // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def make_pruner(settings: TuneSettings):
    optuna, epochs = _optuna(), settings.config["epochs"]
    if settings.pruner == "hyperband":  # brackets of successive halving, rungs at 1, 3, 9 ... epochs
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if settings.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2)
    return optuna.pruners.NopPruner()


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def finished(trial) -> bool:
    """Counts towards --trials: complete, pruned, or failed by its own settings (a diverging loss);
    not a trial whose worker was killed or interrupted (it is queued again)."""
    state = trial.state.name
    return state in ("COMPLETE", "PRUNED") or (state == "FAIL" and "error" in trial.user_attrs)


class TrialFailed(Exception):
    """The trial's own settings failed it (e.g. the loss diverged): record it, go on searching."""


class Surplus(Exception):
    """Other workers already run or finished the requested number of trials."""


class ReportToTrial(Callback):
    """Report the validation metric to Optuna after every epoch; stop the run when the pruner
    says the trial cannot catch up."""

    def __init__(self, trial, monitor: str):
        self.trial, self.monitor, self.pruned_epoch = trial, monitor, 0

    def on_epoch_end(self, epoch, logs, loop):
        self.trial.report(logs[self.monitor], epoch + 1)
        if self.trial.should_prune():
            self.pruned_epoch, loop.stop_training = epoch + 1, True


@dataclass
class TuneResult:
    study: object                    # optuna.Study
    out: Path
    best: dict | None                # best.json's content


def _load_or_create_study(settings: TuneSettings, storage):
    """Join the study if it exists (same settings only), else create it. Returns (study, created)."""
    optuna = _optuna()
    names = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    created = settings.study_name not in names
    study = optuna.create_study(storage=storage, study_name=settings.study_name,
                                direction=OBJECTIVES[settings.objective], load_if_exists=True)
    stored = study.user_attrs.get("mnistlab")
    if stored is None:
        study.set_user_attr("mnistlab", asdict(settings))
    elif not settings.same_search(TuneSettings(**stored)):
        raise MnistlabError(f"study {settings.study_name!r} in this storage was started with other settings; "
                            "join it with `mnistlab tune --resume TUNE`, or pick another --out or --study-name")
    return study, created


def reclaim_orphans(study, storage) -> list[int]:
    """Fail and queue again the RUNNING trials of workers on this machine that no longer exist
    (killed): a resume right after a kill need not wait for the heartbeat's grace period."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState
    host, reclaimed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = trial.user_attrs.get("worker", "").rpartition(":")
        if worker_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # another worker reclaimed it first
            continue
        storage.get_heartbeat_stale_trial_callback()(study, storage.get_trial(trial._trial_id))
        reclaimed.append(trial.number)
    return reclaimed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def search(settings: TuneSettings, out: Path | str, storage: str | None = None, data_dir: Path | str | None = None,
           threads: int = 0, progress: bool = True) -> TuneResult:
    """Run trials of the study until it holds `settings.trials` finished trials (counting every
    worker's), print a line per trial, write the results into `out`. Joins the study when it
    exists: run it again in another process (or machine, with a shared --storage) to add a worker."""
    optuna, out = _optuna(), Path(out)
    from . import data
    from .train import Diverged, Interrupted, fit
    space, base, monitor = settings.parsed_space(), settings.base(), settings.objective
    data.load(base.dataset, "train", data_dir)  # missing data fails here, not in every trial
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)  # the default SQLite file lives in it
    url = storage_url(out, storage)
    db = open_storage(url)
    out.mkdir(parents=True, exist_ok=True)
    study, created = _load_or_create_study(settings, db)
    write_json(out / SETTINGS_FILE, {"settings": asdict(settings), "storage": _safe_url(storage) if storage else None,
                                     "study_name": settings.study_name})
    n_existing = len(study.get_trials(deepcopy=False))
    # A fresh study samples reproducibly from --seed; a worker joining (or resuming) one mixes in
    # how far it got and its pid, so two workers never draw the same sequence of hyperparameters.
    seed = int(np.random.SeedSequence([base.seed, n_existing, 0 if created else os.getpid()]).generate_state(1)[0])
    study.sampler, study.pruner = make_sampler(settings, seed), make_pruner(settings)
    say = (lambda message: print(message, flush=True)) if progress else (lambda message: None)
    reclaimed = reclaim_orphans(study, db)
    done = sum(finished(t) for t in study.get_trials(deepcopy=False))
    say(f"study {settings.study_name!r} in {_safe_url(url)}: {done} of {settings.trials} trials finished"
        f"{f', queued again after a kill: {reclaimed}' if reclaimed else ''}; sampler {settings.sampler}, "
        f"pruner {settings.pruner}, objective {monitor} ({OBJECTIVES[monitor][:3]}), {base.epochs} epochs per trial, "
        f"worker {worker_id()}")

    def objective(trial):
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
        if sum(finished(t) or t.state.name == "RUNNING" for t in earlier) >= settings.trials:
            trial.set_user_attr("surplus", True)
            study.stop()
            raise Surplus()
        trial.set_user_attr("worker", worker_id())
        trial.set_user_attr("threads", threads)  # `train --from-tune` uses the same count: same sums
        params = {name: dist.suggest(trial, name) for name, dist in space.search.items()}
        config = trial_config(base, params)
        if threads:
            config = dataclasses.replace(config, threads=threads)
        reporter = ReportToTrial(trial, monitor)
        try:
            result = fit(config, data_dir=data_dir, progress=False, callbacks=[reporter], evaluate_test=False)
        except Diverged as err:
            trial.set_user_attr("error", str(err))
            raise TrialFailed(str(err)) from None
        except (MnistlabError, KeyboardInterrupt):  # not the trial's fault: it runs again on resume
            trial.set_user_attr("interrupted", True)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            raise
        trial.set_user_attr("train_seconds", round(result.train_seconds, 3))
        if reporter.pruned_epoch:
            raise optuna.TrialPruned(f"at epoch {reporter.pruned_epoch}")
        return result.history[-1][monitor]

    def after_trial(study, trial):
        if trial.user_attrs.get("surplus"):
            return
        say(format_trial(trial, study, monitor))
        write_results(study, out, settings, plots=False)
        if sum(finished(t) for t in study.get_trials(deepcopy=False)) >= settings.trials:
            study.stop()

    try:
        if done < settings.trials:
            study.optimize(objective, callbacks=[after_trial], catch=(TrialFailed, Surplus), gc_after_trial=False)
    except (Interrupted, KeyboardInterrupt):
        write_results(study, out, settings, plots=False)
        raise Interrupted(f"search interrupted; the trial that was running is queued again: "
                          f"continue with mnistlab tune --resume {out}") from None
    best = write_results(study, out, settings)
    if best:
        say(f"best: trial {best['trial']}, {monitor} {best['value']:.4f}, {format_params(best['params'])} "
            f"-> {out / 'best.json'}; train it with: mnistlab train --from-tune {out}")
    return TuneResult(study, out, best)


def resume(out: Path | str, trials: int | None = None, storage: str | None = None, **kwargs) -> TuneResult:
    """Continue (or join) the search of a tune folder with its own settings; `trials` raises the target."""
    out = Path(out)
    path = out / SETTINGS_FILE
    if not path.is_file():
        raise MnistlabError(f"{out} has no {SETTINGS_FILE}; point --resume at a folder written by `mnistlab tune`")
    stored = json.loads(path.read_text())
    settings = TuneSettings(**stored["settings"])
    if trials is not None:
        settings.trials = trials
    return search(settings, out, storage or stored.get("storage"), **kwargs)


# --- Results ------------------------------------------------------------------------------------

def format_params(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def format_trial(trial, study, monitor: str) -> str:
    """The live line: number, outcome, metric, epochs, seconds, parameters, and the best so far."""
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    epochs = len(trial.intermediate_values)
    value = trial.intermediate_values[max(trial.intermediate_values)] if epochs else None
    state = {"COMPLETE": "complete", "PRUNED": f"pruned at epoch {epochs}", "FAIL": "failed"}.get(trial.state.name,
                                                                                               trial.state.name.lower())
    metric = f"{monitor} {value:.4f}" if value is not None else f"{monitor} -"
    line = f"trial {trial.number:>3} {state:<18} {metric}  {epochs} epoch{'s' * (epochs != 1)}  {seconds:6.1f}s  " \
           f"{format_params(trial.params)}"
    if "error" in trial.user_attrs:
        line += f"  ({trial.user_attrs['error']})"
    try:
        best = study.best_trial
        line += f"  | best: trial {best.number} {best.value:.4f}"
    except ValueError:  # no complete trial yet
        pass
    return line


def trial_rows(study, settings: TuneSettings) -> list[dict]:
    names = list(settings.parsed_space().search)
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        epochs = len(t.intermediate_values)
        last = t.intermediate_values[max(t.intermediate_values)] if epochs else ""
        rows.append({"trial": t.number, "state": t.state.name, settings.objective: last, "epochs": epochs,
                     "seconds": round(t.duration.total_seconds(), 2) if t.duration else "",
                     **{name: t.params.get(name, "") for name in names},
                     "worker": t.user_attrs.get("worker", ""), "retry_of": t.user_attrs.get("retry_of", ""),
                     "error": t.user_attrs.get("error", "")})
    return rows


def write_results(study, out: Path, settings: TuneSettings, plots: bool = True) -> dict | None:
    """trials.csv, best.json and (plots) optimisation history, learning curves and importance."""
    write_csv(out / "trials.csv", trial_rows(study, settings))
    try:
        best_trial = study.best_trial
    except ValueError:
        return None
    config = dataclasses.replace(trial_config(settings.base(), best_trial.params),
                                 threads=best_trial.user_attrs.get("threads", 0))
    best = {"trial": best_trial.number, "objective": settings.objective, "value": best_trial.value,
            "params": best_trial.params, "config": asdict(config)}
    write_json(out / "best.json", best)
    if plots:
        write_plots(study, out)
    return best


def write_plots(study, out: Path) -> list[Path]:
    """history.png (objective per trial and best so far), curves.png (the metric per epoch of every
    trial, where pruning shows), importance.png (PED-ANOVA: Optuna's default evaluator, which needs
    no scikit-learn, unlike fANOVA; it needs a few complete trials)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    optuna = _optuna()
    from optuna.importance import PedAnovaImportanceEvaluator
    vis = optuna.visualization.matplotlib
    written = []
    plots = {"history.png": lambda: vis.plot_optimization_history(study),
             "curves.png": lambda: vis.plot_intermediate_values(study),
             "importance.png": lambda: vis.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator())}
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    for name, draw in plots.items():
        if name == "importance.png" and len(complete) < 3:
            continue  # an importance from one or two trials would be noise
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                axes = draw()
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                print(f"mnistlab: no {name} ({err})", file=sys.stderr)
                continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        with atomic_path(out / name) as tmp:
            figure.savefig(tmp, dpi=100, format="png")
        plt.close(figure)
        written.append(out / name)
    return written


def best_config(out: Path | str) -> TrainConfig:
    """The TrainConfig of the search's best trial (its best.json): the same data, split, seed and
    epochs, so training it again reproduces the trial's validation figures."""
    path = Path(out) / "best.json"
    if not path.is_file():
        raise MnistlabError(f"{out} has no best.json: no trial of that search completed yet; "
                            f"run mnistlab tune --resume {out}")
    stored = json.loads(path.read_text())["config"]
    return TrainConfig(**{f.name: stored[f.name] for f in dataclasses.fields(TrainConfig) if f.name in stored})

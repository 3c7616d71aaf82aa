"""A hyperparameter study (--hpo_trials N): N trials, each a normal run of the same engine in
output_dir/trials/trial_<n>/, sampled by Optuna (TPE), stopped early by a pruner at the evaluations the
loop already makes, stored in an Optuna storage so that the same command continues it.

    run_study
      resolve_space            the --hpo_space file or the task's default space     (search_space.py)
      preflight                the command's own run prepared (data, model, metric): bad input stops here
      open_study               output_dir checked; the storage (sqlite in output_dir by default) opened or
                               created; a study with other settings refused
      run_workers | work       K worker processes of this command, or the trials here:
        claim                  interrupted trials of dead processes marked and re-queued, then one trial
                               asked for, unless the study has its N (a surplus one is dropped)
        run_trial              run_single (or run_all for --kfold) with the trial's settings; pruning from
                               Trainer.on_evaluate; a NaN or out-of-memory trial is marked failed
      report                   trials.csv, best.yaml, the plots, summary.json, the closing block
      confirm                  --hpo_confirm_seeds: the best and the default settings over N seeds (repeats.py)

Every process of a multi-process trial goes through the same trials: the main process talks to the
storage and broadcasts what it decided (the trial, whether to prune).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Any, Optional

from .. import progress
from ..config import TrainArguments, to_jsonable
from ..errors import Diverged, UserError
from ..log import logger
from ..task import Context
from ..training.checkpoint import list_checkpoints
from ..training.metrics import greater_is_better
from . import plots, reporting, search_space
from .plan import plan_runs
from .repeats import holds_other_job, run_all
from .single_run import prepare_run, run_single

STUDY_DB = "study.db"
MARKER = "study.json"          # output_dir holds a study: where it is stored and under which name
TRIALS_DIR = "trials"
TRIALS_CSV = "trials.csv"
BEST_YAML = "best.yaml"
SUMMARY = "summary.json"
CONFIRM_DIR = "confirm"
WORKER_ENV = "BERT_FINETUNE_HPO_WORKER"   # set in the processes of --hpo_workers K: run trials, no report
EVALS_PER_EPOCH = 3                       # trials evaluate this often unless the command sets --eval_steps
# Settings that may differ between invocations of one study (the rest must match the study's).
FREE = {"output_dir", "overwrite_output_dir", "hpo_trials", "hpo_workers", "hpo_confirm_seeds", "progress",
        "report_to", "dataloader_num_workers", "preprocessing_num_workers", "overwrite_cache", "cache_dir",
        "ddp_timeout"}


class Pruned(Exception):
    """Raised from Trainer.on_evaluate (or after a fold) when the pruner stops the trial."""

    def __init__(self, epoch: float, value: float):
        super().__init__(f"pruned at epoch {epoch:.2f}")
        self.epoch, self.value = epoch, value


@dataclasses.dataclass
class StudyPlan:
    """What every process knows about the study (broadcast once)."""
    metric: str
    greater: bool
    train_examples: int
    space: list
    min_resource: int            # the pruner's first rung: the first evaluation, or the first fold
    kfold: int = 0               # k-fold trials report after each fold, not at evaluations


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------

def run_study(task, model_args, data_args, args: TrainArguments, runtime, given: set,
              argv: Optional[list] = None) -> dict:
    """Run (or continue) the study; returns summary.json as a dict ({} in a --hpo_workers worker process)."""
    acc = runtime.accelerator
    worker = os.environ.get(WORKER_ENV)
    if args.hpo_workers > 1 and acc.num_processes > 1:
        raise UserError("--hpo_workers runs several single-process trials at once; with a multi-process launch "
                        "each trial already uses every process: drop --hpo_workers, or start several launches "
                        "with the same --hpo_storage.")
    space, notes = search_space.resolve_space(task.name, args, given)
    started = time.perf_counter()
    plan = preflight(task, model_args, data_args, args, runtime, space)
    settings = {k: v for k, v in to_jsonable(model_args, data_args, args).items() if k not in FREE}
    opened = [None, None]
    if acc.is_main_process:
        try:
            opened = ["ok", open_study(args, plan, settings, fresh_folder=worker is None)]
        except UserError as err:
            opened = ["error", str(err)]
    opened = _broadcast(opened)
    if opened[0] == "error":
        raise UserError(opened[1])
    if worker is None:
        logger.info("hyperparameter study: %d trials of %s (%s the %s), %s sampler, %s pruning, storage %s%s",
                    args.hpo_trials, task.name, "maximising" if plan.greater else "minimising", plan.metric,
                    args.hpo_sampler, args.hpo_pruner, storage_url(args), opened[1].get("note", ""))
        logger.info("search space: %s", "; ".join(p.describe() for p in space if p.kind != "fixed"))
        for note in notes:
            logger.info("search space: %s", note)
    if worker is None and args.hpo_workers > 1:
        run_workers(args, plan, argv, _script_file(task))
    else:
        work(task, model_args, data_args, args, runtime, plan, worker)
    if worker is not None:
        return {}
    return report(task, model_args, data_args, args, runtime, plan, time.perf_counter() - started)


def _broadcast(value: list) -> list:
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list(list(value))


def preflight(task, model_args, data_args, args, runtime, space) -> StudyPlan:
    """The command's own run prepared (tokenizer, data, model, objective) before anything is written: a bad
    column, file or metric stops the study here, in one sentence. Its tokenized data stays in the cache, so
    the trials do not tokenize again."""
    ctx = Context(model_args, data_args, trial_args(args, {}, args.output_dir, None, 0), runtime)
    with progress.phase("checking the command's data and model before the first trial"):
        inputs = prepare_run(task, ctx)
    if inputs.data.eval is None:
        raise UserError("a study scores every trial on validation data, and there is none: pass --validation_file "
                        "or --validation_split > 0 (never a test split).")
    metric = args.metric_for_best_model or inputs.objective.default_metric
    greater = args.greater_is_better if args.greater_is_better is not None else greater_is_better(metric)
    n = len(inputs.data.train)
    if args.kfold >= 2:  # each fold trains on (k-1)/k of the data
        n = n * (args.kfold - 1) // args.kfold
    del inputs
    runtime.accelerator.free_memory()  # gc.collect() and the device's cache
    # A trial reports its k-th evaluation as step k (a k-fold trial: the running mean over its folds after fold k),
    # so trials of any batch size line up step by step (the median rule compares equal steps); the pruner's
    # first rung is the first evaluation (fold).
    return StudyPlan(metric, greater, n, space, 1, args.kfold if args.kfold >= 2 else 0)


def steps_per_epoch(args, examples: int, processes: int) -> int:
    batches = math.ceil(examples / (args.per_device_train_batch_size * processes))
    return max(1, math.ceil(batches / args.gradient_accumulation_steps))


def trial_args(args: TrainArguments, params: dict, output_dir: str, resume: Optional[str], examples: int,
               processes: int = 1) -> TrainArguments:
    """A trial's settings: the command's, the trial's values, its folder, no study settings. Unless the command
    sets --eval_steps, a trial evaluates EVALS_PER_EPOCH times per epoch, so the pruner can stop it early. A k-fold
    trial is pruned between folds: its folds keep the command's evaluations, and a re-run of it continues its
    folds (repeats.run_all skips the finished ones) rather than clearing them."""
    study_defaults = {f.name: f.default for f in dataclasses.fields(TrainArguments) if f.name.startswith("hpo_")}
    out = search_space.apply(args, params)
    # No trial touches a test split (a study is scored on the validation data; --hpo_confirm_seeds runs with the
    # command's own --do_predict).
    changes: dict[str, Any] = dict(study_defaults, output_dir=output_dir, overwrite_output_dir=args.kfold < 2,
                                   resume_from_checkpoint=resume, do_predict=False)
    if examples and out.eval_strategy == "epoch" and args.kfold < 2:
        changes.update(eval_strategy="steps",
                       eval_steps=max(1, round(steps_per_epoch(out, examples, processes) / EVALS_PER_EPOCH)))
    return dataclasses.replace(out, **changes)


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------

def storage_url(args) -> str:
    if args.hpo_storage:
        return args.hpo_storage
    return "sqlite:///" + os.path.abspath(os.path.join(args.output_dir, STUDY_DB))


def _local_file(url: str) -> Optional[str]:
    """The file of a sqlite or journal storage (for a lock next to it), else None."""
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///"):]
    if url.startswith("journal:"):
        return url[len("journal:"):]
    return None


def make_storage(url: str):
    import optuna

    _silence_optuna()  # the heartbeat arguments are "experimental" to Optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = url[len("journal:"):]
        if not path:
            raise UserError("--hpo_storage journal:PATH needs a file path, e.g. journal:/shared/study.log.")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    if "://" not in url:
        raise UserError(f"--hpo_storage '{url}' is not a storage URL: use sqlite:///PATH, postgresql://..., "
                        "mysql://... or journal:PATH.")
    kwargs: dict = {"heartbeat_interval": 60, "grace_period": 180}  # a trial of a dead machine is failed, re-run
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}  # several workers on one file
        folder = os.path.dirname(os.path.abspath(url[len("sqlite:///"):]))
        os.makedirs(folder, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url, **kwargs)
    except Exception as err:  # noqa: BLE001 - a driver missing, a server unreachable, a bad URL
        raise UserError(f"--hpo_storage '{url}' cannot be opened ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]}); check the URL, the server and its Python driver.") \
            from None


@contextlib.contextmanager
def storage_lock(url: str):
    """An exclusive lock next to a local storage file, so that claiming a trial is atomic between the workers
    of one machine. Remote storages have none: a trial claimed past N is dropped (claim)."""
    path = _local_file(url)
    if path is None:
        yield
        return
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _silence_optuna() -> None:
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*reported.*already.*", category=UserWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used", category=UserWarning)


def open_study(args, plan: StudyPlan, settings: dict, fresh_folder: bool) -> dict:
    """Check output_dir (a study of this command continues; anything else is refused unless
    --overwrite_output_dir) and create or load the study; nothing is written in output_dir before the study's
    settings are found to be this command's. Main process."""
    import optuna

    _silence_optuna()
    url, out = storage_url(args), args.output_dir
    marker_path = os.path.join(out, MARKER)
    marker = {"storage": url, "study_name": args.hpo_study_name}
    note = ""
    replace = False
    if fresh_folder:
        reporting.check_output_dir(out, True, None)  # file/permission/disk checks
        if os.path.isdir(out) and os.listdir(out):
            old = _load_json(marker_path)
            if args.overwrite_output_dir:
                replace = True
            elif old is None:
                raise UserError(f"--output_dir '{out}' is not empty and holds no study; pass --overwrite_output_dir "
                                "to replace it, or choose another folder.")
            elif old != marker:
                raise UserError(f"--output_dir '{out}' holds the study '{old.get('study_name')}' in "
                                f"{old.get('storage')}; rerun with those --hpo_storage/--hpo_study_name to continue "
                                "it, pass --overwrite_output_dir to replace it, or choose another folder.")
    if replace and not args.hpo_storage:  # the default storage is a file in the folder: cleared with it
        reporting.clear_folder(out)
    storage = make_storage(url)  # a bad URL, server or driver is refused before anything is written
    if replace and args.hpo_storage:  # the study lives elsewhere: replaced too
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=args.hpo_study_name, storage=storage)
        reporting.clear_folder(out)
    space = {p.name: p.as_dict() for p in plan.space}
    with storage_lock(url):  # several launches started at once create one storage and its study once
        study = optuna.create_study(storage=storage, study_name=args.hpo_study_name, load_if_exists=True,
                                    direction="maximize" if plan.greater else "minimize")
        stored = study.user_attrs.get("settings")
        if stored is None:
            study.set_user_attr("settings", settings)
            study.set_user_attr("metric", plan.metric)
            study.set_user_attr("space", space)
    if stored is not None:
        changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        if study.user_attrs.get("space") != json.loads(json.dumps(space)):
            changed.append("the --hpo_space file's contents")  # the same path, the file edited since
        if changed:
            raise UserError(f"the study '{args.hpo_study_name}' in {url} was started with other settings "
                            f"({', '.join(changed[:5])} differ); run the command it was started with, pass "
                            "--overwrite_output_dir to start over, or choose another --hpo_study_name.")
        done = sum(counts(study.get_trials(deepcopy=False)).values())
        note = f" (continuing: {done} trials in it)"
    if fresh_folder:
        os.makedirs(os.path.join(out, TRIALS_DIR), exist_ok=True)
        reporting.write_json(marker_path, marker)
    return {"note": note}


def _load_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def load_study(args):
    import optuna

    _silence_optuna()
    return optuna.load_study(study_name=args.hpo_study_name, storage=make_storage(storage_url(args)))


# ---------------------------------------------------------------------------------------------
# Which trials count
# ---------------------------------------------------------------------------------------------

def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}


def _process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), so that a reused pid is not taken for it."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    """Whether the process that runs a trial still does (only knowable on its own machine: True elsewhere)."""
    if not owner or owner.get("host") != socket.gethostname():
        return True
    pid = owner.get("pid")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError):
        return True
    started = _process_start(pid)
    return started is None or owner.get("started") is None or started == owner["started"]


def interrupted(trial) -> bool:
    """A trial whose process died (killed, preempted, its machine lost): re-run, not counted."""
    from optuna.trial import TrialState

    return trial.state == TrialState.FAIL and "hpo_failure" not in trial.user_attrs \
        and not trial.user_attrs.get("hpo_surplus")


def counted(trial) -> bool:
    """A trial that is one of the study's N: finished (complete, pruned, failed by its settings), running or
    queued. Interrupted trials are replaced by their re-run; surplus ones were dropped."""
    from optuna.trial import TrialState

    if trial.state == TrialState.FAIL:
        return "hpo_failure" in trial.user_attrs
    return True


def counts(trials) -> dict:
    out: dict[str, int] = {}
    for t in trials:
        if counted(t):
            out[t.state.name.lower()] = out.get(t.state.name.lower(), 0) + 1
    return out


def recover(study, storage) -> list[int]:
    """Mark the running trials of dead processes on this machine as interrupted, and queue one re-run of every
    interrupted trial that has none yet (same settings, same folder: it resumes the folder's latest checkpoint).
    Returns the numbers re-queued."""
    import optuna
    from optuna.trial import TrialState

    if isinstance(storage, optuna.storages.RDBStorage):
        optuna.storages.fail_stale_trials(study)  # heartbeats: trials of other machines that stopped beating
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _alive(t.user_attrs.get("hpo_owner")):
            study_id = storage.get_study_id_from_name(study.study_name)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_user_attr(trial_id, "hpo_interrupted", True)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("hpo_retry_of") for t in trials}
    queued = []
    for t in trials:
        if interrupted(t) and t.number not in retried and t.params:
            folder = t.user_attrs.get("hpo_folder") or trial_folder(t.number)
            study.enqueue_trial(t.params, user_attrs={"hpo_retry_of": t.number, "hpo_folder": folder})
            queued.append(t.number)
    return queued


def trial_folder(number: int) -> str:
    return f"trial_{number:03d}"


def claim(study, storage, args, plan: StudyPlan) -> Optional[dict]:
    """The next trial to run here, or None when the study has its N trials. Main process."""
    from optuna.trial import TrialState

    url = storage_url(args)
    with storage_lock(url):
        requeued = recover(study, storage)
        for number in requeued:
            logger.info("trial %d was interrupted (its process is gone): queued to run again", number)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if sum(counted(t) for t in trials) >= args.hpo_trials and not waiting:
            return None
        trial = study.ask()
        retry_of = trial.user_attrs.get("hpo_retry_of")
        if retry_of is None:
            before = sum(counted(t) for t in study.get_trials(deepcopy=False) if t.number < trial.number)
            if before >= args.hpo_trials:  # another machine claimed the last one first (no shared lock)
                trial.set_user_attr("hpo_surplus", True)
                study.tell(trial, state=TrialState.FAIL)
                return None
        trial.set_user_attr("hpo_owner", _owner())
        folder = trial.user_attrs.get("hpo_folder") or trial_folder(trial.number)
        trial.set_user_attr("hpo_folder", folder)
        params = {p.name: p.suggest(trial) for p in plan.space}
    path = os.path.join(args.output_dir, TRIALS_DIR, folder)
    resume = "latest" if retry_of is not None and list_checkpoints(os.path.join(path, "checkpoints")) else None
    return {"trial": trial, "number": trial.number, "params": params, "folder": path, "resume": resume,
            "retry_of": retry_of}


def make_sampler(args, trials_so_far: int, worker: Optional[str]):
    import optuna

    # Seeded by the seed, this worker and how far the study is: a continued study does not draw its first
    # trials' settings again, and two workers do not draw the same ones.
    seed = (args.seed * 7919 + trials_so_far * 104729 + int(worker or 0) * 15485863) % 2**32
    if args.hpo_sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(4, args.hpo_trials // 3)))


REDUCTION = 3  # successive halving keeps the best third of the trials at each rung


def halving_pruner(min_resource: int, eta: int):
    """Optuna's successive halving (asynchronous, ASHA), with one change measured on MRPC: the first rung promotes
    no trial before `eta` trials have reached it. Optuna cannot pause a trial and resume it later, so its halving
    promotes a trial that is the best of the few that reached the rung so far; the study's first trials are
    then promoted for want of competitors and run to the end (40% of a 16-trial MRPC study's time,
    BENCHMARKS.md). Here the first eta - 1 trials stop at the first rung, their values counted there."""
    import optuna

    class Halving(optuna.pruners.BasePruner):
        def __init__(self):
            self.inner = optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=eta)

        def prune(self, study, trial) -> bool:
            if self.inner.prune(study, trial):
                return True
            if trial.last_step is None or trial.last_step < min_resource:
                return False
            reached = sum("completed_rung_0" in t.system_attrs for t in study.get_trials(deepcopy=False))
            return reached < eta

    return Halving()


def make_pruner(args, plan: StudyPlan):
    import optuna

    if args.hpo_pruner == "halving":
        return halving_pruner(plan.min_resource, REDUCTION)
    if args.hpo_pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(2, args.hpo_trials // 4)), n_warmup_steps=0)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------------------------------------
# Running trials
# ---------------------------------------------------------------------------------------------

def work(task, model_args, data_args, args, runtime, plan: StudyPlan, worker: Optional[str]) -> None:
    """Claim and run trials until the study has its N. Every process of this launch takes part."""
    import optuna

    acc = runtime.accelerator
    study = storage = None
    if acc.is_main_process:
        _silence_optuna()
        storage = make_storage(storage_url(args))
        done = len(optuna.load_study(study_name=args.hpo_study_name, storage=storage).trials)
        study = optuna.load_study(study_name=args.hpo_study_name, storage=storage,
                                  sampler=make_sampler(args, done, worker), pruner=make_pruner(args, plan))
    shown = worker is None and args.hpo_workers == 1
    finished = sum(n for s, n in counts(study.trials).items() if s != "running") if study is not None else 0
    with (progress.bar(args.hpo_trials, "trials", unit="trial", initial=min(finished, args.hpo_trials))
          if shown else contextlib.nullcontext()) as bar:
        while True:
            claimed = [claim(study, storage, args, plan) if acc.is_main_process else None]
            shared = _broadcast([None if claimed[0] is None else {k: v for k, v in claimed[0].items()
                                                                  if k != "trial"}])[0]
            if shared is None:
                break
            with heartbeat(storage, study, shared["number"]) if acc.is_main_process else contextlib.nullcontext():
                outcome = run_trial(task, model_args, data_args, args, runtime, plan, shared,
                                    claimed[0]["trial"] if claimed[0] else None)
            if acc.is_main_process:
                finish(study, claimed[0]["trial"], shared, outcome, plan)
            if bar is not None:
                bar.update(1)
            acc.free_memory()  # the trial's model and optimizer (a full gc.collect, then the device's cache)


@contextlib.contextmanager
def heartbeat(storage, study, number: int):
    """While a trial runs, record its heartbeat every interval where the storage keeps them (RDB storages), so
    that a launch on another machine fails and re-queues it once its process is gone (recover)."""
    import threading

    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    if not interval:
        yield
        return
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name),
                                                               number)
    stop = threading.Event()

    def beat():
        while True:
            with contextlib.suppress(Exception):  # a missed beat is not the trial's failure
                storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"hpo-heartbeat-{number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_trial(task, model_args, data_args, args, runtime, plan: StudyPlan, claimed: dict, trial) -> dict:
    """One trial: its run, pruned at its evaluations. Returns {'state', 'value', 'epoch', 'error', ...}."""
    acc = runtime.accelerator
    number, params = claimed["number"], claimed["params"]
    started = time.perf_counter()
    reports: list[tuple[int, Optional[float], Optional[float]]] = []  # (evaluation or fold, epoch, value)
    head = f"trial {number}" + (f" (re-run of {claimed['retry_of']})" if claimed["retry_of"] is not None else "")
    logger.info("%s: %s%s", head, search_space.short(params) or "the command's settings",
                ", resuming its latest checkpoint" if claimed["resume"] else "")

    def decide(at: int, value: Optional[float], last: bool) -> bool:
        """Report (main process) and agree on pruning (every process)."""
        prune = [False]
        if trial is not None and value is not None and math.isfinite(value):
            trial.report(float(value), at)
            prune = [bool(not last and trial.should_prune())]
        return bool(_broadcast(prune)[0])

    def on_evaluate(step: int, epoch: float, value: Optional[float], last: bool) -> None:
        # the evaluation's index, from the step: a re-run resumed from a checkpoint numbers on where it was
        at = step // targs.eval_steps if targs.eval_strategy == "steps" else max(1, round(epoch))
        reports.append((at, round(epoch, 4), value))
        if decide(at, value, last):
            raise Pruned(epoch, value)

    def after_fold(i: int, results: dict) -> None:
        values = [r for _, _, r in reports]
        values.append((results.get("eval") or {}).get(plan.metric))
        reports.append((i, None, values[-1]))
        finite = [v for v in values if v is not None and math.isfinite(v)]
        mean = sum(finite) / len(finite) if finite else None
        if decide(i, mean, i >= args.kfold):
            raise Pruned(float(i), mean)

    targs = trial_args(args, params, claimed["folder"], claimed["resume"], plan.train_examples, acc.num_processes)
    try:
        if args.kfold >= 2:
            summary = run_all(task, model_args, data_args, targs, runtime, plan_runs(targs), after_run=after_fold)
            value = (summary["metrics"].get("eval_" + plan.metric) or {}).get("mean")
        else:
            ctx = Context(model_args, data_args, targs, runtime, run_name=f"trial {number}", on_evaluate=on_evaluate)
            results = run_single(task, ctx)
            value = (results.get("eval") or {}).get(plan.metric)
        if value is None or not math.isfinite(value):
            outcome = {"state": "fail", "error": f"no finite {plan.metric} on the validation data"}
        else:
            outcome = {"state": "complete", "value": float(value)}
    except Pruned as stop:
        outcome = {"state": "pruned", "value": stop.value, "epoch": stop.epoch}
        if acc.is_main_process:  # its partial results stay (log, settings); its checkpoints (a k-fold trial's
            folder = claimed["folder"]  # in its folds' folders) go: a pruned trial never resumes
            runs = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.startswith("fold_")] \
                if os.path.isdir(folder) else []
            for run in [folder, *runs]:
                shutil.rmtree(os.path.join(run, "checkpoints"), ignore_errors=True)
    except Diverged as err:
        outcome = {"state": "fail", "error": f"diverged: {err}"}
    except UserError as err:  # settings this trial drew that cannot work (the command's were checked before)
        outcome = {"state": "fail", "error": str(err)}
    except (MemoryError, _oom_error()) as err:
        outcome = {"state": "fail", "error": f"out of memory: {str(err).splitlines()[0][:200]}"}
        _free_accelerator_memory()
    except Exception as err:  # noqa: BLE001 - a setting this trial drew that breaks a library, or a bug
        logger.warning("trial %d failed with an unexpected error (the study goes on):", number, exc_info=True)
        first_line = str(err).splitlines()[0][:300] if str(err) else ""
        outcome = {"state": "fail", "error": f"{type(err).__name__}: {first_line}"}
        _free_accelerator_memory()
    except BaseException as err:  # interrupted (Ctrl-C; SIGTERM: a checkpoint was saved): re-run by the next command
        if trial is not None:
            trial.set_user_attr("hpo_interrupted", f"{type(err).__name__}")
            with contextlib.suppress(Exception):
                from optuna.trial import TrialState

                trial.study.tell(trial, state=TrialState.FAIL)
        raise
    outcome.update(seconds=time.perf_counter() - started, reports=reports, params=params, number=number)
    if acc.is_main_process:
        write_trial_json(claimed["folder"], outcome, plan)
    return outcome


def _oom_error() -> type:
    """torch.OutOfMemoryError (an accelerator's memory), where this torch has it."""
    import torch

    return getattr(torch, "OutOfMemoryError", MemoryError)


def _free_accelerator_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_trial_json(folder: str, outcome: dict, plan: StudyPlan) -> None:
    """trial.json in the trial's folder: its settings, state, value and every evaluation it reported (a pruned
    or failed trial keeps these partial results)."""
    os.makedirs(folder, exist_ok=True)
    record = {"number": outcome["number"], "state": outcome["state"], "metric": plan.metric,
              "value": outcome.get("value"), "params": outcome["params"], "seconds": outcome["seconds"]}
    if plan.kfold:  # reported after each fold: the mean of the folds so far
        record.update(pruned_after_fold=outcome.get("epoch") and int(outcome["epoch"]), error=outcome.get("error"),
                      intermediate=[{"after_fold": at, "value": v} for at, _, v in outcome["reports"]])
    else:
        record.update(pruned_at_epoch=outcome.get("epoch"), error=outcome.get("error"),
                      intermediate=[{"evaluation": at, "epoch": epoch, "value": v}
                                    for at, epoch, v in outcome["reports"]])
    reporting.write_json(os.path.join(folder, "trial.json"), record)


def finish(study, trial, claimed: dict, outcome: dict, plan: StudyPlan) -> None:
    """Tell the storage how the trial ended, and log one line. Main process."""
    from optuna.trial import TrialState

    state = outcome["state"]
    if state == "complete":
        study.tell(trial, outcome["value"])
    elif state == "pruned":
        at = outcome.get("epoch")  # the epoch where it stopped (--kfold: the fold after which it stopped)
        trial.set_user_attr("hpo_pruned_at", (int(at) if plan.kfold else round(at, 2)) if at is not None else None)
        study.tell(trial, state=TrialState.PRUNED)
    else:
        trial.set_user_attr("hpo_failure", outcome["error"][:500])
        study.tell(trial, state=TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    done = sum(n for s, n in counts(trials).items() if s not in ("running", "waiting"))
    best = _best(study)
    value = outcome.get("value")
    if state == "complete":
        what = f"{plan.metric} {value:.4f}"
    elif state == "pruned":
        where = f"after fold {int(outcome['epoch'])}" if plan.kfold else f"at epoch {outcome['epoch']:.2f}"
        what = f"pruned {where}" + (f" ({plan.metric} {value:.4f})" if value is not None else "")
    else:
        what = f"failed: {outcome['error']}"
    best_text = f"; best {best.value:.4f} (trial {best.number})" if best is not None else ""
    logger.info("trial %d done (%d finished): %s in %s%s", outcome["number"], done, what,
                progress.duration(outcome["seconds"]), best_text)


def _best(study):
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    pick = max if study.direction.name == "MAXIMIZE" else min
    return pick(complete, key=lambda t: t.value)


# ---------------------------------------------------------------------------------------------
# Several trials at once on one machine
# ---------------------------------------------------------------------------------------------

def _end_with_parent() -> None:
    """In a worker, before it runs: SIGTERM when the study's process dies, even by SIGKILL (Linux). The worker
    then checkpoints its trial and stops; the same command continues the study."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_workers(args, plan: StudyPlan, argv: Optional[list], script: Optional[str]) -> None:
    """--hpo_workers K: K processes of this very command (WORKER_ENV set) run by the task's script (also when
    main() is called from a notebook), each with 1/K of the cores (or its own GPU when there are K), claim
    trials from the one study until it has its N. Their logs go to output_dir/workers/; this process shows the
    progress and reports at the end."""
    import torch

    if not script or not script.endswith(".py"):
        raise UserError("--hpo_workers starts more processes of the script, and this task's script file is not "
                        "known; run the script as a command (python train_cls.py ...) or use --hpo_workers 1.")
    k = args.hpo_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    logs = os.path.join(args.output_dir, "workers")
    os.makedirs(logs, exist_ok=True)
    argv = [str(a) for a in (argv if argv is not None else sys.argv[1:])]  # a notebook's Paths and numbers
    procs = []
    for i in range(k):
        env = dict(os.environ, **{WORKER_ENV: str(i + 1)})
        threads = str(max(1, cores // k))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        if gpus >= k:
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        log = open(os.path.join(logs, f"worker_{i + 1}.log"), "a", encoding="utf-8")
        procs.append((subprocess.Popen([sys.executable, os.path.abspath(script), *argv], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, preexec_fn=_end_with_parent), log))
    logger.info("%d worker processes (%s each), logs in %s", k,
                f"GPU {', '.join(str(i) for i in range(k))}" if gpus >= k else f"{max(1, cores // k)} cores", logs)
    study = load_study(args)
    try:
        with progress.bar(args.hpo_trials, "trials", unit="trial") as bar:
            shown = 0
            while any(p.poll() is None for p, _ in procs):
                time.sleep(2)
                done = sum(n for s, n in counts(study.get_trials(deepcopy=False)).items()
                           if s not in ("running", "waiting"))
                if done > shown:
                    bar.update(min(done, args.hpo_trials) - shown)
                    shown = min(done, args.hpo_trials)
    except BaseException:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            p.wait()
        raise
    finally:
        for _, log in procs:
            log.close()
    failed = [(i + 1, p.returncode) for i, (p, _) in enumerate(procs) if p.returncode != 0]
    if failed:
        i, code = failed[0]
        raise UserError(f"worker {i} of --hpo_workers exited with code {code}; see "
                        f"{os.path.join(logs, f'worker_{i}.log')}. Rerun the same command to continue the study.")


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def trial_rows(study, plan: StudyPlan) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_complete and t.datetime_start else None)
        if t.user_attrs.get("hpo_surplus"):
            continue
        state = "interrupted" if interrupted(t) else t.state.name.lower()
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        row = {"number": t.number, "state": state,
               "value": t.value if t.value is not None else (last if state == "pruned" else None),
               **{p.name: t.params.get(p.name) for p in plan.space if p.kind != "fixed"},
               "seconds": round(seconds, 1) if seconds is not None else None,
               "pruned_at": t.user_attrs.get("hpo_pruned_at") if state == "pruned" else None,
               "folder": os.path.join(TRIALS_DIR, t.user_attrs.get("hpo_folder") or trial_folder(t.number)),
               "host": (t.user_attrs.get("hpo_owner") or {}).get("host"),
               "note": t.user_attrs.get("hpo_failure") or (f"re-run of trial {t.user_attrs['hpo_retry_of']}"
                                                           if "hpo_retry_of" in t.user_attrs else "")}
        rows.append(row)
    return rows


def write_trials_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    reporting.write_text_atomic(path, buf.getvalue())


def best_settings(model_args, data_args, args, params: dict) -> dict:
    """The complete settings of the best trial, as --config takes them: the command's, the trial's values, no
    output folder and no study settings (a trial's extra evaluations are the study's, not the settings')."""
    tuned = search_space.apply(args, params)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainArguments) if f.name.startswith("hpo_")}
    tuned = dataclasses.replace(tuned, **defaults)
    settings = to_jsonable(model_args, data_args, tuned)
    for key in ("output_dir", "overwrite_output_dir", "resume_from_checkpoint"):
        settings.pop(key, None)
    return {k: v for k, v in settings.items() if not k.startswith("hpo_")}


def write_best_yaml(path: str, settings: dict, best, plan: StudyPlan, script: str) -> None:
    import yaml

    head = (f"# The best settings of the study: trial {best.number}, validation {plan.metric} {best.value:.4f}.\n"
            f"# Train them: python {script} --config {path} --output_dir OUT\n"
            f"# Searched: {', '.join(p.name for p in plan.space if p.kind != 'fixed')}.\n")
    reporting.write_text_atomic(path, head + yaml.safe_dump(settings, sort_keys=False, allow_unicode=True))


def draw_plots(study, output_dir: str) -> list[str]:
    """Optuna's matplotlib plots: the optimisation history, the parameter importances, and a slice plot."""
    import logging
    import warnings

    from optuna.visualization import matplotlib as ovm

    logging.getLogger("matplotlib.category").setLevel(logging.WARNING)  # "categorical units" notes on batch sizes
    made = []

    def one(fn, name, **kwargs):
        def draw():
            plt = plots._plt()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study, **kwargs)
            fig = ax.flat[0].figure if hasattr(ax, "flat") else ax.figure
            fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig.tight_layout()
            path = os.path.join(output_dir, name)
            fig.savefig(path + ".tmp.png", dpi=110)
            os.replace(path + ".tmp.png", path)
            plt.close("all")
            return path
        draw.__name__ = name
        if plots.safely(draw):
            made.append(name)

    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        one(ovm.plot_optimization_history, "hpo_history.png")
        one(ovm.plot_slice, "hpo_slice.png")
    if len(complete) >= 2 and any(len({str(t.params.get(k)) for t in complete}) > 1 for k in complete[0].params):
        one(ovm.plot_param_importances, "hpo_importances.png")
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        one(ovm.plot_intermediate_values, "hpo_intermediate.png")
    return made


def report(task, model_args, data_args, args, runtime, plan: StudyPlan, seconds: float) -> dict:
    """trials.csv, best.yaml, plots, the confirmation runs and summary.json; the closing block."""
    acc = runtime.accelerator
    out = args.output_dir
    info = [None]
    if acc.is_main_process:
        study = load_study(args)
        rows = trial_rows(study, plan)
        write_trials_csv(os.path.join(out, TRIALS_CSV), rows)
        best = _best(study)
        states = counts(study.get_trials(deepcopy=False))
        if best is None:
            first = next((r["note"] for r in rows if r["state"] == "fail" and r["note"]), "")
            info = [{"error": f"no trial of the study finished ({', '.join(f'{n} {s}' for s, n in states.items())})"
                              + (f"; the first failure: {first}" if first else "")}]
        else:
            # what the trial ran with: Optuna's params less the file's fixed values, which it never sampled
            params = {p.name: p.choices[0] for p in plan.space if p.kind == "fixed"} | best.params
            settings = best_settings(model_args, data_args, args, params)
            write_best_yaml(os.path.join(out, BEST_YAML), settings, best, plan, _script_name(task))
            info = [{"best": {"number": best.number, "value": best.value, "params": params},
                     "states": states, "rows": rows, "plots": draw_plots(study, out)}]
    info = _broadcast(info)[0]
    if "error" in info:
        raise UserError(info["error"] + ".")
    trial_seconds = sum(r["seconds"] or 0 for r in info["rows"])
    summary = {"study_name": args.hpo_study_name, "storage": storage_url(args), "metric": plan.metric,
               "direction": "maximize" if plan.greater else "minimize", "split": "validation",
               "trials": args.hpo_trials, "states": info["states"], "sampler": args.hpo_sampler,
               "pruner": args.hpo_pruner, "space": {p.name: p.as_dict() for p in plan.space},
               "best_trial": info["best"], "trials_seconds": trial_seconds, "study_seconds": seconds}
    if args.hpo_confirm_seeds:
        t0 = time.perf_counter()
        summary["confirm"] = confirm(task, model_args, data_args, args, runtime, plan, info["best"]["params"])
        summary["confirm_seconds"] = time.perf_counter() - t0
    if acc.is_main_process:
        reporting.write_json(os.path.join(out, SUMMARY), summary)
        logger.info("\n".join(last_lines(summary, out, info["rows"], info["plots"], _script_name(task))))
    acc.wait_for_everyone()
    return summary


def _script_file(task) -> Optional[str]:
    """The task's script (train_ner.py ...): where its Task class is defined, also when main() is called from
    a notebook, a test or another script."""
    return getattr(sys.modules.get(type(task).__module__), "__file__", None)


def _script_name(task) -> str:
    return os.path.basename(_script_file(task) or "train_cls.py")


def confirm(task, model_args, data_args, args, runtime, plan: StudyPlan, best_params: dict) -> dict:
    """The best and the default (the command's) settings, each over --hpo_confirm_seeds seeds with the
    command's own evaluation schedule (repeats.run_all, continued when rerun); both means with 95% intervals
    and the interval of their difference (Welch)."""
    from ..stats import summarize

    seeds = [args.seed + 100 * i for i in range(args.hpo_confirm_seeds)]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainArguments) if f.name.startswith("hpo_")}
    key = "eval_" + plan.metric
    out: dict[str, Any] = {"seeds": seeds, "metric": key}
    values = {}
    for label, params in (("best", best_params), ("default", {})):
        cargs = dataclasses.replace(search_space.apply(args, params), **defaults,
                                    output_dir=os.path.join(args.output_dir, CONFIRM_DIR, label), seeds=seeds,
                                    num_runs=1, overwrite_output_dir=False)
        runs = plan_runs(cargs)
        other = [holds_other_job(task, model_args, data_args, cargs, runs) if runtime.accelerator.is_main_process
                 else None]
        if _broadcast(other)[0]:  # the study found a new best since these runs: they are replaced
            logger.info("the %s settings changed since %s was confirmed: confirming them again", label,
                        cargs.output_dir)
            cargs = dataclasses.replace(cargs, overwrite_output_dir=True)
        logger.info("confirming the %s settings over %d seeds into %s", label, len(seeds), cargs.output_dir)
        summary = run_all(task, model_args, data_args, cargs, runtime, runs)
        values[label] = [r["metrics"].get(key) for r in summary["runs"]]
        out[label] = summarize(values[label]) | {"values": values[label], "params": params,
                                                 "folder": os.path.join(CONFIRM_DIR, label)}
    out["difference"] = welch(values["best"], values["default"])
    return out


def welch(a: list, b: list) -> dict:
    """Mean of a - mean of b, with the 95% Welch t-interval (independent runs, unequal variances)."""
    import numpy as np
    from scipy import stats

    x = np.asarray([v for v in a if v is not None], dtype=float)
    y = np.asarray([v for v in b if v is not None], dtype=float)
    diff = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return {"mean": diff, "ci95": None}
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:
        return {"mean": diff, "ci95": [diff, diff], "dof": None}
    dof = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    half = float(stats.t.ppf(0.975, dof) * se)
    return {"mean": diff, "ci95": [diff - half, diff + half], "dof": dof}


def last_lines(summary: dict, output_dir: str, rows: list[dict], plot_files: list[str], script: str) -> list[str]:
    best, states = summary["best_trial"], summary["states"]
    n = sum(states.values())
    parts = ", ".join(f"{states[s]} {s}" for s in ("complete", "pruned", "fail") if states.get(s))
    lines = [f"── study done: best validation {summary['metric']} {best['value']:.4f} (trial {best['number']}); "
             f"{n} trials: {parts} ──",
             f"best   {search_space.short(best['params'])}"]
    conf = summary.get("confirm")
    if conf:
        def fmt(s):
            half = f" ± {s['ci95_halfwidth']:.4f}" if s.get("ci95_halfwidth") is not None else ""
            return f"{s['mean']:.4f}{half}"
        d = conf["difference"]
        ci = f" (95% CI {d['ci95'][0]:+.4f} to {d['ci95'][1]:+.4f})" if d.get("ci95") else ""
        lines.append(f"confirm {len(conf['seeds'])} seeds, {conf['metric']}: best {fmt(conf['best'])}, default "
                     f"{fmt(conf['default'])}; difference {d['mean']:+.4f}{ci}")
    # this invocation: the search (its trials may have run in earlier ones too), then the confirmation
    time_line = (f"time   search {progress.duration(summary['study_seconds'])} in this invocation (trials "
                 f"{progress.duration(summary['trials_seconds'])} in all)")
    if summary.get("confirm_seconds"):
        time_line += (f" + confirmation {progress.duration(summary['confirm_seconds'])} = "
                      f"{progress.duration(summary['study_seconds'] + summary['confirm_seconds'])}")
    lines.append(time_line)
    files = [f for f in (BEST_YAML, TRIALS_CSV, SUMMARY, *plot_files) if os.path.isfile(os.path.join(output_dir, f))]
    folders = [r["folder"] + "/" for r in rows]
    shown = ", ".join(folders) if len(folders) <= 2 else f"{folders[0]} ... {folders[-1]}"
    lines.append(f"output {output_dir}: {', '.join(files)}; one folder per trial: {shown}")
    lines.append(f"       train the best settings: python {script} --config "
                 f"{os.path.join(output_dir, BEST_YAML)} --output_dir OUT")
    return lines

"""The entry point every script's `main` calls: settings -> runtime -> the run plan.

    launch(task, argv)
      parse_args              defaults < --config YAML < flags          (config.py)
      reuse_training_settings --no_do_train: the model's data settings  (run_settings.py)
      plan_runs / check_plan  one run, or seeds x folds                 (plan.py)
      make_runtime            processes, device, precision              (runtime.py)
      run_single              one run                                   (single_run.py)
      or run_all              several runs + summary                    (repeats.py -> single_run.py)
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

from .. import hub, progress
from ..config import ModelArguments, TrainArguments, parse_args
from ..data import validate
from ..errors import UserError
from ..log import logger, setup_logging
from ..task import Context, Task
from ..training.runtime import make_runtime, reset_accelerate_state, shutdown
from . import reporting
from .plan import check_plan, plan_runs
from .repeats import run_all
from .run_settings import reuse_training_settings
from .single_run import run_single

IMPORTED = time.perf_counter()  # a lower bound of the process's age, to check the clock it is read from


def push_preflight(accelerator, args) -> str:
    """hub.push_preflight on the main process; its repository id (or its error, on every rank)."""
    from accelerate.utils import broadcast_object_list

    answer = [None]
    if accelerator.is_main_process:
        try:
            answer = [("ok", hub.push_preflight(args))]
        except UserError as err:
            answer = [("error", str(err))]
    broadcast_object_list(answer)
    kind, value = answer[0]
    if kind == "error":
        raise UserError(value)
    return value


def process_age(task: Task) -> Optional[float]:
    """Seconds since this process started (the interpreter and the imports), when it was started to run this
    command: the task's script is the program (`python train_cls.py`, accelerate launch, torchrun). None when
    main() is called in a process that was running before (a notebook, tests, another script)."""
    program = sys.modules.get("__main__")
    if type(task).__module__ != "__main__" or not getattr(program, "__file__", None):
        return None
    at_least = time.perf_counter() - IMPORTED
    try:  # Linux: the start time in clock ticks since boot, against the boot clock (both to 10 ms)
        with open("/proc/self/stat", encoding="ascii") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        try:  # elsewhere psutil (an accelerate dependency) reads the creation time to the microsecond
            import psutil

            age = time.time() - psutil.Process().create_time()
        except Exception:  # noqa: BLE001 - no way to tell
            return None
    # a clock that says the process is younger than this module: the split says nothing rather than something wrong
    return age if age >= at_least - 0.02 else None


def launch(task: Task, argv: Optional[Sequence[str]] = None) -> dict:
    """Run the task with these command-line arguments; returns results.json (or summary.json) as a dict."""
    entered = time.perf_counter()
    startup = process_age(task)
    (model_args, data_args, args), given = parse_args([ModelArguments, task.data_arguments, TrainArguments], argv,
                                                      task.description, return_given=True)
    reused = None
    if not args.do_train:  # read new files as the model's training run read its own (flags win)
        data_args, reused = reuse_training_settings(data_args, model_args.model, given)
    reset_accelerate_state()  # a notebook may call main() again in the same kernel
    announce = data_args.resolve_source(args.do_train)
    runs = plan_runs(args)
    check_plan(args, task.name, task.supports_kfold)
    if args.hpo_trials:  # a study checks its folder itself (a study there continues)
        validate.check_output_path(args.output_dir)
    elif len(runs) == 1 and runs[0].split is None:
        reporting.check_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint)
    else:
        validate.check_output_path(args.output_dir)
    validate.check_inputs_outside(args.output_dir, validate.input_paths(model_args, data_args, args),
                                  clearing=args.overwrite_output_dir and not args.resume_from_checkpoint)
    runtime = make_runtime(args, args.output_dir, model_args)
    try:
        main_here = runtime.accelerator.is_local_main_process
        setup_logging(main_here, bars=progress.configure(args.progress, main_here) in ("bar", "widget"))
        if announce:
            logger.info(announce)
        if reused and (reused.values or reused.skipped):
            logger.info(reused.describe())
        for warning in validate.reused_files(data_args):
            logger.warning(warning)
        if args.hpo_trials:
            from .study import run_study

            return run_study(task, model_args, data_args, args, runtime, given, argv)
        if runs[0].split is None:
            repo = push_preflight(runtime.accelerator, args) if args.push_to_hub else None
            # the first parts of the run's time split (single_run.stamp_time): imports, then settings and runtime
            timings = {"launch_seconds": time.perf_counter() - entered}
            if startup is not None:
                timings["startup_seconds"] = startup
            return run_single(task, Context(model_args, data_args, args, runtime, hub_repo=repo, timings=timings))
        return run_all(task, model_args, data_args, args, runtime, runs)
    finally:
        shutdown(runtime.accelerator)

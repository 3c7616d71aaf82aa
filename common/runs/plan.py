"""The run plan: what one launch runs. A single run is a plan of one; `--seeds`, `--num_runs` and
`--kfold` make several, each with its own seed, split and subfolder."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import TrainArguments
from ..errors import UserError


@dataclass(frozen=True)
class SplitPlan:
    seed: int                 # seed of derived splits and of the fold assignment
    kfold: int = 0            # 0: no cross-validation
    fold: int = 0             # 0-based held-out fold


@dataclass(frozen=True)
class PlannedRun:
    name: str                 # its subfolder of output_dir ("" for a single run: output_dir itself)
    seed: int
    split: Optional[SplitPlan]  # None: a single run (derived splits use its seed)


def plan_runs(args: TrainArguments) -> list[PlannedRun]:
    if not args.is_repeated():
        return [PlannedRun("", args.seed, None)]
    seeds = args.run_seeds()
    runs = []
    for seed in seeds:
        split_seed = seed if args.resplit_per_seed else seeds[0]
        folds = range(args.kfold) if args.kfold >= 2 else [None]
        for fold in folds:
            if fold is None:
                runs.append(PlannedRun(f"seed_{seed}", seed, SplitPlan(split_seed)))
            else:
                name = f"fold_{fold + 1}" if len(seeds) == 1 else f"seed_{seed}_fold_{fold + 1}"
                runs.append(PlannedRun(name, seed, SplitPlan(split_seed, args.kfold, fold)))
    return runs


def check_plan(args: TrainArguments, task_name: str, supports_kfold: bool) -> None:
    """Settings that cannot go together (checked before anything is written)."""
    if args.push_to_hub and not args.do_train:
        raise UserError("--push_to_hub uploads a model trained by this run; drop it with --no_do_train.")
    if not args.is_repeated():
        return
    if args.push_to_hub:
        raise UserError("--push_to_hub uploads one model; a multi-run job (--seeds/--num_runs/--kfold) trains several: "
                        "run the chosen configuration once with --push_to_hub.")
    if not args.do_train:
        raise UserError("--no_do_train evaluates one model; drop --seeds/--num_runs/--kfold.")
    if args.resume_from_checkpoint:
        raise UserError("--resume_from_checkpoint is for single runs; a multi-run job (--seeds/--num_runs/--kfold) "
                        "continues by itself when restarted with the same command.")
    if args.kfold and not supports_kfold:
        raise UserError(f"--kfold is not available for {task_name}; use --seeds for repeated runs.")

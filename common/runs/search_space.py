"""What a study searches: the default space of each task, a `--hpo_space` YAML file read and checked, and
one trial's settings drawn from it.

A space file maps settings (the scripts' flag names) to what a trial may pick:

    learning_rate: {low: 1.0e-5, high: 3.0e-4, log: true}   # a range (log: sampled on a log scale)
    num_train_epochs: [2, 3, 4, 5]                           # a list: one of these values
    per_device_train_batch_size: {low: 16, high: 64, step: 16}  # an integer setting: an integer range
    warmup_ratio: {low: 0.0, high: 0.2, step: 0.05}          # a grid of step 0.05
    weight_decay: 0.01                                       # a single value: fixed for every trial

Only the settings in the file are searched; every other setting is the command's (a setting both in the
file and on the command line is searched, and the command's value is the baseline --hpo_confirm_seeds
compares with). Without a file, the task's default space (docs/hpo.md) is searched, less the settings the
command gives itself.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Optional

from ..config import TrainArguments
from ..errors import UserError, closest

# Settings a trial may not change: where it writes, how the job runs, the study's own.
NOT_SEARCHABLE = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "seed", "seeds", "num_runs",
                  "resplit_per_seed", "kfold", "do_train", "do_eval", "do_predict", "push_to_hub", "hub_model_id",
                  "hub_token", "hub_private_repo", "report_to", "progress", "teacher_model", "ddp_timeout",
                  "metric_for_best_model", "greater_is_better", "max_eval_samples"}
# Float settings counted in whole units: a range written in whole numbers searches whole values, as the default
# space does (epochs {low: 2, high: 5}: 2, 3, 4 or 5); written with decimals ({low: 2.0, high: 5.0}) it is continuous.
WHOLE_UNITS = {"num_train_epochs"}


@dataclass(frozen=True)
class Param:
    name: str
    kind: str                        # "float", "int" or "choice" ("fixed": one value, not searched)
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        return self.choices[0]

    def describe(self) -> str:
        if self.kind in ("float", "int"):
            scale = "log scale" if self.log else ("integers" if self.kind == "int" else "uniform")
            grid = f", step {self.step:g}" if self.step else ""
            return f"{self.name} {self.low:g} to {self.high:g} ({scale}{grid})"
        if self.kind == "choice":
            return f"{self.name} one of {', '.join(map(str, self.choices))}"
        return f"{self.name} = {self.choices[0]} (fixed)"

    def as_dict(self) -> dict:
        if self.kind in ("float", "int"):
            return {"type": self.kind, "low": self.low, "high": self.high, "log": self.log, "step": self.step}
        return {"type": self.kind, "choices": list(self.choices)}


def default_space(task_name: str, args: TrainArguments) -> list[Param]:
    """The task's default space (docs/hpo.md). Distillation adds alpha and temperature and a wider learning
    rate (a smaller student wants a larger one); MLM adaptation a wider one as well."""
    wide = task_name == "fill-mask" or bool(args.teacher_model)
    space = [Param("learning_rate", "float", 1e-5, 5e-4 if wide else 3e-4, log=True),
             Param("per_device_train_batch_size", "choice", choices=(16, 32, 64)),
             Param("num_train_epochs", "int", 1 if task_name == "fill-mask" else 2, 4 if task_name == "fill-mask"
                   else 5),
             Param("warmup_ratio", "float", 0.0, 0.2),
             Param("weight_decay", "float", 0.0, 0.1)]
    if args.teacher_model and args.distill_prediction:
        space += [Param("distill_alpha", "float", 0.0, 1.0), Param("distill_temperature", "float", 1.0, 8.0)]
    return space


def resolve_space(task_name: str, args: TrainArguments, given: set) -> tuple[list[Param], list[str]]:
    """(the space of this study, notes for the log): the --hpo_space file, or the default space less the
    settings the command fixes (a flag or --config key) and those without effect (epochs under --max_steps)."""
    if args.hpo_space:
        space = read_space(args.hpo_space)
        _check_effect(space, args, args.hpo_space)
        # A setting both searched and given: the file decides the trials; the command's value stays the baseline
        # that --hpo_confirm_seeds compares the best settings with.
        notes = [f"{p.name} searched (--hpo_space); the command's {getattr(args, p.name)} is the baseline of "
                 "--hpo_confirm_seeds" for p in space if p.name in given and p.kind != "fixed"]
        twice = [p for p in space if p.name in given and p.kind == "fixed" and p.choices[0] != getattr(args, p.name)]
        if twice:
            p = twice[0]
            raise UserError(f"--hpo_space '{args.hpo_space}' fixes {p.name} to {p.choices[0]}, but the command sets "
                            f"--{p.name} {getattr(args, p.name)}; keep one of them.")
        _check_values(space, args, args.hpo_space)
        return space, notes
    notes = []
    space = []
    for param in default_space(task_name, args):
        if param.name in given:
            notes.append(f"{param.name} fixed by the command")
        elif param.name == "num_train_epochs" and args.max_steps > 0:
            notes.append("num_train_epochs not searched: --max_steps sets the length")
        elif param.name == "warmup_ratio" and args.warmup_steps > 0:
            notes.append("warmup_ratio not searched: --warmup_steps sets the warm-up")
        else:
            space.append(param)
    if not any(p.kind != "fixed" for p in space):
        raise UserError("the command sets every setting of the default search space; drop some of them or pass "
                        "--hpo_space FILE with the settings to search.")
    return space, notes


def _check_effect(space: list[Param], args: TrainArguments, path: str) -> None:
    names = {p.name for p in space}
    if "num_train_epochs" in names and args.max_steps > 0:
        raise UserError(f"--hpo_space '{path}' searches num_train_epochs, but --max_steps {args.max_steps} sets the "
                        "length of every trial; drop one of them.")
    if not args.teacher_model and names & {"distill_alpha", "distill_temperature", "distill_intermediate_weight"}:
        name = sorted(names & {"distill_alpha", "distill_temperature", "distill_intermediate_weight"})[0]
        raise UserError(f"--hpo_space '{path}' searches {name}, a distillation setting, but there is no "
                        "--teacher_model; drop it or add a teacher.")


def _check_values(space: list[Param], args: TrainArguments, path: str) -> None:
    """Every choice and both ends of every range pass the settings' own checks with the command's other
    settings (a warm-up ratio of 1, a batch of 0, a bad --checkpointing_steps): refused before the first trial,
    not found by one of them."""
    for param in space:
        ends = [("low ", param.low), ("high ", param.high)] if param.kind in ("float", "int") else \
            [("", v) for v in param.choices]
        for label, value in ends:
            value = int(value) if param.kind == "int" else value
            try:
                apply(args, {param.name: value})
            except UserError as err:
                shown = f"{label}{value:g}" if label else repr(value)
                raise UserError(f"--hpo_space file '{path}', {param.name}: {shown} cannot be used: {err}") from None


def _settings_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainArguments)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainArguments) if f.name not in NOT_SEARCHABLE
            and not f.name.startswith("hpo_")}


def _settings_choices() -> dict[str, tuple]:
    """The values a str setting takes, where its flag lists them (--lr_scheduler_type, --mixed_precision)."""
    return {f.name: tuple(f.metadata["choices"]) for f in dataclasses.fields(TrainArguments)
            if f.metadata.get("choices")}


def _base_type(hint) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return _base_type(args[0])
    return hint


def read_space(path: str) -> list[Param]:
    """The --hpo_space file, every entry checked (a setting of the scripts, a value of its type, low < high, a
    positive low on a log scale): a bad file is refused in one sentence, before anything runs."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise UserError(f"--hpo_space file '{path}' does not exist.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--hpo_space file '{path}' cannot be read: {err}.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"--hpo_space file '{path}' is not valid YAML{where}; write one 'setting: range' per "
                        "line (docs/hpo.md).") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"--hpo_space file '{path}' must map settings to ranges or choices, e.g. "
                        "'learning_rate: {low: 1.0e-5, high: 3.0e-4, log: true}' (docs/hpo.md).")
    types, choices = _settings_types(), _settings_choices()
    space = []
    for name, spec in raw.items():
        where = f"--hpo_space file '{path}', {name}"
        name = str(name).lstrip("-")
        if name not in types:
            if name in NOT_SEARCHABLE or name.startswith("hpo_") or name in {f.name for f in
                                                                           dataclasses.fields(TrainArguments)}:
                raise UserError(f"{where}: this setting cannot vary between trials; set it on the command line.")
            raise UserError(f"{where}: not a training setting{closest(name, types)}; the searchable settings are "
                            "the training flags of --help (data and model settings are fixed for a study).")
        space.append(_param(name, spec, _base_type(types[name]), where, choices.get(name)))
    if not any(p.kind != "fixed" for p in space):
        raise UserError(f"--hpo_space file '{path}' fixes every setting it names; give at least one a range or "
                        "a list of choices.")
    return space


def _number(value: Any, kind: type, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: {key} must be a number, got {value!r}.")
    if kind is int and float(value) != int(value):
        raise UserError(f"{where}: {key} must be a whole number (the setting is an integer), got {value!r}.")
    return value


def _check_value(value: Any, hint: Any, where: str, choices: Optional[tuple] = None) -> Any:
    """One choice or fixed value, of the setting's type (YAML '1e-5' is a string: accepted as a number) and
    among its flag's choices (a Literal, or the field's listed ones)."""
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
    if choices is not None:
        if value not in choices:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}.")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: {value!r} is not true or false.")
        return value
    if hint in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if hint is float else int(value)
            except ValueError:
                raise UserError(f"{where}: {value!r} is not a number.") from None
        return hint(_number(value, hint, where, "a value"))
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: {value!r} is not text.")
        return value
    raise UserError(f"{where}: this setting cannot be searched (it takes a {hint}).")


def _param(name: str, spec: Any, hint: Any, where: str, choices: Optional[tuple] = None) -> Param:
    if isinstance(spec, list):
        if len(spec) < 1:
            raise UserError(f"{where}: an empty list of choices.")
        values = tuple(_check_value(v, hint, where, choices) for v in spec)
        if len(set(values)) != len(values):
            raise UserError(f"{where}: repeated choices ({', '.join(map(str, values))}).")
        return Param(name, "choice" if len(values) > 1 else "fixed", choices=values)
    if not isinstance(spec, dict):
        return Param(name, "fixed", choices=(_check_value(spec, hint, where, choices),))
    unknown = set(spec) - {"low", "high", "log", "step", "choices"}
    if unknown:
        raise UserError(f"{where}: unknown key '{sorted(unknown)[0]}'; use low/high (with log: true or step: S) "
                        "or choices: [...].")
    if "choices" in spec:
        if set(spec) != {"choices"} or not isinstance(spec["choices"], list):
            raise UserError(f"{where}: 'choices' takes a list and no other key.")
        return _param(name, spec["choices"], hint, where, choices)
    if hint not in (int, float):
        raise UserError(f"{where}: a range needs a numeric setting; give this one a list of choices.")
    if "low" not in spec or "high" not in spec:
        raise UserError(f"{where}: a range needs both low and high.")
    low, high = (_check_value(spec[k], float, where) for k in ("low", "high"))
    written_whole = all(type(spec[k]) is int for k in ("low", "high", "step") if spec.get(k) is not None)
    kind = "int" if hint is int or (name in WHOLE_UNITS and written_whole) else "float"
    if kind == "int":
        low, high = (_number(v, int, where, k) for v, k in ((low, "low"), (high, "high")))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}: log must be true or false, got {log!r}.")
    if not low < high:
        raise UserError(f"{where}: low ({low:g}) must be below high ({high:g}).")
    if log and low <= 0:
        raise UserError(f"{where}: a log scale needs low > 0, got {low:g}.")
    step = spec.get("step")
    if step is not None:
        step = _check_value(step, float, where)
        if log:
            raise UserError(f"{where}: step and log cannot go together (Optuna samples a log range continuously).")
        if not step > 0 or step > high - low:
            raise UserError(f"{where}: step must be above 0 and at most high - low, got {step:g}.")
        if kind == "int" and step != int(step):
            raise UserError(f"{where}: step must be a whole number for an integer setting, got {step:g}.")
    return Param(name, kind, float(low), float(high), log, step)


def apply(args: TrainArguments, params: dict) -> TrainArguments:
    """The command's settings with one trial's values (their checks run again: a bad pick fails that trial)."""
    types = _settings_types()
    values = {}
    for name, value in params.items():
        base = _base_type(types[name])
        values[name] = float(value) if base is float else value
    return dataclasses.replace(args, **values)


def short(params: dict) -> str:
    """'lr 4.2e-05, batch 16, epochs 3, warmup 0.12, wd 0.031' for log lines."""
    names = {"learning_rate": "lr", "per_device_train_batch_size": "batch", "num_train_epochs": "epochs",
             "warmup_ratio": "warmup", "weight_decay": "wd", "distill_alpha": "alpha", "distill_temperature": "T"}
    parts = []
    for name, value in params.items():
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{names.get(name, name)} {text}")
    return ", ".join(parts)

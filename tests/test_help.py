"""--help a person can scan (one spelling per flag, groups, the terminal's width, examples as lines) and the NER
model card's pipeline example. No training: parsers and formatters only, plus one real `--help` process."""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from common import config
from common.config import HELP_GROUPS, ModelArguments, TrainArguments, parse_args
from common.errors import UserError
from common.runs import reporting
from conftest import ROOT

SCRIPTS = ["train_cls", "train_ner", "train_mlm", "export"]
# Lines of --help at 100 columns: 432-461 before the groups and the formatter; about 180-190 (export: 66), then
# with the hyperparameter search group (8 flags, issue 26: about 195-204), then with the transfer set's flags
# (5, one line each, issue 25: about 199-209).
MAX_LINES = {"train_cls": 212, "train_ner": 212, "train_mlm": 212, "export": 80}


def dataclass_types(script: str) -> list[type]:
    module = importlib.import_module(script)
    if script == "export":
        return [module.ExportArguments]
    return [ModelArguments, module.TASK.data_arguments, TrainArguments]


def parser_of(script: str) -> config._Parser:
    return config._Parser(dataclass_types(script), allow_abbrev=False)


def help_text(script: str, monkeypatch, capsys, columns: int | None) -> str:
    """What `python SCRIPT.py --help` prints on a terminal of `columns` (None: not a terminal)."""
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
        monkeypatch.setattr(os, "get_terminal_size", lambda *a: (_ for _ in ()).throw(OSError("not a tty")))
    else:
        monkeypatch.setenv("COLUMNS", str(columns))
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(script).main(["--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def option_blocks(text: str) -> dict[str, str]:
    """Shown invocation ('--seed N', '--[no_]do_eval') -> its help text, from a rendered --help."""
    blocks, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            invocation, _, rest = line.strip().partition("  ")
            current = invocation
            blocks[current] = rest.strip()
        elif current and line.startswith(" " * 10):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_short_and_fits_the_terminal(script, monkeypatch, capsys):
    for columns in (80, 100, 120, None, 300):
        text = help_text(script, monkeypatch, capsys, columns)
        widest = max(map(len, text.splitlines()))
        assert widest <= min(columns or 100, 120), (columns, widest)  # not a terminal: 100; at most 120
        if columns in (100, None):
            assert len(text.splitlines()) <= MAX_LINES[script], (columns, len(text.splitlines()))


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_flag_shown_once_and_its_aliases_still_parse(script, monkeypatch, capsys):
    text = help_text(script, monkeypatch, capsys, 100)
    shown = option_blocks(text)
    for action in parser_of(script)._actions:
        first = next(s for s in action.option_strings if s.startswith("--"))
        for alias in action.option_strings:
            if alias.startswith("--") and "-" in alias[2:]:  # HfArgumentParser's --x-y spelling: parses, not shown
                assert not re.search(re.escape(alias) + r"(?![\w-])", text), alias
        if action.help == "==SUPPRESS==":  # the --no_x of a switch, shown as --[no_]x
            assert first.startswith("--no_") and any(k.startswith("--[no_]" + first[5:]) for k in shown), first
            continue
        invocations = [k for k in shown if k.split(", ")[-1].split()[0].replace("[no_]", "") == first]
        assert len(invocations) == 1, (first, invocations)
    # the aliases hidden from --help still parse, and so do both forms of a switch
    if script == "train_cls":
        model, data, args = parse_args(dataclass_types(script), [
            "--learning-rate", "0.001", "--no-group-by-length", "--model_name_or_path", "m", "--train-file", "t.csv",
            "--no_do_eval", "--fast-dropout", "false", "--overwrite-output-dir"], "")
        assert (args.learning_rate, args.group_by_length, model.model, data.train_file) == (1e-3, False, "m", "t.csv")
        assert (args.do_eval, args.fast_dropout, args.overwrite_output_dir) == (False, False, True)
        with pytest.raises(UserError, match=r"^argument --max_steps: invalid int value: 'x'; see --help\.$"):
            parse_args(dataclass_types(script), ["--max-steps", "x"], "")  # errors name the flag as --help shows it


def test_every_setting_is_in_exactly_one_group_and_groups_follow_their_order(monkeypatch, capsys):
    titles = {title: key for key, title in HELP_GROUPS.items()}
    for f in dataclasses.fields(TrainArguments):  # a new flag must name its group
        assert f.metadata.get("group") in HELP_GROUPS, f"TrainArguments.{f.name} has no help group"
    for script in ("train_cls", "train_ner", "train_mlm"):
        parser = parser_of(script)
        grouped = {}
        for group in parser._action_groups:
            for action in group._group_actions:
                if action.help != "==SUPPRESS==" and action.dest != "help":
                    assert action.dest not in grouped, action.dest
                    assert group.title in titles, (action.dest, group.title)  # not argparse's "options"
                    grouped[action.dest] = titles[group.title]
        fields = {f.name for t in dataclass_types(script) for f in dataclasses.fields(t) if f.init}
        assert set(grouped) == fields
        assert set(grouped.values()) == set(HELP_GROUPS), script  # every group has flags
        headings = [line[:-1] for line in help_text(script, monkeypatch, capsys, 100).splitlines()
                    if line[:-1] in titles]
        assert headings == list(HELP_GROUPS.values())


@pytest.mark.parametrize("script", SCRIPTS)
def test_defaults_shown_once_and_only_when_informative(script, monkeypatch, capsys):
    blocks = option_blocks(help_text(script, monkeypatch, capsys, 100))
    for invocation, help_ in blocks.items():
        assert help_.lower().count("default") <= 1, invocation
        assert "(default: None)" not in help_ and "(default: False)" not in help_, invocation
    if script == "train_cls":
        assert blocks["--seed N"].endswith("(default: 42)")
        assert blocks["--[no_]group_by_length"].endswith("(default: on)")
        assert blocks["--overwrite_output_dir"].endswith("output_dir.")  # a switch that is off: no default
        assert blocks["--logging_steps N"].count("default") == 1  # its help explains the default: not repeated
        assert "--eval_strategy {epoch,steps,no}" in blocks  # short choices inline
        assert "linear, cosine, cosine_with_restarts" in blocks["--lr_scheduler_type NAME"]  # long ones in the text


def test_example_commands_stay_lines(monkeypatch, capsys):
    text = help_text("train_cls", monkeypatch, capsys, 100)
    assert "\n    accelerate launch train_cls.py --output_dir out      # no data flag: GLUE MRPC from the Hub\n" in text
    assert "\n    python train_cls.py --train_file train.csv --validation_file dev.csv --output_dir out\n" in text
    narrow = help_text("train_ner", monkeypatch, capsys, 80).splitlines()
    start = narrow.index("    # no data flag: CoNLL-2003 from the Hub")  # the comment goes above its command
    assert narrow[start + 1] == "    accelerate launch train_ner.py --output_dir out"
    assert narrow[start + 2].endswith(" \\") and narrow[start + 3].startswith("        --")


def test_command_lines_wrap_like_a_shell():
    line = "    python export.py --model out/mrpc --output_dir out/mrpc-onnx --quantize int8 --data dev.tsv  # note"
    for width in (30, 50, 78):
        lines = config._command_lines(line, width)
        assert all(len(x) <= width for x in lines), lines
        assert lines[0] == "    # note" and all(x.endswith(" \\") for x in lines[1:-1])
        assert " ".join(x.rstrip("\\").strip() for x in lines[1:]).split() == line.split("  #")[0].split()
    assert config._command_lines("    python train_cls.py", 40) == ["    python train_cls.py"]


def test_help_width_caps_and_falls_back(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert config._HelpFormatter("x")._width == 118
    monkeypatch.setenv("COLUMNS", "90")
    assert config._HelpFormatter("x")._width == 88


def test_script_help_from_a_pipe_is_100_columns():
    """The real command, as `python train_cls.py --help | less` runs it: no terminal, so 100 columns."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_cls.py"), "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= 100 and len(lines) <= MAX_LINES["train_cls"]
    for heading in ("model:", "data (files or a Hub dataset, columns, splits):", "training (steps, batches, "):
        assert any(line.startswith(heading) for line in lines), heading
    assert "--text_pair_column NAME" in proc.stdout and "alias --model_name_or_path" in proc.stdout


@pytest.mark.parametrize("label_all_tokens", [False, True])
def test_ner_model_card_suggests_first_aggregation(label_all_tokens, tmp_path):
    import train_ner

    ctx = SimpleNamespace(data_args=SimpleNamespace(label_all_tokens=label_all_tokens))
    card = train_ner.TASK.model_card(ctx, SimpleNamespace(state=SimpleNamespace(labels=["O", "B-PER", "I-PER"])))
    reporting.write_model_card(str(tmp_path), task="ner", base_model="m", data="d", results={}, labels=card["labels"],
                               pipeline_task="token-classification", example=card["example"])
    text = (tmp_path / "README.md").read_text()
    assert "aggregation_strategy='first'" in text and "simple" not in text
    assert ("the only piece training labels" in text) != label_all_tokens
    code = text.split("```python\n")[1].split("```")[0]
    compile(code, "card", "exec")  # the example, comment line included, is valid Python

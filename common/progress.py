"""Progress you can see wherever a run's output goes: tqdm bars with rate and ETA on terminals and in
notebooks, sparse progress lines through the logger when the output is a file, and one log line at the
start and end of every phase (`phase`). Only the local main process shows anything.

    configure("auto", is_local_main)   once per launch (--progress, or BERT_FINETUNE_PROGRESS)
    with phase("tokenizing train", "3,668 rows"):
        ...
    for batch in track(loader, "eval", unit="batch"):
        ...

Modes (`choose_mode`): "bar" (a text bar on stderr: terminals, `!python ...` in a notebook cell),
"widget" (the notebook's own bar, in a Jupyter/Colab kernel with ipywidgets), "lines" (log lines: every
10% of a long task, and at least once a minute) and "none".
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Optional

from .log import logger

MODES = ("auto", "bar", "lines", "none")
ENV = "BERT_FINETUNE_PROGRESS"
# Environment variables set in notebook kernels and inherited by what a cell starts (`!accelerate launch ...`).
NOTEBOOK_ENV = ("COLAB_RELEASE_TAG", "JPY_PARENT_PID")
# "lines" mode: nothing for a task shorter than this, then a line per 10% done and at least one per minute.
LINES_DELAY_SECONDS = 5.0
LINES_EVERY_SECONDS = 60.0
# datasets' own bars (tokenizing) only for files this large: a small file is done before a bar is read.
LIBRARY_BAR_ROWS = 20_000

_mode: Optional[str] = None  # set by configure(); None: decided on first use (a caller that never configured)
_text_bars = 0  # text bars open now: the outermost one sends log records through tqdm.write


def in_notebook(environ: Mapping[str, str], modules: Mapping) -> bool:
    """True in a Jupyter/Colab/Kaggle kernel, in processes it forked (notebook_launcher) and in commands a cell
    runs (they inherit the kernel's environment)."""
    if "ipykernel" in modules or "ipykernel.zmqshell" in modules:
        return True
    if environ.get("KAGGLE_KERNEL_RUN_TYPE") == "Interactive":  # "Batch": a saved run, written to a log
        return True
    return any(environ.get(name) for name in NOTEBOOK_ENV)


def widgets_work(modules: Mapping) -> bool:
    """The notebook's widget bar needs the kernel itself (a process notebook_launcher forked cannot
    display widgets) and ipywidgets."""
    import multiprocessing

    return ("ipykernel.zmqshell" in modules and multiprocessing.parent_process() is None
            and importlib.util.find_spec("ipywidgets") is not None)


def choose_mode(requested: str, is_local_main: bool, stream=None, environ: Optional[Mapping[str, str]] = None,
                modules: Optional[Mapping] = None, widgets: Optional[bool] = None) -> str:
    """The mode for this process: "bar", "widget", "lines" or "none". `requested` is --progress; "auto" takes
    BERT_FINETUNE_PROGRESS when set, else looks: a notebook -> its widget (or a text bar), a terminal (stderr
    is a TTY) -> a bar, anything else (a log file, CI) -> lines."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    stream = sys.stderr if stream is None else stream
    if requested == "auto" and environ.get(ENV):
        requested = environ[ENV].strip().lower()
        if requested not in MODES:
            logger.warning("%s=%s is not one of %s: ignored", ENV, environ[ENV], ", ".join(MODES))
            requested = "auto"
    if not is_local_main:
        return "none"
    if requested in ("lines", "none"):
        return requested
    notebook = in_notebook(environ, modules)
    if notebook and (widgets if widgets is not None else widgets_work(modules)):
        return "widget"
    if requested == "bar" or notebook or _isatty(stream):
        return "bar"
    return "lines"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def configure(requested: str, is_local_main: bool) -> str:
    """Set this process's mode (once per launch; a notebook may launch again with another); returns it."""
    global _mode, _text_bars
    _mode = choose_mode(requested, is_local_main)
    _text_bars = 0  # a bar an earlier launch left open (its loop ended by an error) does not count
    return _mode


def mode() -> str:
    """The configured mode; unconfigured (a function called on its own): chosen for a main process."""
    return _mode if _mode is not None else choose_mode("auto", True)


def shows_bars() -> bool:
    return mode() in ("bar", "widget")


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


def duration(seconds: float) -> str:
    """'8.2 s', '47 s', '3 min 05 s', '2 h 04 min'."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class Bar:
    """One task's progress: a tqdm bar, sparse log lines or nothing (see the module docstring). Counts in
    `unit`s; `postfix` values (the loss) show on the bar and at the end of a progress line."""

    def __init__(self, total: Optional[int], desc: str, unit: str = "step", initial: int = 0, leave: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.postfix: dict = {}
        self.lines = mode() == "lines"
        self.started = self.last_line = time.perf_counter()
        self.next_mark = self._mark_after(initial)
        self._redirect = contextlib.ExitStack()
        self.tqdm = self._tqdm(leave) if shows_bars() else None

    def _tqdm(self, leave: bool):
        kwargs = dict(total=self.total, desc=self.desc, unit=self.unit, initial=self.initial, leave=leave,
                      dynamic_ncols=True)
        if mode() == "widget":
            from tqdm import notebook

            if notebook.IProgress is not None:  # ipywidgets imported (a half-made widget bar errs when collected)
                try:
                    return notebook.tqdm(**kwargs)
                except Exception:  # noqa: BLE001 - a widget that cannot display: the text bar below
                    pass
        from tqdm.contrib.logging import logging_redirect_tqdm
        from tqdm.std import tqdm as text_tqdm

        global _text_bars
        if not _text_bars:  # log lines go above the bar (through tqdm.write), not into its line
            self._redirect.enter_context(logging_redirect_tqdm([logging.getLogger()], tqdm_class=text_tqdm))
        _text_bars += 1
        self._redirect.callback(_closed_text_bar)
        return text_tqdm(file=sys.stderr, **kwargs)

    def _mark_after(self, n: int) -> Optional[float]:
        """The next 10% boundary past n (a progress line is due there)."""
        if not self.total:
            return None
        return (math.floor(10 * n / self.total) + 1) / 10

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.tqdm is not None:
            self.tqdm.update(n)
        elif self.lines:
            self._maybe_line()

    def set_postfix(self, **values) -> None:
        self.postfix = values
        if self.tqdm is not None:
            self.tqdm.set_postfix(values, refresh=False)

    def _maybe_line(self) -> None:
        now = time.perf_counter()
        if now - self.started < LINES_DELAY_SECONDS or (self.total and self.n >= self.total):
            return  # short tasks and the end: the phase's own lines say it
        at_mark = self.next_mark is not None and self.n >= self.next_mark * self.total
        if at_mark or now - self.last_line >= LINES_EVERY_SECONDS:
            logger.info(self.line(now))
            self.last_line = now
            self.next_mark = self._mark_after(self.n)

    def line(self, now: Optional[float] = None) -> str:
        """'train: 46/115 steps (40%), 3.1 steps/s, ETA 22 s, loss=0.5123'."""
        elapsed = (now or time.perf_counter()) - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        units = plural(self.unit)
        parts = [f"{self.n}/{self.total} {units} ({100 * self.n / self.total:.0f}%)" if self.total
                 else f"{self.n} {units}"]
        parts.append(f"{rate:.3g} {units}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.3g} s/{self.unit}")
        if self.total and rate > 0:
            parts.append(f"ETA {duration((self.total - self.n) / rate)}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        return f"{self.desc}: " + ", ".join(parts)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
            self.tqdm = None
            self._redirect.close()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _closed_text_bar() -> None:
    global _text_bars
    _text_bars -= 1


def bar(total: Optional[int], desc: str, unit: str = "step", initial: int = 0, leave: bool = True) -> Bar:
    """A progress bar (or lines, or nothing: the configured mode decides); use it as a context manager."""
    return Bar(total, desc, unit, initial, leave)


def track(iterable: Iterable, desc: str, unit: str = "batch", total: Optional[int] = None,
          leave: bool = False) -> Iterator:
    """Iterate with a bar: `for batch in track(loader, "eval")`."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Bar(total, desc, unit, leave=leave) as progress:
        for item in iterable:
            yield item
            progress.update(1)


@dataclass
class Phase:
    """What a phase did: its duration once it ended, and a note for its end line ('from the cache')."""
    what: str
    seconds: float = 0.0
    note: str = ""


@contextlib.contextmanager
def phase(what: str, detail: str = "") -> Iterator[Phase]:
    """Log '<what> (<detail>) ...' now and '<what>: done in 3.2 s (<note>)' at the end. A phase that
    raises logs no end line: the error says what happened."""
    logger.info("%s%s ...", what, f" ({detail})" if detail else "")
    started = time.perf_counter()
    result = Phase(what)
    yield result
    result.seconds = time.perf_counter() - started
    logger.info("%s: done in %s%s", what, duration(result.seconds), f" ({result.note})" if result.note else "")


@contextlib.contextmanager
def library_bars(rows: int) -> Iterator[None]:
    """datasets' own progress bars (its map, while tokenizing) for a large input where bars show; off
    otherwise (a log file gets the phase lines instead)."""
    import datasets

    wanted = shows_bars() and rows >= LIBRARY_BAR_ROWS
    was = datasets.utils.logging.is_progress_bar_enabled()
    (datasets.utils.logging.enable_progress_bar if wanted else datasets.utils.logging.disable_progress_bar)()
    try:
        yield
    finally:
        (datasets.utils.logging.enable_progress_bar if was else datasets.utils.logging.disable_progress_bar)()

"""User-facing errors: one clear sentence, a non-zero exit, no traceback."""
from __future__ import annotations

import difflib
import os
import sys
from typing import Callable, Iterable, Sequence

# Exit codes the scripts use (documented in the README).
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved after SIGTERM/SIGINT; rerun to resume.


class UserError(Exception):
    """A mistake in the command line, the data or the environment that the user can fix.

    The message is shown as is, without a traceback, and the process exits with EXIT_USER_ERROR.
    """

    def _render_traceback_(self) -> list[str]:
        # IPython (Jupyter, Colab, Kaggle) shows what this returns in place of the traceback: a script's
        # main(argv) run in the kernel (notebook_launcher with one GPU or on the CPU) fails in one line too.
        return [f"error: {self}"]


class Diverged(UserError):
    """The training loss became NaN/inf: a run stops (a user error: the settings); a study marks the trial failed."""


def closest(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a candidate is close to `name`, else ''."""
    match = difflib.get_close_matches(name, [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def fmt_columns(columns: Sequence[str]) -> str:
    return ", ".join(f"'{c}'" for c in columns)


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a script's `main`, turning UserError into one line on stderr and exit code 2; a script run as the
    program (`python train_cls.py`) that finished leaves at once (leave)."""
    try:
        main(argv)
    except UserError as err:
        # Every rank raises the same error; print it once per machine.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    if getattr(main, "__module__", None) == "__main__":
        leave()


def leave() -> None:
    """Exit 0 as a normal exit does (the atexit handlers run, the streams are flushed), less the interpreter's
    tearing down of every module, which with torch, transformers and datasets loaded takes about a second
    (bench/whole_command.py: `after`). Not while another non-daemon thread runs (a tracker's writer): then the
    normal exit waits for it."""
    import atexit
    import threading

    if any(t is not threading.main_thread() and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return
    atexit._run_exitfuncs()  # what a normal exit runs (logging's flush, temporary folders, worker pools)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing left to flush
            pass
    os._exit(0)

"""The project's logger and the logging set-up of a run (one place, imported by everything else)."""
from __future__ import annotations

import logging
import sys
import warnings
from typing import Optional

logger = logging.getLogger("bert_finetune")


def setup_logging(is_local_main: bool, bars: Optional[bool] = None) -> None:
    """INFO on the local main process, warnings elsewhere. The libraries' own progress bars (downloads,
    datasets' map) follow ours: on where bars show (`bars`: progress.shows_bars(); unset: stderr is a
    terminal), off in a log file, where they would only add carriage-return noise. Idempotent: a multi-run
    job calls it once; a notebook calls it again for each launch."""
    level = logging.INFO if is_local_main else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=level,
                        stream=sys.stderr, force=True)
    logger.setLevel(level)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    if bars is None:
        bars = sys.stderr.isatty()
    on = is_local_main and bars
    import huggingface_hub.utils as hub_utils

    with warnings.catch_warnings():  # enabling warns when HF_*_DISABLE_PROGRESS_BARS is set: that wins, quietly
        warnings.simplefilter("ignore")
        (datasets.utils.logging.enable_progress_bar if on else datasets.utils.logging.disable_progress_bar)()
        (transformers.utils.logging.enable_progress_bar if on else transformers.utils.logging.disable_progress_bar)()
        (hub_utils.enable_progress_bars if on else hub_utils.disable_progress_bars)()

"""The project's logger and the logging set-up of a run (one place, imported by everything else)."""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("bert_finetune")


def setup_logging(is_local_main: bool) -> None:
    """INFO on the local main process, warnings elsewhere; library chatter and progress bars off when
    not on a terminal. Idempotent: a multi-run job calls it once."""
    level = logging.INFO if is_local_main else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=level,
                        stream=sys.stderr, force=True)
    logger.setLevel(level)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    if not (is_local_main and sys.stderr.isatty()):
        datasets.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        try:
            import huggingface_hub.utils as hub_utils

            hub_utils.disable_progress_bars()
        except Exception:  # pragma: no cover
            pass

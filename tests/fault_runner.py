"""Runs train_cls.py's CLI with a hang injected at one point, so a test can SIGKILL it there.

FAULT_POINT: train (after logging step FAULT_STEP), eval (entering an evaluation at FAULT_STEP),
checkpoint (checkpoint step_FAULT_STEP written to its temporary folder, not yet renamed),
die (rank 1 exits abruptly after logging step FAULT_STEP).
FAULT_MARKER: a file created when the process is parked at the fault point.
FAULT_RUN (optional): only in the run of a multi-run job whose folder has this name (e.g. seed_2).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.errors import run_cli  # noqa: E402
from common.training import checkpoint, loop  # noqa: E402

POINT, STEP, MARKER = os.environ["FAULT_POINT"], int(os.environ["FAULT_STEP"]), os.environ["FAULT_MARKER"]
RUN = os.environ.get("FAULT_RUN")


def in_run(eng) -> bool:
    return RUN is None or os.path.basename(os.path.normpath(eng.output_dir)) == RUN


def park():
    open(MARKER, "w").close()
    time.sleep(600)


if POINT == "train":
    original_record = loop.Trainer.record

    def record(self, values):
        original_record(self, values)
        if self.state.global_step == STEP and "loss" in values and in_run(self):
            park()

    loop.Trainer.record = record
elif POINT == "eval":
    original_evaluate = loop.Trainer.evaluate

    def evaluate(self, *args, **kwargs):
        if self.state.global_step == STEP:
            park()
        return original_evaluate(self, *args, **kwargs)

    loop.Trainer.evaluate = evaluate
elif POINT == "checkpoint":
    original_fsync = checkpoint._fsync_tree

    def fsync_tree(path):
        original_fsync(path)
        if os.path.basename(path) == f".tmp-step_{STEP}":
            park()

    checkpoint._fsync_tree = fsync_tree

elif POINT == "die":  # one rank of a multi-process run dies abruptly (as if OOM-killed)
    original_record = loop.Trainer.record

    def record(self, values):
        original_record(self, values)
        if self.state.global_step == STEP and "loss" in values and os.environ.get("RANK") == "1":
            open(MARKER, "w").close()
            os._exit(9)

    loop.Trainer.record = record

import train_cls  # noqa: E402

run_cli(train_cls.main)

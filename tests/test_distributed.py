"""Real multi-process runs on CPU (gloo): 2 ranks via `accelerate launch`, and 2 emulated machines."""
from __future__ import annotations

import csv
import glob
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import train_cls
from conftest import ROOT, run_script

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "accelerate_configs", "*.yaml")))
# Barely-moving weights: 1 and 2 processes must then evaluate (almost) the same model, so eval
# metrics must agree; the counts must agree exactly whatever the weights.
NEAR_FROZEN = ["--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--learning_rate", "1e-9",
               "--logging_steps", "2", "--eval_steps", "5", "--per_device_eval_batch_size", "7",
               "--checkpointing_steps", "4", "--mixed_precision", "no"]


def launch(*args):
    return [sys.executable, "-m", "accelerate.commands.launch", *args]


def data_args(tiny_model, files, out):
    return ["--model", tiny_model, "--train_file", files["train"], "--validation_file", files["dev"],
            "--output_dir", str(out)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(path)
    assert config.distributed_type in set(DistributedType)
    assert config.mixed_precision in ("no", "fp16", "bf16")


def check_against_single(one, out, processes, distributed_type="MULTI_CPU"):
    res = json.loads((out / "results.json").read_text())
    assert res["setup"]["num_processes"] == processes and res["setup"]["distributed_type"] == distributed_type
    # 240 training rows, batch 8: 30 batches on 1 process, 15 per process on 2
    assert one["train"]["global_step"] == 30 and res["train"]["global_step"] == 15
    assert res["eval"]["num_examples"] == one["eval"]["num_examples"] == 61
    for key in ("accuracy", "f1", "loss", "mcc"):
        assert res["eval"][key] == pytest.approx(one["eval"][key], abs=1e-4), key
    # every mid-epoch evaluation also saw each of the 61 rows exactly once
    with open(out / "log_history.jsonl") as fh:
        evals = [json.loads(line) for line in fh if "eval_loss" in line]
    assert [e["step"] for e in evals] == [5, 10, 15] and {e["eval_num_examples"] for e in evals} == {61}
    with open(out / "predictions_eval.csv") as fh:
        assert sorted(int(r["row_id"]) for r in csv.DictReader(fh)) == list(range(61))
    # the schedule is counted in optimizer steps after prepare(): linear with 10% warm-up, ending at 0
    for run_dir, total in ((out, 15), (one["_dir"], 30)):
        with open(run_dir / "log_history.jsonl") as fh:
            lrs = {r["step"]: r["learning_rate"] for r in map(json.loads, fh) if "learning_rate" in r}
        warm = -(-total // 10)
        expected = {k: 1e-9 * (k / warm if k < warm else (total - k) / (total - warm)) for k in lrs}
        assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-18) and lrs[total] == 0.0
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert ckpts == ["step_12", "step_4", "step_8"]  # written once each, no temporary leftovers
    # one copy of the state, written by the main process, and nothing pickled; FSDP's state is written by
    # accelerate (torch.save, read back with weights_only=True), its random-state pickles removed
    files = (["COMPLETE", "log_history.jsonl", "model.safetensors", "optimizer.safetensors", "trainer_state.json"]
             if distributed_type != "FSDP" else
             ["COMPLETE", "log_history.jsonl", "optimizer.bin", "pytorch_model_fsdp.bin", "trainer_state.json"])
    assert sorted(os.listdir(out / "checkpoints" / "step_8")) == files
    return res


@pytest.fixture(scope="module")
def single_run(tiny_model, sentiment_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    return train_cls.main(data_args(tiny_model, sentiment_files, out) + NEAR_FROZEN) | {"_dir": out}


def test_multi_gpu_launch_without_gpus_gives_two_real_ranks(tiny_model, sentiment_files, single_run, tmp_path):
    """`accelerate launch --multi_gpu` on a CPU-only machine, no ACCELERATE_USE_CPU: the engine makes it
    2 gloo ranks (plain accelerate would start 2 independent trainings writing to one folder)."""
    out = tmp_path / "two"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    cmd = launch("--config_file", os.path.join(ROOT, "accelerate_configs", "multi_gpu.yaml"), "--num_processes", "2",
                 "--main_process_port", str(free_port()), os.path.join(ROOT, "train_cls.py"),
                 *data_args(tiny_model, sentiment_files, out), *NEAR_FROZEN)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_against_single(single_run, out, 2)

    # A 2-process checkpoint resumes on 1 process: same sample order, schedule recomputed.
    resumed = tmp_path / "resumed"
    res = train_cls.main(data_args(tiny_model, sentiment_files, resumed) + NEAR_FROZEN +
                         ["--resume_from_checkpoint", str(out / "checkpoints" / "step_8")])
    # 8 steps x 2 processes x 8 = 128 samples seen -> 16 of 30 one-process batches done, 14 left
    assert res["train"]["global_step"] == 8 + 14
    assert res["eval"]["num_examples"] == 61


def launch_2(tiny_model, sentiment_files, out, args, *launcher_args, config="fsdp.yaml"):
    """2 CPU ranks through an accelerate config (fsdp.yaml as shipped: FSDP2, RAM-efficient loading)."""
    cmd = launch("--config_file", os.path.join(ROOT, "accelerate_configs", config), "--num_processes", "2",
                 "--main_process_port", str(free_port()), *launcher_args, os.path.join(ROOT, "train_cls.py"),
                 *data_args(tiny_model, sentiment_files, out), *args)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def saved_model_scores(out, sentiment_files):
    """Load the saved model the way a user would (from_pretrained, no loading gaps) and score the
    validation rows: (softmax probabilities in predictions_eval.csv order, rows, mean loss, accuracy)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tok = AutoTokenizer.from_pretrained(out)
    with open(out / "predictions_eval.csv") as fh:
        rows = list(csv.DictReader(fh))
    enc = tok([r["sentence"] for r in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**enc).logits
    labels = torch.tensor([model.config.label2id[r["gold"]] for r in rows])
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    return logits.softmax(-1), rows, loss, accuracy


def test_fsdp_on_two_cpu_ranks_shards_and_matches_one_process(tiny_model, sentiment_files, single_run, tmp_path):
    """The FSDP config trains for real on CPU ranks: results.json says FSDP, each rank holds about half
    of the parameters, evaluation sees every row once with the 1-process metrics, checkpoints are
    written once, and the saved model is the full model the run evaluated (loadable, same scores)."""
    out = tmp_path / "fsdp"
    res = launch_2(tiny_model, sentiment_files, out, NEAR_FROZEN)
    check_against_single(single_run, out, 2, distributed_type="FSDP")
    fsdp = res["setup"]["fsdp"]
    assert (fsdp["version"], fsdp["state_dict_type"], fsdp["cpu_ram_efficient_loading"]) == (2, "FULL_STATE_DICT",
                                                                                           True)
    total, per_rank = fsdp["parameters"], fsdp["parameters_per_process"]
    print(f"\nFSDP parameters per rank: {per_rank} of {total}")
    full_state = torch.load(out / "checkpoints" / "step_8" / "pytorch_model_fsdp.bin", weights_only=True)
    assert total == sum(t.numel() for t in full_state.values())  # the full-state checkpoint: every parameter
    assert sum(per_rank) == total and all(abs(n - total / 2) <= 0.01 * total for n in per_rank), per_rank
    assert len(res["timing"]["peak_rss_mb_per_process"]) == 2

    probs, rows, loss, accuracy = saved_model_scores(out, sentiment_files)
    reported = [[float(r["prob_neg"]), float(r["prob_pos"])] for r in rows]
    assert (probs - torch.tensor(reported)).abs().max() < 2e-6
    assert loss == pytest.approx(res["eval"]["loss"], abs=1e-5) and accuracy == pytest.approx(res["eval"]["accuracy"])


def test_fsdp_learns_like_ddp_and_resumes_exactly(tiny_model, sentiment_files, tmp_path):
    """A learning FSDP run (sharded torch.distributed.checkpoint checkpoints) ends where DDP with the
    same launch ends, and stopped at step 3 and resumed on 2 ranks it ends bit for bit where it ended
    uninterrupted. Its checkpoints cannot be resumed without FSDP: refused in one sentence."""
    from safetensors.torch import load_file

    learn = ["--max_steps", "6", "--learning_rate", "1e-3", "--per_device_train_batch_size", "8",
             "--checkpointing_steps", "3", "--eval_steps", "6", "--mixed_precision", "no"]
    sharded = ("--fsdp_state_dict_type", "SHARDED_STATE_DICT")
    full = launch_2(tiny_model, sentiment_files, tmp_path / "full", learn, *sharded)
    assert full["setup"]["fsdp"]["state_dict_type"] == "SHARDED_STATE_DICT"
    step_3 = tmp_path / "full" / "checkpoints" / "step_3"
    assert sorted(os.listdir(step_3 / "pytorch_model_fsdp_0")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    resumed = launch_2(tiny_model, sentiment_files, tmp_path / "resumed",
                       learn + ["--resume_from_checkpoint", str(step_3)], *sharded)
    ddp = launch_2(tiny_model, sentiment_files, tmp_path / "ddp", learn, config="multi_gpu.yaml")
    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in ("full", "resumed", "ddp")}
    start = load_file(os.path.join(tiny_model, "model.safetensors"))
    a = weights["full"]
    assert max((a[k] - start[k]).abs().max().item() for k in a if k in start) > 1e-3  # it did learn
    assert max((a[k] - weights["resumed"][k]).abs().max().item() for k in a) == 0.0
    assert resumed["eval"] == full["eval"] and resumed["train"]["global_step"] == 6
    assert ddp["setup"]["distributed_type"] == "MULTI_CPU"
    assert max((a[k] - weights["ddp"][k]).abs().max().item() for k in a) < 1e-6
    assert full["eval"]["loss"] == pytest.approx(ddp["eval"]["loss"], abs=1e-6)

    from common.errors import UserError

    with pytest.raises(UserError, match="holds FSDP SHARDED_STATE_DICT state and this run expects plain"):
        train_cls.main(data_args(tiny_model, sentiment_files, tmp_path / "plain") + learn +
                       ["--resume_from_checkpoint", str(step_3)])


def test_two_machines_on_loopback(tiny_model, sentiment_files, single_run, tmp_path):
    out = tmp_path / "nodes"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        cmd = launch("--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                     "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no",
                     "--dynamo_backend", "no", "--rdzv_backend", "static", "--same_network",
                     os.path.join(ROOT, "train_cls.py"), *data_args(tiny_model, sentiment_files, out), *NEAR_FROZEN)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    res = check_against_single(single_run, out, 2)
    assert res["setup"]["num_machines"] == 2


def test_launcher_world_size_without_process_group_is_refused(tiny_model, sentiment_files, tmp_path):
    """WORLD_SIZE=2 but nothing to rendezvous with (no launcher): a clear error, not a silent solo run."""
    out = tmp_path / "o"
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "ACCELERATE_USE_CPU": "0"}
    proc = run_script("train_cls.py",
                      data_args(tiny_model, sentiment_files, out) + NEAR_FROZEN + ["--ddp_timeout", "5"],
                      env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "could not join the 2-process group" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_notebook_launcher_two_processes_and_repeated_calls(tiny_model, sentiment_files, tmp_path):
    """notebook_launcher(main, (argv,), num_processes=2) trains with 2 real ranks; a second call in the
    same Python process works too (state is reset between runs). Run in a fresh interpreter, as a kernel."""
    code = f"""
import json, sys
sys.path.insert(0, {ROOT!r})
from accelerate import notebook_launcher
import train_cls
for i in range(2):
    out = {str(tmp_path)!r} + f"/nb{{i}}"
    argv = ["--model", {tiny_model!r}, "--train_file", {sentiment_files["train"]!r}, "--validation_file",
            {sentiment_files["dev"]!r}, "--output_dir", out, "--max_steps", "4", "--mixed_precision", "no"]
    notebook_launcher(train_cls.main, (argv,), num_processes=2, use_port="{free_port()}")
    r = json.load(open(out + "/results.json"))
    print("RESULT", r["setup"]["num_processes"], r["setup"]["distributed_type"], r["eval"]["num_examples"])
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("RESULT 2 MULTI_CPU 61") == 2, proc.stdout[-2000:]

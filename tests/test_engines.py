"""FSDP, DeepSpeed, XLA and devices the launch asks for: given, or refused in one sentence before any
file is written (common/training/engines.py, runtime.py), and the FSDP preparations of build.py.

The real 2-rank FSDP trainings are in test_distributed.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import train_cls
from common.errors import UserError
from common.training import engines
from common.training.build import check_fsdp_model, materialise_meta_parameters
from conftest import ROOT

ARGS = ["--max_steps", "2", "--mixed_precision", "no"]
LAUNCH_VARIABLES = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_TORCH_DEVICE",
                    "ACCELERATE_USE_MPS_DEVICE", "PJRT_DEVICE", "XRT_TPU_CONFIG", "ACCELERATE_USE_CPU", "WORLD_SIZE",
                    "LOCAL_RANK", "RANK")


def argv(tiny_model, files, out):
    return ["--model", tiny_model, "--train_file", files["train"], "--validation_file", files["dev"],
            "--output_dir", str(out), *ARGS]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FSDP_") and k not in LAUNCH_VARIABLES}
    return env | extra


def launch(*args):
    return [sys.executable, "-m", "accelerate.commands.launch", *args]


def config(name: str) -> str:
    return os.path.join(ROOT, "accelerate_configs", name)


def xla_installed() -> bool:
    from accelerate.utils import is_torch_xla_available

    return is_torch_xla_available()


def deepspeed_installed() -> bool:
    from accelerate.utils import is_deepspeed_available

    return is_deepspeed_available()


# ---------------------------------------------------------------------------------------------
# What the launch asked for
# ---------------------------------------------------------------------------------------------

def test_the_request_is_read_from_the_launchers_variables():
    read = engines.read_request
    assert read({}) == engines.Request()
    fsdp = read({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "false"})
    assert (fsdp.engine, fsdp.fsdp_version, fsdp.fsdp_offload_params) == ("FSDP", 2, False)
    assert read({"ACCELERATE_USE_FSDP": "true"}).fsdp_version == 1  # accelerate's default when unset
    ds = read({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    assert (ds.engine, ds.zero_stage) == ("DEEPSPEED", "3")
    assert read({"PJRT_DEVICE": "TPU"}).xla_variable == "PJRT_DEVICE=TPU"
    assert read({"ACCELERATE_TORCH_DEVICE": "cuda:1"}).device == "cuda"
    assert read({"ACCELERATE_USE_MPS_DEVICE": "True"}).device == "mps"
    # what accelerate launch sets for a plain DDP or one-process config asks for nothing more
    assert read({"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "no"}) == engines.Request()


def test_fsdp_on_cpu_ranks_needs_version_2_without_offload():
    engines.check(engines.Request("FSDP", fsdp_version=2), on_cpu=True)  # what fsdp.yaml asks for: fine
    engines.check(engines.Request("FSDP", fsdp_version=1, fsdp_offload_params=True), on_cpu=False)  # GPUs: accelerate's
    with pytest.raises(UserError, match=r"FSDP version 1 \(fsdp_version: 1\), which PyTorch runs only on GPU"):
        engines.check(engines.Request("FSDP", fsdp_version=1), on_cpu=True)
    with pytest.raises(UserError, match=r"fsdp_offload_params: true\), which pins them in page-locked memory"):
        engines.check(engines.Request("FSDP", fsdp_version=2, fsdp_offload_params=True), on_cpu=True)
    assert engines.fsdp_on_cpu(engines.Request("FSDP"), on_cpu=True)
    assert not engines.fsdp_on_cpu(engines.Request("FSDP"), on_cpu=False)


# ---------------------------------------------------------------------------------------------
# Refusals: one sentence, exit 2, nothing written (in process: the message; launched: once, no traceback)
# ---------------------------------------------------------------------------------------------

REFUSED = {
    "deepspeed": ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
                  "the accelerate config asks for DeepSpeed ZeRO-3 (distributed_type: DEEPSPEED), which needs GPUs, "
                  "and these processes run on the CPU (no GPU here, or use_cpu); for sharded training on CPU ranks "
                  "launch with accelerate_configs/fsdp.yaml"),
    "xla": ({"PJRT_DEVICE": "TPU"}, "the launch asks for XLA (PJRT_DEVICE=TPU) but torch_xla is not installed here"),
    "mps": ({"ACCELERATE_TORCH_DEVICE": "mps"},
            "the launch asks for an Apple MPS device (ACCELERATE_TORCH_DEVICE=mps) but this machine has none; unset "
            "it and launch with accelerate_configs/cpu.yaml"),
    "mps_legacy_flag": ({"ACCELERATE_USE_MPS_DEVICE": "true"},
                        "asks for an Apple MPS device (ACCELERATE_USE_MPS_DEVICE=true) but this machine has none"),
    "cuda": ({"ACCELERATE_TORCH_DEVICE": "cuda"}, "asks for a CUDA device (ACCELERATE_TORCH_DEVICE=cuda)"),
    "fsdp_v1": ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "LOCAL_RANK": "0"},
                "asks for FSDP version 1 (fsdp_version: 1), which PyTorch runs only on GPU-like devices"),
    "fsdp_offload": ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true",
                      "LOCAL_RANK": "0"}, "asks FSDP to offload parameters (fsdp_offload_params: true)"),
    "fsdp_without_launcher": ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
                              "asks for FSDP (ACCELERATE_USE_FSDP=true) but this process was not started by a "
                              "launcher; use `accelerate launch --config_file accelerate_configs/fsdp.yaml ...`"),
}


def machine_has(case: str) -> bool:
    gpu = torch.cuda.is_available()
    return {"deepspeed": gpu, "xla": xla_installed(), "mps": engines.device_available("mps"),
            "mps_legacy_flag": engines.device_available("mps"), "cuda": gpu, "fsdp_v1": gpu, "fsdp_offload": gpu,
            "fsdp_without_launcher": gpu}[case]


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_this_machine_cannot_give_is_refused_before_anything_is_written(case, tiny_model, sentiment_files,
                                                                           tmp_path, monkeypatch):
    if machine_has(case):
        pytest.skip("this machine can give it")
    env, message = REFUSED[case]
    for key in LAUNCH_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=re.escape(message)):
        train_cls.main(argv(tiny_model, sentiment_files, out))
    assert not out.exists()


def refused_once(proc, out, message: str) -> None:
    """Exit 2 from the script; the sentence printed once (local rank 0), no traceback from the script
    (the launcher then reports the failed ranks in its own words), no output folder."""
    assert proc.returncode != 0
    assert "exitcode  : 2" in proc.stderr or proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("error: ") == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert "[rank0]" not in proc.stderr and "[rank1]" not in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_fsdp_version_1_launched_on_cpu_ranks_is_refused_once(tiny_model, sentiment_files, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("FSDP1 runs on GPUs")
    out = tmp_path / "out"
    proc = subprocess.run(launch("--config_file", config("fsdp.yaml"), "--fsdp_version", "1", "--num_processes", "2",
                                 "--main_process_port", str(free_port()), os.path.join(ROOT, "train_cls.py"),
                                 *argv(tiny_model, sentiment_files, out)),
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    refused_once(proc, out, REFUSED["fsdp_v1"][1])


def test_deepspeed_launched_on_cpu_ranks_is_refused_once(tiny_model, sentiment_files, tmp_path):
    """What accelerate's DeepSpeed launcher starts (torchrun with ACCELERATE_USE_DEEPSPEED) on a machine
    where deepspeed is installed but there is no GPU: accelerate would train plain DDP; the scripts stop."""
    if torch.cuda.is_available():
        pytest.skip("DeepSpeed can run here")
    out = tmp_path / "out"
    env = clean_env(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    proc = subprocess.run([*torchrun, os.path.join(ROOT, "train_cls.py"), *argv(tiny_model, sentiment_files, out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    refused_once(proc, out, REFUSED["deepspeed"][1])


@pytest.mark.parametrize("name, missing", [("tpu.yaml", "No module named 'torch_xla'"),
                                           ("deepspeed_zero2.yaml", "DeepSpeed is not installed"),
                                           ("deepspeed_zero3.yaml", "DeepSpeed is not installed")])
def test_without_the_package_accelerate_launch_itself_stops(name, missing, tiny_model, sentiment_files, tmp_path):
    """tpu.yaml without torch_xla and the DeepSpeed configs without deepspeed: accelerate's launcher
    imports the package before starting the script and stops with its own message (documented in the
    configs' headers); nothing trains, nothing is written."""
    if (name == "tpu.yaml" and xla_installed()) or (name != "tpu.yaml" and deepspeed_installed()):
        pytest.skip("the package is installed")
    out = tmp_path / "out"
    proc = subprocess.run(launch("--config_file", config(name), os.path.join(ROOT, "train_cls.py"),
                                 *argv(tiny_model, sentiment_files, out)),
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and missing in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# FSDP preparations (build.py)
# ---------------------------------------------------------------------------------------------

class FakeState:
    def __init__(self, wrap, efficient=True):
        self.fsdp_plugin = type("Plugin", (), {"transformer_cls_names_to_wrap": wrap,
                                               "cpu_ram_efficient_loading": efficient})()


class FakeFsdpAccelerator:
    distributed_type = "FSDP"

    def __init__(self, wrap=("BertLayer",), efficient=True):
        self.state = FakeState(list(wrap) if wrap is not None else None, efficient)


def tiny(auto_class, tiny_model):
    return auto_class.from_pretrained(tiny_model, **({"num_labels": 2} if "Sequence" in auto_class.__name__ else {}))


def test_models_accelerates_fsdp_cannot_wrap_are_refused_before_training(tiny_model):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    for auto_class in (AutoModelForSequenceClassification, AutoModelForTokenClassification):
        check_fsdp_model(tiny(auto_class, tiny_model), FakeFsdpAccelerator())  # the classifiers shard
    mlm = tiny(AutoModelForMaskedLM, tiny_model)
    with pytest.raises(UserError, match=r"parameter cls\.predictions\.bias is also registered as "
                                        r"cls\.predictions\.decoder\.bias, and accelerate puts these names in "
                                        r"different fully_shard groups"):
        check_fsdp_model(mlm, FakeFsdpAccelerator())
    with pytest.raises(UserError, match=r"fsdp_transformer_layer_cls_to_wrap names RobertaLayer, which "
                                        r"BertForSequenceClassification does not have \(its blocks: BertEmbeddings, "
                                        r"BertLayer\)"):
        check_fsdp_model(tiny(AutoModelForSequenceClassification, tiny_model), FakeFsdpAccelerator(["RobertaLayer"]))
    check_fsdp_model(mlm, type("NotFsdp", (), {"distributed_type": "MULTI_CPU"})())  # DDP: nothing to check


def test_meta_parameters_get_distinct_storage_and_keep_their_ties(tiny_model):
    """Under RAM-efficient loading ranks > 0 hold the new head on meta; accelerate maps optimizer
    parameters to shards by storage address, so each needs its own (tied ones stay one parameter)."""
    from transformers import AutoModelForMaskedLM

    model = tiny(AutoModelForMaskedLM, tiny_model)
    emb = model.get_input_embeddings()
    emb.weight = torch.nn.Parameter(emb.weight.detach().to("meta"))
    model.get_output_embeddings().weight = emb.weight  # tied, like the loaded model
    head = model.cls.predictions.transform.dense
    head.weight = torch.nn.Parameter(head.weight.detach().to("meta"))
    assert materialise_meta_parameters(model, FakeFsdpAccelerator()) == 2
    assert not any(p.is_meta for p in model.parameters())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    pointers = [p.data_ptr() for p in model.parameters()]
    assert len(set(pointers)) == len(pointers)
    assert materialise_meta_parameters(model, FakeFsdpAccelerator()) == 0
    head.weight = torch.nn.Parameter(head.weight.detach().to("meta"))
    with pytest.raises(RuntimeError, match="nothing will broadcast their values"):
        materialise_meta_parameters(model, FakeFsdpAccelerator(efficient=False))

"""The Colab/Kaggle notebook (examples/colab_quickstart.ipynb): it is valid, its cells compile, cell 1 finds
or clones the project, and the launch gets its processes and precision from the device (common/runs/notebook.py),
passed to notebook_launcher and to the script. No GPU, TPU or network needed: the device is faked."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

from common.errors import UserError
from common.runs import notebook
from common.runs.notebook import launch_settings, parse_nvidia_smi, tpu_cores
from conftest import ROOT

NOTEBOOK = os.path.join(ROOT, "examples", "colab_quickstart.ipynb")


def code_cells() -> list[str]:
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return [c.source for c in nb.cells if c.cell_type == "code"]


def definitions(source: str) -> dict:
    """The imports, functions and classes a cell defines, without running its top-level statements."""
    tree = ast.parse(source)
    keep = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)
    namespace: dict = {}
    exec(compile(ast.Module([n for n in tree.body if isinstance(n, keep)], type_ignores=[]), "<cell>", "exec"),
         namespace)
    return namespace


def test_notebook_is_valid_and_every_code_cell_compiles():
    cells = code_cells()
    assert len(cells) == 4
    for i, source in enumerate(cells, 1):
        # Shell and magic lines are IPython's; none is needed now, but a cell with one must still compile.
        python = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("!", "%")))
        compile(python, f"cell {i}", "exec")
    assert "write_basic_config" not in "\n".join(cells)  # notebook_launcher never read the file it wrote


def test_launch_cell_passes_the_device_settings_to_launcher_and_script():
    """Cells 2 and 3 run with the device faked as Kaggle's 2xT4 and notebook_launcher captured: the launcher
    gets 2 processes and fp16, and so does the script's argv, which the script's own parser accepts."""
    import accelerate

    import train_cls
    from common.config import ModelArguments, TrainArguments, parse_args

    cells = code_cells()
    t4x2 = launch_settings(env={}, smi_output="0, GPU-a, Tesla T4, 7.5\n1, GPU-b, Tesla T4, 7.5\n")
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(notebook, "launch_settings", lambda: t4x2)
        mp.setattr(accelerate, "notebook_launcher", lambda *args, **kwargs: calls.append((args, kwargs)))
        namespace: dict = {}
        exec(compile(cells[1], "cell 2", "exec"), namespace)
        exec(compile(cells[2], "cell 3", "exec"), namespace)
    (function, (argv,)), kwargs = calls[0]
    assert function is train_cls.main
    assert kwargs == {"num_processes": 2, "mixed_precision": "fp16"}
    _, _, args = parse_args([ModelArguments, train_cls.TASK.data_arguments, TrainArguments], argv, "")
    assert args.mixed_precision == "fp16"  # the flag, for the launches that do not pass the launcher's on


T4 = "{i}, GPU-t{i}, Tesla T4, 7.5"
CASES = {
    "kaggle 2xT4": ("\n".join(T4.format(i=i) for i in range(2)), {}, 2, "fp16", "2 x Tesla T4"),
    "colab A100": ("0, GPU-a, NVIDIA A100-SXM4-40GB, 8.0", {}, 1, "bf16", "compute capability 8.0"),
    "8 x H100": ("\n".join(f"{i}, GPU-h{i}, NVIDIA H100 80GB HBM3, 9.0" for i in range(8)), {}, 8, "bf16",
                 "8 processes"),
    "V100": ("0, GPU-v, Tesla V100-SXM2-16GB, 7.0", {}, 1, "fp16", "bf16 only from 8.0"),
    "kaggle P100": ("0, GPU-p, Tesla P100-PCIE-16GB, 6.0", {}, 1, "fp16", "6.0"),
    "K80": ("0, GPU-k, Tesla K80, 3.7", {}, 1, "no", "too old"),
    "A100 + T4: the slower one decides": ("0, GPU-a, NVIDIA A100, 8.0\n" + T4.format(i=1), {}, 2, "fp16",
                                          "NVIDIA A100 + Tesla T4"),
    "CUDA_VISIBLE_DEVICES index": ("\n".join(T4.format(i=i) for i in range(4)), {"CUDA_VISIBLE_DEVICES": "1,3"},
                                   2, "fp16", "2 processes"),
    "CUDA_VISIBLE_DEVICES uuid": ("\n".join(T4.format(i=i) for i in range(4)), {"CUDA_VISIBLE_DEVICES": "GPU-t2"},
                                  1, "fp16", "1 process on"),
    "CUDA_VISIBLE_DEVICES empty: CPU": (T4.format(i=0), {"CUDA_VISIBLE_DEVICES": ""}, 1, "no", "CPU"),
    "no GPU, no TPU": ("", {}, 1, "no", "no GPU or TPU"),
    "colab TPU v2-8": ("", {"TPU_ACCELERATOR_TYPE": "v2-8", "PJRT_DEVICE": "TPU"}, 8, "bf16", "v2-8"),
    "kaggle TPU v3-8": ("", {"TPU_NAME": "local", "KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, 8, "bf16",
                        "TPU_NAME=local"),
    "TPU v4-8: 4 devices": ("", {"TPU_ACCELERATOR_TYPE": "v4-8", "TPU_NAME": "x"}, 4, "bf16", "4 processes"),
}


@pytest.mark.parametrize("case", CASES)
def test_launch_settings_from_the_device(case):
    smi, env, processes, precision, said = CASES[case]
    got = launch_settings(env=env, smi_output=smi, gpu_count=lambda: 0, xla_installed=True)
    assert (got.num_processes, got.mixed_precision) == (processes, precision), got.line
    assert said in got.line
    assert "\n" not in got.line


def test_a_tpu_only_colab_names_gets_pjrt_set_for_the_launcher():
    """notebook_launcher takes its TPU path on TPU_NAME or PJRT_DEVICE=TPU only; else it would start 8 CPU
    processes. The settings carry the variable for the cell to set."""
    assert launch_settings(env={"COLAB_TPU_ADDR": "10.0.0.2:8470"}, smi_output="", gpu_count=lambda: 0,
                           xla_installed=True).env == {"PJRT_DEVICE": "TPU"}
    assert launch_settings(env={"TPU_NAME": "t"}, smi_output="", gpu_count=lambda: 0, xla_installed=True).env == {}
    assert launch_settings(env={"PJRT_DEVICE": "CPU"}, smi_output="", gpu_count=lambda: 0).num_processes == 1


def test_a_tpu_without_torch_xla_is_one_sentence():
    with pytest.raises(UserError, match=r"TPU runtime \(TPU_NAME=t\).*torch_xla is not installed"):
        launch_settings(env={"TPU_NAME": "t"}, smi_output="", gpu_count=lambda: 0, xla_installed=False)


def test_tpu_cores():
    assert [tpu_cores(t) for t in ("v2-8", "v3-8", "v4-8", "v5p-8", "v5litepod-8", "v6e-4", "v3-32", "tpu")] == \
        [8, 8, 4, 4, 8, 4, 8, None]


def _fake_smi(monkeypatch, answers):
    """subprocess.run inside common.runs.notebook answers from `answers` (an exception, or (code, out, err))."""
    asked = []

    def run(command, **kwargs):
        asked.append(command[1])
        answer = answers[len(asked) - 1]
        if isinstance(answer, BaseException):
            raise answer
        return subprocess.CompletedProcess(command, answer[0], answer[1], answer[2])

    monkeypatch.setattr(notebook.subprocess, "run", run)
    return asked


@pytest.mark.parametrize("count, expected", [(0, (1, "no")), (2, (2, "fp16"))])
def test_without_nvidia_smi_torch_counts_and_fp16_is_the_safe_choice(monkeypatch, count, expected):
    _fake_smi(monkeypatch, [FileNotFoundError("nvidia-smi")])
    got = launch_settings(env={}, gpu_count=lambda: count)
    assert (got.num_processes, got.mixed_precision) == expected
    if count:
        assert "compute capability unknown" in got.line and "nvidia-smi did not run" in got.line


def test_an_old_driver_without_compute_cap_is_asked_again(monkeypatch):
    asked = _fake_smi(monkeypatch, [(2, "", 'Field "compute_cap" is not a valid field to query.'),
                                    (0, "0, GPU-a, Tesla T4\n1, GPU-b, Tesla T4\n", "")])
    got = launch_settings(env={}, gpu_count=lambda: pytest.fail("nvidia-smi listed the GPUs"))
    assert asked == ["--query-gpu=index,uuid,name,compute_cap", "--query-gpu=index,uuid,name"]
    assert (got.num_processes, got.mixed_precision) == (2, "fp16")


def test_nvidia_smi_without_devices_or_hanging_means_no_gpu(monkeypatch):
    _fake_smi(monkeypatch, [(6, "No devices were found", ""), (6, "No devices were found", "")])
    assert launch_settings(env={}, gpu_count=lambda: 0).mixed_precision == "no"
    _fake_smi(monkeypatch, [subprocess.TimeoutExpired("nvidia-smi", 30)])
    assert launch_settings(env={}, gpu_count=lambda: 0).num_processes == 1


def test_mig_devices_nvidia_smi_cannot_name_are_counted_by_torch():
    got = launch_settings(env={"CUDA_VISIBLE_DEVICES": "MIG-1234"}, smi_output=T4.format(i=0),
                          gpu_count=lambda: 1)
    assert (got.num_processes, got.mixed_precision) == (1, "fp16")


def test_parse_nvidia_smi_skips_what_is_not_a_row():
    gpus = parse_nvidia_smi("0, GPU-a, NVIDIA L4, 8.9\n\nwarning\n1, GPU-b, NVIDIA L4, [N/A]\n")
    assert [(g.index, g.name, g.capability) for g in gpus] == [("0", "NVIDIA L4", (8, 9)), ("1", "NVIDIA L4", None)]


def test_the_helper_leaves_torch_alone_when_nvidia_smi_answers():
    """The kernel must reach notebook_launcher with CUDA uninitialised: the helper imports no torch at all."""
    code = ("import sys; from common.runs.notebook import launch_settings; "
            "s = launch_settings(env={}, smi_output='0, GPU-a, Tesla T4, 7.5'); print(s.mixed_precision, "
            "'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["fp16", "False"], proc.stderr[-2000:]


@pytest.mark.parametrize("capability, expected", [((7, 5), ("fp16", "auto: CUDA without native bf16")),
                                                  ((7, 0), ("fp16", "auto: CUDA without native bf16")),
                                                  ((8, 0), ("bf16", "auto: CUDA, eager steps")),
                                                  ((9, 0), ("bf16", "auto: CUDA, eager steps"))])
def test_auto_precision_on_cuda_wants_native_bf16(monkeypatch, capability, expected):
    """torch.cuda.is_bf16_supported() is True on a T4 (emulation): `auto` must still choose fp16 there."""
    from common.training.runtime import resolve_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert resolve_precision(None, torch.device("cuda")) == expected  # the model's size unknown (tests/test_capture.py)
    assert resolve_precision("bf16", torch.device("cuda"))[0] == "bf16"  # asked for: given (with a warning)


def test_user_errors_show_as_one_line_in_ipython():
    assert UserError("no such column 'x'")._render_traceback_() == ["error: no such column 'x'"]


# Cell 1: finding the project


def _project(folder) -> str:
    os.makedirs(os.path.join(folder, "common"), exist_ok=True)
    for name in ("train_cls.py", "requirements.txt", os.path.join("common", "__init__.py")):
        open(os.path.join(folder, name), "w").close()
    return str(folder)


def test_find_project_looks_in_order_and_needs_the_scripts_and_common(tmp_path, monkeypatch):
    find_project = definitions(code_cells()[0])["find_project"]
    _project(tmp_path / "upload" / "bert-finetune-main")
    _project(tmp_path / "home" / "my-fork")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train_cls.py").write_text("")  # no common/: not the project
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert find_project([str(tmp_path / "half"), str(tmp_path / "upload" / "*"), "~/*"]) == \
        str(tmp_path / "upload" / "bert-finetune-main")
    assert find_project([str(tmp_path / "nothing" / "*"), "~/*"]) == str(tmp_path / "home" / "my-fork")
    assert find_project([str(tmp_path / "half"), str(tmp_path / "none")]) is None


def test_cell_1_commands_fail_in_one_line():
    names = definitions(code_cells()[0])
    with pytest.raises(names["Stop"]) as stop:
        names["run"]([sys.executable, "-c", "import sys; print('noise'); sys.exit('fatal: repository not found')"],
                     "git clone x")
    assert str(stop.value) == "git clone x failed: fatal: repository not found"
    assert stop.value._render_traceback_() == ["Stop: git clone x failed: fatal: repository not found"]


def _run_cell_1(tmp_path, monkeypatch, repo_url: str):
    """Cell 1 as it is, in an empty folder with an empty home; pip is recorded, not run."""
    if any(os.path.exists(p) for p in ("/content", "/kaggle")):
        pytest.skip("a Colab/Kaggle machine: the cell would look there first")
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("BERT_FINETUNE_REPO", repo_url)
    monkeypatch.setattr(sys, "path", list(sys.path))
    real_run, pip = subprocess.run, []

    def run(command, **kwargs):
        if "pip" in command:
            pip.append(command)
            return subprocess.CompletedProcess(command, 0, "", "")
        return real_run(command, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    namespace: dict = {}
    exec(compile(code_cells()[0], "cell 1", "exec"), namespace)
    return namespace, pip


def test_cell_1_clones_repo_url_when_the_project_is_nowhere(tmp_path, monkeypatch):
    source = _project(tmp_path / "source")
    git = ["git", "-C", source, "-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "x"]):
        subprocess.run(git + command, check=True, capture_output=True)
    namespace, pip = _run_cell_1(tmp_path, monkeypatch, f"file://{source}")
    clone = str(tmp_path / "work" / "bert-finetune")
    assert namespace["root"] == clone and os.getcwd() == clone and sys.path[0] == clone
    assert pip == [[sys.executable, "-m", "pip", "install", "-q", "-r", os.path.join(clone, "requirements.txt")]]


def test_cell_1_says_what_to_set_when_there_is_nothing_to_find(tmp_path, monkeypatch):
    with pytest.raises(Exception, match="upload its folder, add it to this Kaggle notebook as a data set, or set "
                                        "REPO_URL at the top of this cell") as stop:
        _run_cell_1(tmp_path, monkeypatch, "")
    assert len(stop.value._render_traceback_()) == 1

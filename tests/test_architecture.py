"""The project's shape, checked: layers in common/ import one way (no cycle, lazy imports included),
the training loop stays short and shallow, the scripts stay small, and the one private accelerate
call the loop relies on still does what we use it for."""
from __future__ import annotations

import ast
import os

from conftest import ROOT

COMMON = os.path.join(ROOT, "common")


def import_graph() -> dict[str, set[str]]:
    """module -> common modules it imports (at top level or inside functions)."""
    graph = {}
    for name in sorted(os.listdir(COMMON)):
        if not name.endswith(".py") or name == "__init__.py":
            continue
        module = name[:-3]
        tree = ast.parse(open(os.path.join(COMMON, name), encoding="utf-8").read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("common"):
                parts = node.module.split(".")
                deps.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        graph[module] = deps - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_common_has_no_import_cycle():
    graph = import_graph()
    print("\n" + "\n".join(f"{m} -> {', '.join(sorted(d)) or '-'}" for m, d in graph.items()))
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    # the layers named in docs/architecture.md, top to bottom
    assert "repeats" not in graph["single_run"] and "launch" not in graph["repeats"]
    assert not graph["log"] and not graph["errors"]
    assert graph["notebook"] <= {"errors"}  # read by a notebook kernel before anything else is imported
    assert graph["progress"] == {"log"}  # bars and phase lines: used by the loop, data, export alike
    assert "loop" not in graph["task"] and "single_run" not in graph["loop"]
    # a trained model's data settings, reused by launch and export.py: reading only, no engine
    assert graph["run_settings"] <= {"data", "errors", "files", "reporting"}
    # --no_do_train on an export.py folder: beside the loop, under single_run; nothing but single_run imports it
    assert graph["onnx_predict"] <= {"build", "evaluation", "onnx_export", "task", "errors", "log", "progress"}
    assert [m for m, deps in graph.items() if "onnx_predict" in deps] == ["single_run"]


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _function(path: str, cls: str, name: str) -> ast.FunctionDef:
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == name)
    raise AssertionError(f"{cls}.{name} not found")


def _depth(node, level=0) -> int:
    blocks = (ast.For, ast.While, ast.If, ast.With, ast.Try, ast.AsyncFor, ast.AsyncWith)
    deepest = level
    for child in ast.iter_child_nodes(node):
        deepest = max(deepest, _depth(child, level + 1 if isinstance(child, blocks) else level))
    return deepest


def test_the_training_loop_reads_top_to_bottom():
    train = _function(os.path.join(COMMON, "loop.py"), "Trainer", "train")
    length = train.end_lineno - train.lineno + 1
    depth = _depth(train)
    print(f"\nTrainer.train: {length} lines, nesting depth {depth}")
    assert length <= 90, length
    assert depth <= 3, depth
    assert not any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "hasattr" for n in ast.walk(train))


def test_scripts_stay_small():
    for script in ("train_cls.py", "train_ner.py", "train_mlm.py"):
        with open(os.path.join(ROOT, script), encoding="utf-8") as fh:
            lines = sum(1 for _ in fh)
        assert lines <= 300, (script, lines)


def test_set_sync_gradients_still_drives_accelerate():
    """The loop's one private accelerate call: if accelerate renames or changes it, this fails."""
    from accelerate import Accelerator

    from common.runtime import reset_accelerate_state, set_sync_gradients

    reset_accelerate_state()
    acc = Accelerator(cpu=True, gradient_accumulation_steps=4)
    try:
        set_sync_gradients(acc, False)
        assert acc.sync_gradients is False and acc.gradient_state.sync_gradients is False
        set_sync_gradients(acc, True)
        assert acc.sync_gradients is True
    finally:
        reset_accelerate_state()


def test_fsdp_on_cpu_ranks_still_takes_accelerates_fsdp2_path(monkeypatch):
    """runtime.use_fsdp_on_cpu_ranks makes accelerate's FSDP engine drive CPU (gloo) ranks by doing what
    AcceleratorState does for GPUs. If accelerate changes that state (or starts doing it itself), this
    tells: the distributed type, the FSDP2 switch, and prepare() returning sharded (DTensor) parameters
    in both the model and the optimizer."""
    import socket

    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch import nn
    from torch.distributed.tensor import DTensor

    from common.runtime import reset_accelerate_state, shutdown, use_fsdp_on_cpu_ranks

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                       "FSDP_AUTO_WRAP_POLICY": "NO_WRAP"}.items():
        monkeypatch.setenv(key, value)
    reset_accelerate_state()
    plugin = FullyShardedDataParallelPlugin()
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    try:
        use_fsdp_on_cpu_ranks(acc, plugin)
        assert acc.distributed_type == DistributedType.FSDP and acc.is_fsdp2
        assert PartialState().distributed_type == DistributedType.FSDP and acc.device.type == "cpu"
        model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
        model, optimizer = acc.prepare(model, torch.optim.AdamW(model.parameters()))
        assert all(isinstance(p, DTensor) for p in model.parameters())
        assert all(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"])
    finally:
        shutdown(acc)

"""The project's shape, checked: common's folders (layers) import one way (no cycle, lazy imports included),
the training loop stays short and shallow, the scripts stay small, and the one private accelerate
call the loop relies on still does what we use it for."""
from __future__ import annotations

import ast
import os

from conftest import ROOT

COMMON = os.path.join(ROOT, "common")
# common/'s folders, top to bottom (docs/architecture.md, "Layers"): a module imports from its own folder and the
# folders below it; the leaves at common/ itself ("") import only each other.
LAYERS = {"runs": 4, "shipping": 3, "training": 2, "data": 1, "": 0}


def module_files() -> dict[str, str]:
    """Dotted module name under common/ ("training.loop", "config") -> its file, in common/ and its folders."""
    found = {}
    for folder, dirs, files in os.walk(COMMON):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        package = os.path.relpath(folder, COMMON).replace(os.sep, ".").strip(".")
        for name in sorted(files):
            if name.endswith(".py") and name != "__init__.py":
                found[f"{package}.{name[:-3]}".strip(".")] = os.path.join(folder, name)
    return found


def imported_modules(node: ast.AST, package: list[str]) -> set[str]:
    """The common modules one import statement in `package` (its folders under common/) names."""
    if isinstance(node, ast.Import):
        return {".".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith("common.")}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        parts = package[:len(package) + 1 - node.level] + (node.module.split(".") if node.module else [])
    elif (node.module or "").split(".")[0] == "common":
        parts = node.module.split(".")[1:]
    else:
        return set()
    if os.path.isdir(os.path.join(COMMON, *parts)):  # `from ..data import ner`: the names are modules
        return {".".join([*parts, alias.name]) for alias in node.names}
    return {".".join(parts)}


def import_graph() -> dict[str, set[str]]:
    """module -> common modules it imports (at top level or inside functions)."""
    graph = {}
    for module, path in module_files().items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        package = module.split(".")[:-1]
        deps = set().union(*(imported_modules(node, package) for node in ast.walk(tree)))
        graph[module] = deps - {module}
    return graph


def layer(module: str) -> str:
    return module.rpartition(".")[0]


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(module, import) pairs where a module imports from a folder above its own."""
    return sorted((m, d) for m, deps in graph.items() for d in deps if LAYERS[layer(d)] > LAYERS[layer(m)])


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
    # every import names a module file, and every module sits in one of the folders of LAYERS
    assert set().union(*graph.values()) <= set(graph), set().union(*graph.values()) - set(graph)
    assert {layer(m) for m in graph} <= set(LAYERS), {layer(m) for m in graph} - set(LAYERS)
    # the folders: runs -> shipping -> training -> data -> the leaves, never upwards
    assert not upward_imports(graph), upward_imports(graph)
    # the layers named in docs/architecture.md, top to bottom
    assert "runs.repeats" not in graph["runs.single_run"] and "runs.launch" not in graph["runs.repeats"]
    assert not graph["log"] and not graph["errors"]
    assert graph["runs.notebook"] <= {"errors"}  # read by a notebook kernel before anything else is imported
    assert graph["progress"] == {"log"}  # bars and phase lines: used by the loop, data, export alike
    assert "training.loop" not in graph["task"] and "runs.single_run" not in graph["training.loop"]
    # a trained model's data settings, reused by launch and export.py: reading only, no engine
    assert graph["runs.run_settings"] <= {"data.loading", "errors", "files", "runs.reporting"}
    # --no_do_train on an export.py folder: beside the loop, under single_run; nothing but single_run imports it
    assert graph["shipping.onnx_predict"] <= {"training.build", "training.evaluation", "shipping.onnx_export", "task",
                                              "errors", "log", "progress"}
    assert [m for m, deps in graph.items() if "shipping.onnx_predict" in deps] == ["runs.single_run"]
    # a hyperparameter study (docs/hpo.md): above the runs it makes, entered from launch only; its space reads settings
    assert [m for m, deps in graph.items() if "runs.study" in deps] == ["runs.launch"]
    assert {"runs.single_run", "runs.repeats", "runs.search_space"} <= graph["runs.study"]
    assert graph["runs.search_space"] <= {"config", "errors"}


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_layer_check_finds_an_upward_import():
    assert upward_imports({"data.ner": {"training.models", "errors"}, "training.models": {"data.ner"},
                           "errors": {"runs.launch"}}) == [("data.ner", "training.models"), ("errors", "runs.launch")]
    assert upward_imports({"runs.launch": {"shipping.inference", "data.ner", "config"}}) == []


def test_the_graph_resolves_relative_and_absolute_imports():
    tree = ast.parse("from . import loop\nfrom .. import log, progress\nfrom ..data import ner\n"
                     "from ..data.collate import PadCollator\nfrom common.shipping import inference\n"
                     "from common.config import parse_args\nimport common.runs.launch\nimport os\n")
    found = set().union(*(imported_modules(node, ["training"]) for node in tree.body))
    assert found == {"training.loop", "log", "progress", "data.ner", "data.collate", "shipping.inference", "config",
                     "runs.launch"}


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
    train = _function(os.path.join(COMMON, "training", "loop.py"), "Trainer", "train")
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

    from common.training.runtime import reset_accelerate_state, set_sync_gradients

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

    from common.training.runtime import reset_accelerate_state, shutdown, use_fsdp_on_cpu_ranks

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

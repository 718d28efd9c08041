"""The package's shape: no import cycles, no reach-ins to DeeLM's private
attributes, and long modules say why they are long."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "deelm"
LONG = 600  # lines


def modules():
    """{module name: path} of every .py file in the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts)] = path
    return found


def imports(name, path, known):
    """Modules of the package `name` imports anywhere in its file (lazy
    imports inside functions count: they are cycles all the same)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def test_no_import_cycles():
    known = modules()
    # a package's __init__ only gathers its public names; cycles through it are not design
    graph = {n: {t for t in imports(n, p, known) if not known[t].name == "__init__.py"}
             for n, p in known.items() if p.name != "__init__.py"}
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_inference_never_imports_training():
    known = modules()
    reach, todo = set(), ["deelm.model"]
    while todo:
        n = todo.pop()
        if n in reach:
            continue
        reach.add(n)
        todo.extend(imports(n, known[n], known))
    assert not {n for n in reach if n.startswith("deelm.train")}, sorted(reach)


def test_no_private_reach_ins():
    """Outside model.py nothing touches DeeLM's underscored attributes."""
    private = {"_core", "_file", "_pool_range", "_adapter_path", "_adapter", "_pooling"}
    bad = []
    for name, path in modules().items():
        if name == "deelm.model":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in private
                    and isinstance(node.value, ast.Name) and node.value.id in ("model", "m")):
                bad.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    assert not bad


def test_long_modules_say_why():
    for name, path in modules().items():
        n = len(path.read_text().splitlines())
        if n > LONG:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert f"Over ~{LONG} lines" in doc, f"{name} has {n} lines and no reason at its top"


@pytest.mark.parametrize("old, name", [("deelm.lora", "LoraConfig"), ("deelm.lora", "save_adapter"),
                                       ("deelm.evaluation", "TASKS"), ("deelm.mteb_tasks", "sts_tasks"),
                                       ("deelm.default_model", "bundled_adapters"),
                                       ("deelm.model_file", "read_model"), ("deelm.train_data", "Triplets")])
def test_old_module_paths_still_import_with_a_warning(old, name):
    import importlib
    import sys

    import deelm
    from deelm._moved import MOVED

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="is now"):
        module = importlib.import_module(old)
    new = [importlib.import_module(t) for t in MOVED[old]]
    assert getattr(module, name) is next(getattr(m, name) for m in new if hasattr(m, name))
    with pytest.raises(AttributeError, match="has no attribute"):
        module.not_a_name
    assert deelm.analysis is importlib.import_module("deelm.eval.analysis")


# the Python that calls the C core for every batch: encode, the trainer's step
HOT_PATH_CALLERS = ("deelm.model", "deelm.inputs", "deelm.train.trainer", "deelm.train.losses",
                    "deelm.similarity")


@pytest.mark.parametrize("name", HOT_PATH_CALLERS)
def test_hot_path_callers_have_short_functions(name):
    """At most ~80 lines of code per function (docstrings not counted)."""
    path = modules()[name]
    long = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if ast.get_docstring(node) is not None:
                n -= node.body[0].end_lineno - node.body[0].lineno + 1
            if n > 80:
                long.append(f"{node.name}: {n} lines")
    assert not long


def test_model_files_import_nothing_above_them():
    """deelm.io reads files; adapters, the model, training and evaluation sit above it."""
    known = modules()
    above = ("deelm.adapters", "deelm.model", "deelm.train", "deelm.eval", "deelm.saved_model")
    for name, path in known.items():
        if name.startswith("deelm.io"):
            bad = [t for t in imports(name, path, known) if t.startswith(above)]
            assert not bad, f"{name} imports {bad}"

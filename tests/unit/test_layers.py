"""The package's layers (issue 33): every module imports only from its own layer's package or layers below, read
from the code itself (ast), so a new upward import fails here with the line that makes it.

L0 errors, io, config · L1 archs, data, encoders, llm, connectors · L2 model · L3 objectives, infer · L4 train, eval, convert,
serve · L5 tiny, cli and the package root. Backbone names such as `tiny:llama` reach the parts through a scheme
that vlmkit.tiny registers with vlmkit.io (L0), so nothing below L5 imports vlmkit.tiny."""
from __future__ import annotations

import ast
from pathlib import Path

import vlmkit

LAYERS = {"errors": 0, "io": 0, "config": 0, "archs": 1, "data": 1, "encoders": 1, "llm": 1, "connectors": 1,
          "model": 2, "objectives": 3, "infer": 3, "train": 4, "eval": 4, "convert": 4, "serve": 4, "tiny": 5, "cli": 5,
          "__main__": 5, "": 5}
# imports that still go up, each with the issue item that removes it; the list only ever shrinks
KNOWN_UPWARD: set = set()
ROOT = Path(vlmkit.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def vlmkit_imports(path: Path) -> list[tuple[str, int]]:
    """(module imported, line) for every `import vlmkit.x` / `from vlmkit.x import y` in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("vlmkit.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("vlmkit."):
                found.append((node.module, node.lineno))
            elif node.module == "vlmkit":  # `from vlmkit import tiny`
                found += [(f"vlmkit.{alias.name}", node.lineno) for alias in node.names]
    return found


def test_every_package_has_a_layer():
    packages = {package(module_name(p)) for p in ROOT.rglob("*.py")}
    assert packages <= set(LAYERS), sorted(packages - set(LAYERS))


def test_no_module_imports_from_a_layer_above_its_own():
    upward, seen = [], set()
    for path in sorted(ROOT.rglob("*.py")):
        source = module_name(path)
        for target, line in vlmkit_imports(path):
            if LAYERS.get(package(target), 0) > LAYERS[package(source)]:
                seen.add((source, target))
                if (source, target) not in KNOWN_UPWARD:
                    upward.append(f"{path.relative_to(ROOT.parent)}:{line}: {source} (L{LAYERS[package(source)]}) "
                                  f"imports {target} (L{LAYERS[package(target)]})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)
    assert KNOWN_UPWARD <= seen, f"no longer imported, remove from KNOWN_UPWARD: {sorted(KNOWN_UPWARD - seen)}"


def test_the_module_level_imports_have_no_circle():
    graph = {}
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text())
        targets = set()
        for node in tree.body:  # module level only: an import inside a function runs after both modules loaded
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("vlmkit."):
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("vlmkit.")}
        graph[module_name(path)] = {t for t in targets if t != module_name(path)}
    state, circles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    # a package's __init__ importing its own submodules (to register them) is how a registry fills, not a circle
    circles = [c for c in circles if len({package(m) for m in c}) > 1 or not any(m.count(".") == 1 for m in c)]
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_tiny_names_resolve_through_the_registered_scheme():
    from vlmkit.io import resolve_name
    from vlmkit.tiny import PREFIX, tiny_dir

    assert PREFIX == "tiny:"
    assert resolve_name("org/model") == "org/model" and resolve_name(None) is None
    assert resolve_name("tiny:tokenizer", verbose=False) == str(tiny_dir("tokenizer"))


def test_an_import_inside_a_function_says_why():
    """Modules import at module level; an import inside a function (outside cli.py, whose commands import what they
    run) must say on its line why: an optional dependency, or start-up time. A third-party start-up reason must be
    measured (benchmarks/import_times.py: at least 50 ms after torch)."""
    import json
    import re

    measured = json.loads((ROOT.parent / "benchmarks" / "results" / "import_times.json").read_text())
    cost = {}  # a package's cost: its dearest measured module (`from huggingface_hub import hf_hub_download` loads
    for row in measured["modules"]:  # huggingface_hub.file_download, not just the lazy package root)
        if row["seconds"] is not None:
            top = row["module"].split(".")[0]
            cost[top] = max(cost.get(top, 0), row["seconds"])
    unexplained, unmeasured = [], []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "cli.py":
            continue
        lines = path.read_text().splitlines()

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                    text = " ".join(lines[child.lineno - 1:child.end_lineno])
                    where = f"{path.relative_to(ROOT.parent)}:{child.lineno}: {lines[child.lineno - 1].strip()}"
                    why = re.search(r"#.*\b(start-up|optional)\b", text)
                    module = (child.module if isinstance(child, ast.ImportFrom) else child.names[0].name) or ""
                    top = module.split(".")[0]
                    if not why:
                        unexplained.append(where)
                    elif why.group(1) == "start-up" and top not in ("vlmkit", "torch") and cost.get(top, 0) < 0.05:
                        unmeasured.append(f"{where} ({top}: {cost.get(top, 'not measured')} s)")
                visit(child, inside)
        visit(ast.parse("\n".join(lines)), False)
    assert not unexplained, "imports inside functions without a reason on the line:\n" + "\n".join(unexplained)
    assert not unmeasured, "start-up reasons that benchmarks/import_times.py does not show:\n" + "\n".join(unmeasured)
    assert measured["torch_seconds"] > 0.05  # what the `vlmkit` and `torch` start-up reasons cite

"""The package's one-way layers (DESIGN.md "Layout"): a module imports only from its own package
or from a layer below, and never imports one of ours inside a function (the usual way to hide a
cycle). Checked on the source with `ast`, so it needs no import of the package."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "bow_jax"

# Layer of each top-level part of the package, bottom (0) to top.
LAYERS = {
    "lib": 0,
    "models": 1, "bow": 1, "data": 1,
    "methods": 2,
    "protocols": 3, "export": 3, "pretrain": 3,
    "tasks": 4,
    "config": 5,
    "main": 6,
}


def part_of(module: str) -> str:
    """'bow_jax.lib.files' -> 'lib'; 'bow_jax' -> '' (the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(node: ast.AST, package: str):
    """bow_jax modules named by an Import / ImportFrom node (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "bow_jax"]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                            + ([base] if base else []))
        if base.split(".")[0] != "bow_jax":
            return []
        # `from bow_jax import tasks` names the module bow_jax.tasks.
        return [f"{base}.{a.name}" if base == "bow_jax" else base for a in node.names]
    return []


def sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        yield name, package, ast.parse(path.read_text(), filename=str(path))


def violations():
    found = []
    for name, package, tree in sources():
        mine = part_of(name)
        for node in ast.walk(tree):
            for target in imported_modules(node, package):
                other = part_of(target)
                if other == mine or other not in LAYERS or mine not in LAYERS:
                    continue
                if LAYERS[other] >= LAYERS[mine]:
                    found.append(f"{name} imports {target} ({mine} is layer {LAYERS[mine]}, "
                                 f"{other} is layer {LAYERS[other]})")
    return found


def function_level_imports():
    found = []
    for name, package, tree in sources():
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                for target in imported_modules(node, package):
                    found.append(f"{name}.{func.name} imports {target}")
    return found


def test_every_part_of_the_package_has_a_layer():
    parts = {part_of(name) for name, _, _ in sources()} - {""}
    assert parts <= set(LAYERS), f"parts without a layer: {sorted(parts - set(LAYERS))}"


def test_imports_point_only_down_the_layers():
    assert violations() == []


def test_no_import_of_ours_inside_a_function():
    assert function_level_imports() == []


@pytest.mark.parametrize("source, expected", [
    ("from bow_jax.tasks import common\n", ["lib.x imports bow_jax.tasks"]),
    ("from bow_jax import pretrain\n", ["lib.x imports bow_jax.pretrain"]),
    ("def f():\n    from bow_jax.lib import files\n", []),
])
def test_the_checker_sees_upward_imports(source, expected):
    """The check itself can fail: an upward import in a lib module is reported."""
    tree = ast.parse(source)
    found = [f"lib.x imports {t}" for node in ast.walk(tree)
             for t in imported_modules(node, "bow_jax.lib")
             if LAYERS[part_of(t)] >= LAYERS["lib"] and part_of(t) != "lib"]
    assert found == expected


MAX_FUNCTION_LINES = 60


def long_functions():
    found = []
    for name, _, tree in sources():
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = func.end_lineno - func.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{name}.{func.name}: {lines} lines")
    return found


def test_functions_stay_short():
    """Short functions named from the papers: none in the package over ~60 lines (docstring
    included)."""
    assert long_functions() == []


def test_no_module_name_is_repeated_across_the_package():
    """A name says its layer: `tasks/train.py` runs `pretrain.py`, not another `train.py`
    (imports of two `common` or `interface` modules needed aliases)."""
    names = [p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    assert sorted({n for n in names if names.count(n) > 1}) == []

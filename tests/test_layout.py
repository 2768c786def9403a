"""The package's layering, read from its import graph (README: "How the code is organised").

Layers, lowest first; a module may import its own layer and lower ones, never a higher one. No
module imports another module's private names, and only the CLI (which keeps `jais2 --help` free
of JAX) and the package's own `__init__` import package modules inside functions.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "jais2_jax"
LAYERS = ("utils", "kernels", "model", "parallel", "checkpoint", "inference", "evaluation",
          "training", "planning", "serving", "cli")
TOP = LAYERS.index("cli")  # `jais2_jax` itself, the public facade: beside the CLI, above the rest


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield path, ".".join(parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return TOP
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module}: not inside a layer package {LAYERS}")
    return LAYERS.index(parts[1])


def _imports(tree: ast.Module):
    """(imported module, imported names, inside a function?) of every jais2_jax import."""
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("jais2_jax"):
                yield child.module, [a.name for a in child.names], inner, child.lineno
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("jais2_jax"):
                        yield alias.name, [], inner, child.lineno
            yield from visit(child, inner)
    yield from visit(tree, False)


def _graph():
    for path, module in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for target, names, in_function, line in _imports(tree):
            yield path, module, target, names, in_function, line, tree


def test_every_module_sits_in_a_layer():
    stray = [m for _, m in _modules() if m != "jais2_jax" and m.split(".")[1] not in LAYERS]
    assert not stray, f"modules outside the layer packages: {stray}"


def test_no_layer_imports_a_higher_one():
    bad = []
    for path, module, target, names, _, line, _ in _graph():
        targets = [target]
        if target == "jais2_jax":  # `from jais2_jax import training`: the subpackage
            targets = [f"jais2_jax.{n}" if n in LAYERS else "jais2_jax" for n in names]
        for t in targets:
            if _layer(t) > _layer(module):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {module} "
                           f"({LAYERS[_layer(module)] if _layer(module) < TOP else 'api'}) "
                           f"imports {t}")
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def test_no_module_uses_another_modules_private_names():
    bad = []
    for path, module, target, names, _, line, tree in _graph():
        if target == module:
            continue
        bad += [f"{path.relative_to(ROOT.parent)}:{line}: {name} from {target}"
                for name in names if name.startswith("_")]
    for path, module in _modules():  # `mod._name` on an imported package module
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for target, names, _, _ in _imports(tree):
            for n in names:
                aliases[n] = f"{target}.{n}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.attr.startswith("_") and not node.attr.startswith("__") and \
                    node.value.id in aliases:
                bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: "
                           f"{node.value.id}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_package_imports_inside_functions_only_in_the_cli():
    bad = [f"{path.relative_to(ROOT.parent)}:{line}: {target}"
           for path, module, target, _, in_function, line, _ in _graph()
           if in_function and not module.startswith("jais2_jax.cli") and module != "jais2_jax"]
    assert not bad, "package imports inside functions (hide the dependency graph):\n" + \
        "\n".join(bad)


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_alone(layer):
    """Importing a layer loads nothing above it (checked in a fresh interpreter)."""
    import subprocess
    import sys
    code = (f"import sys, jais2_jax.{layer}; "
            f"higher = {list(LAYERS[LAYERS.index(layer) + 1:])!r}; "
            "loaded = [m for m in sys.modules if m.startswith('jais2_jax.') and "
            "m.split('.')[1] in higher]; print(loaded); assert not loaded, loaded")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout + proc.stderr

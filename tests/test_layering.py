"""Import layering of the package (module-level imports only; a function-level import is a
deliberate deferral): no cycles, and the op layer (``oneref.ops``, ``kernels``) never imports
the model, data, training, evaluation or command layers."""

import ast
from pathlib import Path

import oneref
import oneref.kernels

ROOT = Path(oneref.__file__).resolve().parent
KERNELS = Path(oneref.kernels.__file__).resolve().parent  # kernels/ (installed as oneref.kernels)
OP_LAYER = ("oneref.ops", "oneref.kernels")
ABOVE_OPS = ("oneref.model", "oneref.data", "oneref.train", "oneref.eval", "oneref.cli",
             "oneref.ablation", "oneref.sts", "oneref.sources", "oneref.checkpoints",
             "oneref.bench")


def _module_name(path: Path, root: Path, package: str) -> str:
    name = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(name[:-1] if name[-1] == "__init__" else name)


def _modules() -> dict[str, Path]:
    found = {_module_name(p, ROOT, "oneref"): p for p in ROOT.rglob("*.py")}
    found.update({_module_name(p, KERNELS, "oneref.kernels"): p for p in KERNELS.rglob("*.py")})
    return found


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _top_level_imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Package modules imported at module level (``if TYPE_CHECKING`` blocks excluded)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, node, path.name == "__init__.py")
                names = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, (ast.If, ast.Try)):
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                continue
            else:
                continue
            for name in names:
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    found.add(name)

    visit(tree.body)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _top_level_imports(m, p, known) for m, p in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle (a list of modules, first == last), or []."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):
                continue  # a package importing its own submodule is not a cycle
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return []


def test_the_graph_sees_the_package():
    graph = _graph()
    assert "oneref.model.oneref" in graph and "oneref.kernels.layer_norm" in graph
    assert "oneref.ops" in graph["oneref.model.encoder"]


def test_no_import_cycles_at_module_level():
    cycle = _cycle(_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_op_layer_imports_nothing_above_it():
    wrong = {m: sorted(t for t in targets if t.startswith(ABOVE_OPS))
             for m, targets in _graph().items() if m.startswith(OP_LAYER)}
    wrong = {m: t for m, t in wrong.items() if t}
    assert not wrong, f"op-layer modules importing the layers above: {wrong}"


def test_the_cycle_search_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"a.b"}, "a.b": set()}) == []


def _function_level_imports(module: str, path: Path) -> set[str]:
    """Package modules imported inside functions of ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.ImportFrom):
                names = [_resolve(module, node, path.name == "__init__.py")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found.update(n for n in names if n.startswith("oneref"))
    return found


def test_function_level_imports_only_defer_a_package_attribute():
    """Inside a function the package imports itself only in a package ``__init__`` (which
    loads a heavy submodule on first use and says why); everything else imports at module
    level, where the layering above is checked."""
    wrong = {m: sorted(_function_level_imports(m, p)) for m, p in _modules().items()
             if p.name != "__init__.py"}
    wrong = {m: names for m, names in wrong.items() if names}
    assert not wrong, f"function-level package imports (move them to module level): {wrong}"

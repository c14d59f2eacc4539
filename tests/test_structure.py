"""The package's import structure, read from the source with ``ast`` (imports inside
functions included, ``if TYPE_CHECKING:`` blocks left out: they never run):

- the model layer (``cratelm.model``) imports only ``cratelm.config`` and ``cratelm.kernels``
  (and itself): it never sees training, data, checkpoints or the CLI;
- no import cycles between the package's modules;
- every torch.distributed collective goes through ``cratelm.dist`` (which puts the tensor
  on the device the process group's backend needs).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cratelm"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "all_to_all",
               "all_to_all_single", "broadcast", "broadcast_object_list", "gather", "gather_object", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list", "barrier", "send",
               "recv", "isend", "irecv", "monitored_barrier"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _nodes(tree: ast.AST):
    """Every node that runs: ``if TYPE_CHECKING:`` bodies are skipped."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str) -> dict[str, int]:
    """cratelm modules imported by module ``name`` -> the line of the first import."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in _nodes(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for t in targets:
            if t.split(".")[0] == "cratelm" and t != name:
                while t not in MODULES:                  # `import cratelm.x.y` of a name: its module
                    t = t.rpartition(".")[0]
                found.setdefault(t, node.lineno)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def edge(a: str, b: str) -> str:
    return f"{MODULES[a].relative_to(PKG.parent)}:{GRAPH[a][b]} imports {b}"


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_model_imports_only_config_and_kernels():
    allowed = ("cratelm.model", "cratelm.config", "cratelm.kernels")
    model = [a for a in GRAPH if _within(a, ("cratelm.model",))]
    bad = [edge(a, b) for a in model for b in GRAPH[a] if not _within(b, allowed)]
    assert not bad, "\n".join(bad)
    # nor through them: what the model reaches is the model, the config (and its YAML reader), the kernels
    seen, todo = set(model), list(model)
    while todo:
        for b in GRAPH[a := todo.pop()]:
            if not _within(b, allowed + ("cratelm.yaml_config",)):
                bad.append(edge(a, b))
            elif b not in seen:
                seen.add(b)
                todo.append(b)
    assert not bad, "\n".join(bad)


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle [a, b, ..., a], or None."""
    state: dict[str, int] = {}                      # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle:\n" + "\n".join(edge(a, b) for a, b in zip(cycle, cycle[1:]))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 1}}) is None


def test_edges_are_read_from_every_kind_of_import():
    # a lazy import inside a function, `from pkg import module`, and TYPE_CHECKING left out
    assert "cratelm.train.trainer" in GRAPH["cratelm.train"]                     # inside train()
    assert "cratelm.train.checkpoint" in GRAPH["cratelm.train.trainer"]          # from cratelm.train import checkpoint
    assert "cratelm.model.generate" not in GRAPH["cratelm.model.mssa"]          # TYPE_CHECKING only


def direct_collectives(name: str) -> list[str]:
    """Calls like ``dist.all_reduce(...)`` / ``torch.distributed.barrier()`` in module ``name``,
    and collectives imported by name from torch.distributed."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names if a.name in COLLECTIVES]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in aliases:
                found.append(f"{path.relative_to(PKG.parent)}:{node.lineno} calls {owner}.{node.func.attr}")
    return found


def test_every_collective_goes_through_cratelm_dist():
    bad = [hit for name in MODULES if name != "cratelm.dist" for hit in direct_collectives(name)]
    assert not bad, "call the helpers of cratelm/dist.py instead:\n" + "\n".join(bad)
    assert direct_collectives("cratelm.dist"), "the checker finds dist.py's own calls"

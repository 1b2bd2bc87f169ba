"""The layout's rules, checked on the source: imports point down, the CLI edge is a leaf.

- no import circle among gpt2tf's modules (counting every import, function-local ones too);
- no module outside gpt2tf.cli imports gpt2tf.cli;
- model, encoder, kv_cache, the sampler and the decode loop do no I/O (they import no file, network or OS module).
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "gpt2tf"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != name and not name.startswith(t + "."):
                    graph[name].add(t)  # (a package's own __init__ is no edge from inside it)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles():
    graph = _graph()
    assert len(graph) > 20  # the walk found the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_a_cycle_would_be_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_nothing_in_the_library_imports_the_cli_edge():
    offenders = {m: sorted(t for t in deps if t == "gpt2tf.cli" or t.startswith("gpt2tf.cli."))
                 for m, deps in _graph().items()
                 if m != "gpt2tf.cli" and not m.startswith("gpt2tf.cli.")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_pure_modules_do_no_io():
    io_modules = {"io", "pathlib", "shutil", "tempfile", "socket", "requests", "open",
                  "gpt2tf.fileio", "gpt2tf.source", "gpt2tf.checkpoints"}
    for name in ("model", "encoder", "kv_cache", "decode/pick", "decode/engine"):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        calls = {n.func.id for n in ast.walk(tree)
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not (imported | calls) & io_modules, name
        os_uses = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                   and isinstance(n.value, ast.Name) and n.value.id == "os"}
        assert os_uses <= {"cpu_count"}, (name, os_uses)  # counting cores is not I/O

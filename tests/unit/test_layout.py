"""The package's shape: stages import downstream only, the runtime is a leaf, the API is documented."""

import ast
import pathlib

import adatoken_compile

PKG = pathlib.Path(adatoken_compile.__file__).parent


def _module_level_imports():
    """{module: set of adatoken_compile modules it imports at module level (not inside functions)}."""
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        deps = set()
        tree = ast.parse(path.read_text())
        for node in tree.body:
            stmts = [node]
            if isinstance(node, ast.If):  # TYPE_CHECKING blocks and the like stay top level
                stmts = node.body + node.orelse
            for s in stmts:
                if isinstance(s, ast.ImportFrom) and s.module and s.level == 0 and s.module.startswith("adatoken_compile"):
                    deps.add(s.module)
                    deps.update(f"{s.module}.{a.name}" for a in s.names)
                elif isinstance(s, ast.Import):
                    deps.update(a.name for a in s.names if a.name.startswith("adatoken_compile"))
        out[name] = deps
    return {m: {d for d in ds if d in out and d != m} for m, ds in out.items()}


def test_no_import_cycles_between_modules():
    graph = _module_level_imports()
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_runtime_is_a_leaf():
    """The runtime imports only itself, the artifact format, the schedule, the errors and the strict
    file readers every input goes through; those import nothing else of the package."""
    graph = _module_level_imports()
    leaves = ("adatoken_compile.errors", "adatoken_compile.readers")
    allowed = ("adatoken_compile.runtime", "adatoken_compile.artifact", "adatoken_compile.schedule", *leaves)
    for m in leaves:
        assert graph[m] <= {"adatoken_compile.errors"}, f"{m} imports {sorted(graph[m])}"
    runtime = [m for m in graph if m.startswith("adatoken_compile.runtime")]
    assert runtime
    for m in runtime:
        bad = {d for d in graph[m] if not d.startswith(allowed) and d != "adatoken_compile"}
        assert not bad, f"{m} imports {sorted(bad)}"


def test_public_api_is_declared_and_documented_with_examples():
    names = adatoken_compile.__all__
    for n in ("load_model", "calibrate", "compile", "load", "generate", "evaluate", "bench", "compare"):
        assert n in names
        doc = getattr(adatoken_compile, n).__doc__ or ""
        assert "Example" in doc or ">>>" in doc, n

"""The package's shape: stages import downstream only, the runtime is a leaf, the API is documented."""

import ast
import pathlib

import adatoken_compile

PKG = pathlib.Path(adatoken_compile.__file__).parent


def _module_level_imports():
    """{module: set of adatoken_compile modules it imports at module level (not inside functions)},
    relative imports (``from ..arch import x``) resolved against the importing module's package."""
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        is_pkg = rel.name == "__init__"
        name = ".".join(rel.parts[:-1] if is_pkg else rel.parts)
        package = name if is_pkg else name.rpartition(".")[0]
        deps = set()
        tree = ast.parse(path.read_text())
        for node in tree.body:
            stmts = [node]
            if isinstance(node, ast.If):  # TYPE_CHECKING blocks and the like stay top level
                stmts = node.body + node.orelse
            for s in stmts:
                if isinstance(s, ast.ImportFrom):
                    if s.level:
                        base = package.split(".")[: len(package.split(".")) - (s.level - 1)]
                        module = ".".join(base + ([s.module] if s.module else []))
                    else:
                        module = s.module or ""
                    if module.startswith("adatoken_compile"):
                        # ``from <own package> import x`` (``from . import x``) loads x: the package
                        # itself is already loading, so it is no dependency
                        if not name.startswith(module + "."):
                            deps.add(module)
                        deps.update(f"{module}.{a.name}" for a in s.names)
                elif isinstance(s, ast.Import):
                    deps.update(a.name for a in s.names if a.name.startswith("adatoken_compile"))
        out[name] = deps
    return {m: {d for d in ds if d in out and d != m} for m, ds in out.items()}


def test_relative_imports_are_counted():
    graph = _module_level_imports()
    assert "adatoken_compile.arch" in graph["adatoken_compile.runtime.engine"]
    assert "adatoken_compile.runtime.engine" in graph["adatoken_compile.runtime"]


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


# what the runtime install (numpy + onnxruntime + tokenizers, no torch) may load of the package: the
# runtime itself, the artifact format, and the torch-free modules those read -- the schedule (with
# its selection rules), the normalised architecture, the errors, the strict file readers and the
# atomic writers
RUNTIME_ALLOWED = ("adatoken_compile.runtime", "adatoken_compile.artifact", "adatoken_compile.schedule",
                   "adatoken_compile.selection", "adatoken_compile.arch", "adatoken_compile.errors",
                   "adatoken_compile.readers", "adatoken_compile.io")


def test_the_runtime_is_a_leaf():
    """Everything the runtime loads, directly or through what it imports, is in ``RUNTIME_ALLOWED``;
    the errors and the file readers import nothing else of the package."""
    graph = _module_level_imports()
    for m in ("adatoken_compile.errors", "adatoken_compile.readers"):
        assert graph[m] <= {"adatoken_compile.errors"}, f"{m} imports {sorted(graph[m])}"
    runtime = [m for m in graph if m.startswith("adatoken_compile.runtime")]
    assert runtime
    seen, todo = set(), list(runtime)
    while todo:
        m = todo.pop()
        for d in graph[m]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    bad = {d for d in seen if not d.startswith(RUNTIME_ALLOWED) and d != "adatoken_compile"}
    assert not bad, f"the runtime loads {sorted(bad)}"
    # and every allowed module is one the runtime does load (the list says what is, not what might be)
    assert all(any(d.startswith(a) for d in seen | set(runtime)) for a in RUNTIME_ALLOWED), sorted(seen)


def test_public_api_is_declared_and_documented_with_examples():
    names = adatoken_compile.__all__
    for n in ("load_model", "calibrate", "compile", "load", "generate", "evaluate", "bench", "compare"):
        assert n in names
        doc = getattr(adatoken_compile, n).__doc__ or ""
        assert "Example" in doc or ">>>" in doc, n

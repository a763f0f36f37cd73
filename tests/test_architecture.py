"""The layout holds: imports point one way, light entry points stay light, options live once."""

import ast
import dataclasses
import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rat_lens
from rat_lens.options import TraceOptions

PACKAGE = Path(rat_lens.__file__).parent
# The one import allowed to point up the layers: a notebook shows a result by asking it.
DOCUMENTED_EXCEPTIONS = {("rat_lens.result", "rat_lens.render")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every rat_lens module ``name`` imports, at module level or inside functions (code under
    ``if TYPE_CHECKING:`` never runs and is skipped), with the packages each one implies."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import mod`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    out = set()
    for target in found:
        parts = target.split(".")
        # importing a.b.c runs a/__init__ and a/b/__init__ too (rat_lens itself is lazy)
        out.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    # The packages holding ``name`` are already importing when it runs: no edge to them.
    ancestors = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
    return {m for m in out if m in known and m != name and m not in ancestors}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    graph = {name: imports_of(name, path, set(found)) for name, path in found.items()}
    for source, target in DOCUMENTED_EXCEPTIONS:
        graph[source].discard(target)
    return graph


def find_cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def walk(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_no_import_cycle_functions_included():
    graph = import_graph()
    assert len(graph) > 20 and graph["rat_lens.tracer"] >= {
        "rat_lens.capture",
        "rat_lens.search.beam",
    }
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    graph = import_graph()
    graph["rat_lens.result"].add("rat_lens.summary.build")  # what result.summary() used to do
    assert find_cycle(graph) is not None


BOTTOM = [
    "rat_lens.errors",
    "rat_lens.options",
    "rat_lens.schema",
    "rat_lens.result",
    "rat_lens.text",
    "rat_lens.sankey",
    "rat_lens.files",
]


@pytest.mark.parametrize("bottom", BOTTOM)
def test_the_bottom_imports_nothing_above_it(bottom):
    allowed = set(BOTTOM)
    assert import_graph()[bottom] <= allowed


@pytest.fixture
def small_trace():
    import torch

    from rat_lens.result import BeamPath, TraceResult, build_sankey, path_text

    attn = torch.tensor([[1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.1, 0.6, 0.3]])
    tokens = ["<bos>", " cat", " sat"]
    beams = [BeamPath.from_beam(b, tokens, [0, 1, 2]) for b in rat_lens.trace_attention(attn)]
    return TraceResult(
        3,
        2,
        0,
        5,
        5,
        tokens,
        beams,
        build_sankey(beams, tokens, "chain", 0),
        [path_text(b) for b in beams],
    )


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_help_version_and_render_load_neither_torch_nor_transformer_lens(tmp_path, small_trace):
    saved = tmp_path / "saved.json"
    saved.write_text(small_trace.to_json())
    code = f"""
import sys, rat_lens.cli
from rat_lens.cli import main
for argv in (["--help"], ["--version"], ["render", "--help"], ["trace", "--help"]):
    try:
        main(argv)
    except SystemExit as done:
        assert done.code == 0, (argv, done.code)
assert main(["render", {str(saved)!r}, "-o", {str(tmp_path / "page")!r}]) == 0
heavy = sorted(m for m in ("torch", "transformer_lens", "transformers") if m in sys.modules)
print("HEAVY", heavy)
"""
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    assert (tmp_path / "page" / "index.html").read_text().count("<script") >= 2


def test_import_rat_lens_is_lazy(tmp_path):
    code = """
import sys, rat_lens
assert "torch" not in sys.modules and "transformer_lens" not in sys.modules
assert callable(rat_lens.verify) and callable(rat_lens.trace) and callable(rat_lens.summarize)
assert "transformer_lens" in sys.modules
print(sorted(n for n in rat_lens.__all__ if not hasattr(rat_lens, n)))
"""
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_submodule_is_shadowed_by_a_name_of_the_package():
    submodules = {m.name for m in pkgutil.iter_modules([str(PACKAGE)])}
    assert not submodules & set(rat_lens.__all__)
    for name in submodules:
        importlib.import_module(f"rat_lens.{name}")
    assert callable(rat_lens.verify) and inspect.ismodule(rat_lens.causal)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = rat_lens.nope


# The pipeline, bottom up: a module imports only from its own layer or the ones below
# (function-level imports included). CONTRIBUTING.md and docs/contributing.md draw it.
LAYERS = [
    ["rat_lens.errors"],
    ["rat_lens.options", "rat_lens.text", "rat_lens.sankey", "rat_lens.files"],
    ["rat_lens.schema", "rat_lens.result"],
    ["rat_lens.search"],
    ["rat_lens.models", "rat_lens.capture", "rat_lens.lens"],
    ["rat_lens.plan", "rat_lens.roles"],
    ["rat_lens.record"],
    ["rat_lens.assemble"],
    ["rat_lens.tracer"],
    ["rat_lens.summary", "rat_lens.causal"],
    ["rat_lens.render"],
    ["rat_lens.corpus", "rat_lens.compat"],
    ["rat_lens.cli"],
]


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in layer):
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS: add it where it belongs")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)})"
        for source, targets in graph.items()
        if source != "rat_lens"  # the package's lazy names reach everything, on first use
        for target in targets
        if layer_of(target) > layer_of(source)
    )


def test_imports_point_down_the_declared_layers():
    assert upward_imports(import_graph()) == []


def test_the_layer_check_finds_an_upward_import_that_makes_no_cycle():
    graph = import_graph()
    graph["rat_lens.capture"].add("rat_lens.summary.text")  # no cycle, but upward
    assert find_cycle(graph) is None
    assert upward_imports(graph) == [
        "rat_lens.capture (layer 4) imports rat_lens.summary.text (layer 9)"
    ]


MAX_LINES = 60
LONG_ALLOWED = {("rat_lens.cli", "_parser")}  # argparse construction: one flag per statement


def code_lines(function: ast.AST, lines: list[str]) -> int:
    """Lines of code in ``function``: its docstring, comments and blank lines aside."""
    body = function.body
    docstring = (
        range(body[0].lineno, body[0].end_lineno + 1)
        if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        else range(0)
    )
    return sum(
        1
        for number in range(function.lineno, function.end_lineno + 1)
        if number not in docstring and lines[number - 1].strip()[:1] not in ("", "#")
    )


def long_functions() -> list[str]:
    found = []
    for name, path in modules().items():
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = code_lines(node, text.splitlines())
                if n > MAX_LINES and (name, node.name) not in LONG_ALLOWED:
                    found.append(f"{name}.{node.name}: {n} lines")
    return found


def test_no_function_is_longer_than_a_screen():
    assert long_functions() == []


def test_the_length_rule_counts_code_not_docstrings_or_comments():
    source = 'def f():\n    """Doc.\n\n    More."""\n    # why\n    x = 1\n\n    return x\n'
    assert code_lines(ast.parse(source).body[0], source.splitlines()) == 3


ENTRIES = {
    "rat_lens.trace": lambda m, **kw: rat_lens.trace(m, "cat dog red", **kw),
    "Tracer.trace": lambda m, **kw: rat_lens.Tracer(m).trace("cat dog red", **kw),
    "Tracer.trace_batch": lambda m, **kw: rat_lens.Tracer(m).trace_batch(["cat dog"], **kw),
    "trace_attention": lambda m, **kw: rat_lens.trace_attention(m.eye, **kw),
    "census": lambda m, **kw: rat_lens.census(m, ["cat dog"], m.out, **kw),
}


@pytest.fixture(scope="module")
def entry_model(tmp_path_factory):
    import torch

    from rat_lens.models import load

    model = load("induction-2l")
    model.eye, model.out = torch.eye(3), tmp_path_factory.mktemp("census")
    return model


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_point_takes_options_and_names_an_unknown_keyword(entry_model, entry):
    call = ENTRIES[entry]
    with pytest.raises(rat_lens.RatLensError, match=r"'topbeam' \(did you mean 'top_beam'\?\)"):
        call(entry_model, topbeam=3)
    got = call(entry_model, options=TraceOptions(top_k=2, top_beam=4), top_beam=1)
    assert ran_with(got) == (1, 2)  # the keyword goes over options=, the rest stays


def ran_with(got) -> tuple:
    """(top_beam, top_k) a call ran with, read from what it returned."""
    got = got[0] if isinstance(got, list) and isinstance(got[0], rat_lens.TraceResult) else got
    if isinstance(got, rat_lens.TraceResult):
        return got.top_beam, got.top_k
    if isinstance(got, list):  # trace_attention's beams: top_beam of them at most
        return len(got), 2
    return got.options["top_beam"], got.options["top_k"]  # a Census


def test_the_fields_are_spelled_in_two_signatures_at_most():
    """TraceOptions itself and reverse-attention's positional order (its tracer's trace)."""
    spelled = []
    for name in modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if getattr(value, "__module__", None) != name or dataclasses.is_dataclass(value):
                continue  # imported names, and dataclasses (their fields are the definition)
            for function in (value, *vars(value).values()) if inspect.isclass(value) else (value,):
                if inspect.isfunction(function):
                    params = inspect.signature(function).parameters
                    if {"top_k", "agg_heads"} <= set(params):
                        spelled.append(f"{name}.{function.__qualname__}")
    assert sorted(set(spelled)) == ["rat_lens.compat.tracer.ReverseAttentionTracer.trace"]


@pytest.mark.parametrize(
    "given",
    [
        {},
        {"layers": (0, 1), "agg_heads": "none"},
        {"layers": (0, 1), "agg_heads": "none", "move_threshold": 0.1},
        {"layer": 1, "length_norm": "sqrt"},
    ],
)
def test_options_read_back_from_a_dict_trace_exactly_as_the_options(entry_model, given):
    options = TraceOptions(**given)
    again = TraceOptions(**json.loads(json.dumps(options.to_dict())))
    assert again == options
    tokens = entry_model.to_tokens("cat dog red blue cat dog red")
    _, cache = entry_model.run_with_cache(tokens)
    for extra in ({}, {"cache": cache}):
        try:
            first = rat_lens.trace(entry_model, tokens, options=options, **extra)
        except rat_lens.RatLensError as err:  # then the copy refuses it just the same
            with pytest.raises(rat_lens.RatLensError, match=re.escape(str(err))):
                rat_lens.trace(entry_model, tokens, options=again, **extra)
            continue
        second = rat_lens.trace(entry_model, tokens, options=again, **extra)
        assert second.to_dict() == first.to_dict()


def test_options_are_checked_once_at_construction_and_frozen(no_typecheck):
    options = TraceOptions(layers=[0, 1], residual=None)
    assert options.layers == (0, 1) and options.residual == "none"
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.top_k = 3
    assert json.loads(json.dumps(options.to_dict()))["layers"] == [0, 1]
    with pytest.raises(rat_lens.RatLensError, match="top_beam must be an int, got '5'"):
        TraceOptions(top_beam="5")
    with pytest.raises(rat_lens.RatLensError, match="not both"):
        rat_lens.trace_attention(__import__("torch").eye(3), layer=0, layers=(0, 0))


def test_one_error_class_for_the_same_mistake_everywhere(no_typecheck):
    import torch

    from rat_lens.models import load

    model = load("induction-2l")
    result = rat_lens.trace(model, "cat dog red cat")
    for call in (
        lambda: rat_lens.trace(model, "cat dog red cat", top_beam="5"),
        lambda: rat_lens.verify(model, result, n_random="5"),
        lambda: rat_lens.trace_attention(torch.eye(3), 1.5),
        lambda: rat_lens.trace_attention([[1.0]]),
    ):
        with pytest.raises(rat_lens.RatLensError) as info:
            call()
        assert isinstance(info.value, ValueError) and not isinstance(info.value, TypeError)

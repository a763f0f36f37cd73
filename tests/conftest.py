"""Shared fixtures."""

import jaxtyping
import pytest


@pytest.fixture
def no_typecheck():
    """Turn jaxtyping's runtime checks off, to see the errors users get (they run unchecked)."""
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


def _sources() -> list[str]:
    """The TransformerLens model classes the installed TL offers (4.x: bridge only; 3.9: both)."""
    found = []
    try:
        from transformer_lens.model_bridge import TransformerBridge
        if hasattr(TransformerBridge, "boot_native"):
            found.append("bridge")
    except ImportError:
        pass
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
        found.append("hooked")
    except ImportError:
        pass
    return found


SOURCES = _sources()


@pytest.fixture(scope="session", params=SOURCES)
def model(request):
    """The embedded induction model, once per TransformerLens model class installed."""
    from rat_lens.models import load
    return load("induction-2l", source=request.param)


def hook_count(model) -> int:
    """Forward hooks currently registered on the model's hook points."""
    return sum(len(hp._forward_hooks) for hp in model.hook_dict.values())

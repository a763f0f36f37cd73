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


@pytest.fixture(scope="session")
def gpt2_bridge():
    """A tiny random GPT-2 through TransformerBridge.boot_transformers: the HF-backed bridge
    (fused-QKV attention, KV cache) that users get for Hugging Face models."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    from rat_lens.models import load_induction_tokenizer

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(
            n_layer=3,
            n_head=4,
            n_embd=32,
            vocab_size=64,
            n_positions=128,
            attn_implementation="eager",
        )
    ).eval()
    return TransformerBridge.boot_transformers(
        "gpt2", hf_model=hf, tokenizer=load_induction_tokenizer()
    )


def hook_count(model) -> int:
    """Forward hooks currently registered on the model's hook points."""
    return sum(len(hp._forward_hooks) for hp in model.hook_dict.values())

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


# --- Devices (issue 24): a fake GPU machine, and tests that need a real one -----------------


def pytest_addoption(parser):
    parser.addoption(
        "--fake-gpu",
        action="store_true",
        help="run with torch.cuda.is_available() patched to True (the machine claims a GPU it "
        "does not have): nothing may move to CUDA unless a test asks for it",
    )


def pytest_configure(config):
    if config.getoption("--fake-gpu"):
        import torch

        torch.cuda.is_available = lambda: True  # the whole session: what --fake-gpu is for


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests run on a real CUDA device only (``pytest -m gpu``)."""
    import torch

    if torch.cuda.device_count():  # not is_available(): --fake-gpu patches that one
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.device_count() == 0)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def fake_gpu(monkeypatch):
    """This test on a machine that says it has a GPU (``torch.cuda.is_available()`` is True),
    without one: any code that picks CUDA by itself fails (torch has no CUDA here)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

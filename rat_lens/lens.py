"""What a route carried: the logit lens at the nodes a beam visits and each head move's write.

The beams are known only after the search, so the trace's own forward keeps, beside its
capture (:func:`explain_capture`, joined to it by :class:`rat_lens.capture.Joined`), what any
node or move could need, for the traced layers only: the residual stream at
each node layer (``hook_resid_post``; ``blocks.0.hook_resid_pre`` for the embeddings, node layer
``-1``), each head's ``hook_z``, the final norm's ``ln_final.hook_scale`` and, with a foil, the
values (``hook_v``). That is ``[batch, seq, d_model]``-sized per layer, never ``seq²``; the
decoding runs afterwards on the visited rows only (:func:`explain`). Only a source that runs
several forwards (padded prompts with contribution edges) leaves it to one forward of its own.

The maths is TransformerLens's: the lens at (layer, position) is ``ln_final(resid) @ W_U +
b_U`` (at the top layer: the model's own logits). A head's write at query ``q`` is
``z[q, h] @ blocks[l].attn.W_O[h]`` through the final norm with its scale at ``q`` held fixed
(``cache.logit_attrs``'s convention: centred for LayerNorm, divided by ``hook_scale``, times the
norm's weight, which TransformerLens folds into ``W_U`` when ``fold_ln`` ran), onto ``W_U``: its
direct logits.

**Contrastive targets.** With a foil ``F`` the token explained is ``T`` against it: writes carry
``dla_diff`` = direct logit of ``T`` minus ``F``, and a per-head layers trace scores the first
move out of the target by it: at the target row every head candidate ``(h, k)`` of every traced
layer weighs what it adds to ``logit(T) - logit(F)`` directly, in place of its share. Its read's
contribution is ``c = A[h, t, k] · (v_k W_O^h) · d / scale_t`` (``d`` the logit-difference
direction through the final norm); summed over the keys it is the head's ``dla_diff``. The
weight is ``max(0, c)`` times the head's net share ``max(0, Σ_k c) / Σ_k max(0, c)``, over the
largest such weight of all traced layers (:func:`rat_lens.search.contrast.foil_weights`): reads
that push towards the foil, and heads whose write does, are no first move. Deeper moves are
scored as without a foil.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor

from .capture import Forward, model_session, offloaded_weights_loaded, run_forward
from .errors import RatLensError
from .result import Beam, BlockWrite, HeadWrite, LensRecord, Stay, StayWrite
from .sankey import node_layers
from .search.contrast import TargetRowWeights, foil_weights
from .search.contrib import value_outputs
from .search.stats import TopTokens
from .search.store import TopKeys

__all__ = [
    "LENS_TOP",
    "ExplainCapture",
    "Explained",
    "explain_capture",
    "explain",
    "final_norm",
    "head_direct_logits",
    "resolve_token",
]

LENS_TOP = 5  # tokens per lens record and per side (promoted, suppressed) of a head write


def resid_hook(node_layer: int) -> str:
    """The hook holding the residual stream at a node layer (``-1``: the embeddings)."""
    return "blocks.0.hook_resid_pre" if node_layer < 0 else f"blocks.{node_layer}.hook_resid_post"


@dataclass
class ExplainCapture:
    """Forward hooks keeping, for ``layers`` (traced, any order), the residual stream at each
    node layer in ``node_layers``, each head's ``hook_z``, ``ln_final.hook_scale`` and (with
    ``values``) ``hook_v``, all positions, the pieces of a chunked forward joined."""

    layers: list[int]
    node_layers: list[int]
    values: bool = False
    kept: dict = field(default_factory=dict)

    def names(self) -> list[str]:
        names = [resid_hook(n) for n in sorted(set(self.node_layers))]
        names += [f"blocks.{layer}.attn.hook_z" for layer in sorted(set(self.layers))]
        if self.values:
            names += [f"blocks.{layer}.attn.hook_v" for layer in sorted(set(self.layers))]
        return names + ["ln_final.hook_scale"]

    @property
    def fwd_hooks(self) -> list:
        def keeper(name: str):  # by the name asked for: the bridge fires aliases under others
            return lambda act, hook: self.kept.setdefault(name, []).append(act.detach())

        return [(name, keeper(name)) for name in self.names()]

    def rows_captured(self) -> dict[str, int]:
        return {name: sum(p.shape[1] for p in parts) for name, parts in self.kept.items()}

    def get(self, name: str) -> Tensor:
        """``[batch, seq, ...]``, the chunks of a chunked forward joined."""
        parts = self.kept[name]
        if len(parts) > 1:
            self.kept[name] = [torch.cat(parts, dim=1)]
        return self.kept[name][0]


def final_norm(model) -> tuple[Optional[Tensor], bool]:
    """The final norm's weight (None: none, or folded into ``W_U``) and whether it centres
    (LayerNorm) or not (RMSNorm), on ``HookedTransformer`` and ``TransformerBridge`` alike."""
    ln = model.ln_final
    weight = None
    for holder in (ln, getattr(ln, "original_component", None)):
        for name in ("w", "weight"):
            value = getattr(holder, name, None) if holder is not None else None
            # an offloaded model's bridge-side alias stays a meta placeholder: take real values
            if isinstance(value, Tensor) and weight is None and value.device.type != "meta":
                weight = value.detach()
    kind = getattr(model.cfg, "normalization_type", None)
    if kind not in ("LN", "LNPre", "RMS", "RMSPre"):
        raise RatLensError(
            f"the final norm's type {kind!r} is not one of 'LN', 'LNPre', 'RMS', 'RMSPre': "
            "its write cannot be decoded through it"
        )
    return weight, kind.startswith("LN")


def head_direct_logits(
    model,
    out: Float[Tensor, "row d_model"],
    scale: Float[Tensor, " row"],
) -> Float[Tensor, "row vocab"]:
    """Direct logits of residual-stream writes ``out`` at rows whose final-norm scale is
    ``scale``: centred (LayerNorm), ÷ scale, × the norm's weight, ``@ W_U`` (no bias)."""
    # Offloaded weights hold their values only inside this block: every read stays in it.
    with offloaded_weights_loaded(model.ln_final), offloaded_weights_loaded(model.unembed):
        weight, centre = final_norm(model)
        W_U = model.W_U.detach()
        out = out.to(W_U.device, W_U.dtype)
        if centre:
            out = out - out.mean(-1, keepdim=True)
        out = out / scale.to(out.device, out.dtype)[:, None]
        if weight is not None:
            out = out * weight.to(out.device, out.dtype)
        return out @ W_U


def resolve_token(value, decode: Callable, tokenizer, vocab: int, name: str) -> tuple[int, str]:
    """``(id, text)`` of a token given as an id or as text that is exactly one token."""
    if isinstance(value, str):
        ids = tokenizer.encode(value, add_special_tokens=False) if tokenizer is not None else []
        if len(ids) != 1:
            raise RatLensError(
                f"{name}={value!r} is {len(ids)} tokens "
                f"{'(no tokenizer to read it)' if tokenizer is None else ids}: give text that is "
                "exactly one token (often with its leading space, e.g. ' Mary') or a token id"
            )
        value = ids[0]
    if not 0 <= int(value) < vocab:
        raise RatLensError(f"{name}={value!r} is not a token id in 0..{vocab - 1}")
    return int(value), decode([int(value)])[0]


def explain_capture(model, plan) -> Optional[ExplainCapture]:
    """The hooks that explain a trace's routes, to run in the trace's own forward
    (:func:`rat_lens.record.capture_record`'s ``also``), or None where the plan's inputs turn
    it off (``explain=False``; or left ``None`` without a target or foil named)."""
    inputs = plan.inputs
    wanted = inputs.explain
    if wanted is None:  # asked for by naming a target or a foil
        wanted = inputs.target_token is not None or inputs.foil_token is not None
    if not wanted:
        return None
    nodes = plan.layer_ids if plan.options.chain else [*plan.layer_ids, plan.layer_ids[-1] - 1]
    capture = ExplainCapture(plan.layer_ids, nodes, values=inputs.foil_token is not None)
    missing = sorted(set(capture.names()) - set(getattr(model, "hook_dict", {})))
    if missing:
        raise RatLensError(
            f"explain reads the hook points {missing[:3]}, which {type(model).__name__} lacks: "
            "trace with explain=False"
        )
    return capture


def explain(
    model, tokens, plan, capture: ExplainCapture, top: Optional[TopTokens], tokenizer, decode
) -> "Explained":
    """What ``capture`` kept in the trace's forward (with its logits' ``top`` tokens),
    explained; where that source ran several forwards and left it empty, one forward of its own
    fills it."""
    if not capture.kept or top is None:
        capture.kept.clear()
        forward = Forward(plan.forward_mask, plan.inputs.query_chunk, True, top_tokens=1)
        top = run_forward(model, tokens, capture, forward)
    inputs = plan.inputs
    vocab = top.vocab
    foil = inputs.foil_token
    foil = None if foil is None else resolve_token(foil, decode, tokenizer, vocab, "foil_token")
    given = inputs.target_token
    given = (
        None if given is None else resolve_token(given, decode, tokenizer, vocab, "target_token")
    )
    targets = [
        [given or _top(top.ids[b, t, 0], decode) for t in positions]
        for b, positions in enumerate(plan.targets)
    ]
    if foil is not None and any(foil == t for row in targets for t in row):
        raise RatLensError(
            f"foil_token={inputs.foil_token!r} is the token explained ({foil[1]!r}): "
            "a foil is another token, e.g. the runner-up"
        )
    return Explained(model, plan, capture, targets, foil, decode)


def _top(token: Tensor, decode: Callable) -> tuple[int, str]:
    return int(token), decode([int(token)])[0]


@dataclass
class Explained:
    """The explaining forward's activations and the tokens explained: ``targets[b][i]`` is the
    ``(id, text)`` of prompt ``b``'s ``i``-th target, ``foil`` the foil's (or None)."""

    model: object
    plan: object
    capture: ExplainCapture
    targets: list[list[tuple[int, str]]]
    foil: Optional[tuple[int, str]]
    decode: Callable  # ids -> their texts

    def contrast(self, weights: list, attention: list, b: int, target: int) -> list:
        """Prompt ``b``'s search weights per traced layer, with a foil in a per-head layers
        trace the target row's head candidates weighed by what they add to ``logit(T) -
        logit(F)`` directly (the module docstring's rule); unchanged otherwise."""
        options = self.plan.options
        if self.foil is None or options.chain or not options.per_head:
            return weights
        token = self._token(b, target)
        reads = [
            self._read_contributions(layer, pattern, b, target, token)
            for layer, pattern in zip(self.plan.layer_ids, attention)
        ]
        found = foil_weights(reads, target)
        if not any(bool(f.any()) for f in found):  # no read pushes towards T: as it was
            return weights
        return [TargetRowWeights(w, target, f.to(w.device)) for w, f in zip(weights, found)]

    @torch.no_grad()
    def _read_contributions(self, layer: int, pattern, b: int, target: int, token: int):
        """``[head, key]``: each head's read of each key at the target row (the target's own
        key too), as a direct contribution to ``logit(token) - logit(foil)``."""
        model = self.model
        with offloaded_weights_loaded(model.blocks[layer].attn) as attn:
            W_O = attn.W_O.detach()
        with offloaded_weights_loaded(model.ln_final), offloaded_weights_loaded(model.unembed):
            weight, centre = final_norm(model)
            W_U = model.W_U.detach()
        direction = (W_U[:, token] - W_U[:, self.foil[0]]).float()
        if weight is not None:
            direction = direction * weight.float().to(direction.device)
        if centre:  # centring is symmetric: centre the direction instead of each write
            direction = direction - direction.mean()
        v = self.capture.get(f"blocks.{layer}.attn.hook_v")[b, : target + 1].float()
        per_key = value_outputs(v, W_O.float().to(v.device)) @ direction.to(v.device)
        scale = self.capture.get("ln_final.hook_scale")[b, target].float().reshape(())
        rows = torch.stack([_row(pattern, h, target) for h in range(W_O.shape[0])])
        n = pattern.shape[-1]
        out = torch.zeros(W_O.shape[0], n)
        out[:, : target + 1] = (rows.to(v.device) * per_key / scale.to(v.device)).cpu()
        return out

    def attach(self, results: list, beams: list[list[Beam]], b: int) -> list:
        """Prompt ``b``'s results (one per target, ``beams[i]`` the i-th's) with the tokens
        explained, the lens and the writes filled in."""
        for result, found in zip(results, beams):
            target = result.target_pos
            result.target_id, result.target_token = self.targets[b][
                self.plan.targets[b].index(target)
            ]
            if self.foil is not None:
                result.foil_id, result.foil_token = self.foil
            result.lens = self.lens(found, b, target)
            result.writes = self.writes(found, b, target)
            result.stays = self.stays(found, b, target)
        return results

    def _token(self, b: int, target: int) -> int:
        return self.targets[b][self.plan.targets[b].index(target)][0]

    @torch.no_grad()
    def lens(self, beams: list[Beam], b: int, target: int) -> list[LensRecord]:
        """The logit lens at every (node layer, position) the beams visit, best beam first,
        then at the target on every node layer the beams left out (the target's whole column:
        where it becomes the top token)."""
        mode = "chain" if self.plan.options.chain else "layers"
        nodes: dict[tuple[int, int], None] = {}
        for beam in beams:
            for pos, lay in zip(beam.positions, node_layers(beam, mode, self.plan.layer_ids[0])):
                nodes.setdefault((lay, pos), None)
        for lay in sorted(set(self.capture.node_layers), reverse=True):
            nodes.setdefault((lay, target), None)
        rows = torch.stack([self.capture.get(resid_hook(lay))[b, pos] for lay, pos in nodes])
        logits = _unembed(self.model, rows).float()
        probs = logits.softmax(-1)
        token = self._token(b, target)
        top = probs.topk(min(LENS_TOP, probs.shape[-1]))
        ranks = (logits > logits[:, token : token + 1]).sum(-1)
        decode = self.decode
        return [
            LensRecord(
                layer=lay,
                position=pos,
                tokens=decode(top.indices[i].tolist()),
                token_ids=top.indices[i].tolist(),
                probs=[round(p, 6) for p in top.values[i].tolist()],
                target_rank=int(ranks[i]),
                target_prob=round(float(probs[i, token]), 6),
            )
            for i, (lay, pos) in enumerate(nodes)
        ]

    @torch.no_grad()
    def writes(self, beams: list[Beam], b: int, target: int) -> list[HeadWrite]:
        """Each distinct head move's write (``LENS_TOP`` promoted and suppressed tokens, its
        direct logit of the target token and of target minus foil), best beam first."""
        moves: dict[tuple[int, int, int, int], None] = {}
        for beam in beams:
            for move in beam.moves():
                if move.head is not None:
                    moves.setdefault((move.layer, move.head, move.query, move.key), None)
        if not moves:
            return []
        outs, scales = [], []
        for layer, head, query, _ in moves:
            z = self.capture.get(f"blocks.{layer}.attn.hook_z")[b, query, head]
            with offloaded_weights_loaded(self.model.blocks[layer].attn) as attn:
                outs.append(z @ attn.W_O[head].detach().to(z.device, z.dtype))
            scales.append(self.capture.get("ln_final.hook_scale")[b, query].reshape(()))
        direct = head_direct_logits(self.model, torch.stack(outs), torch.stack(scales)).float()
        token = self._token(b, target)
        return [
            _write(key, direct[i], token, self.foil, self.decode) for i, key in enumerate(moves)
        ]

    @torch.no_grad()
    def stays(self, beams: list[Beam], b: int, target: int) -> list[StayWrite]:
        """What each distinct stay span (best beam first) kept: per layer of the span, the
        attention block's write ``Σ_h z·W_O + b_O`` (from the kept ``hook_z``) and the MLP's,
        the rest of the layer's update (``resid_post[l] - resid_post[l-1]`` minus the
        attention's: exact wherever a block's outputs are added to the stream as computed);
        their norms' shares; the MLP with the largest direct logit of the target (or of
        target minus foil). Models with norms after the blocks
        (``use_normalization_before_and_after``) split no update: no stays there."""
        if getattr(self.model.cfg, "use_normalization_before_and_after", False):
            return []
        spans: dict[tuple[int, int, int], None] = {}
        for beam in beams:
            for step in beam.route():
                if isinstance(step, Stay):
                    spans.setdefault((step.position, step.top, step.bottom), None)
        return [self._stay(span, b, target) for span in spans]

    def _stay(self, span: tuple[int, int, int], b: int, target: int) -> StayWrite:
        position, top, bottom = span
        layers = list(range(top, bottom - 1, -1))
        attn = torch.stack([self._attention_write(layer, b, position) for layer in layers])
        resid = [
            self.capture.get(resid_hook(n))[b, position].float() for n in range(top, bottom - 2, -1)
        ]
        update = torch.stack(resid[:-1]) - torch.stack(resid[1:])  # layer l: post[l] - post[l-1]
        mlp = None if getattr(self.model.cfg, "attn_only", False) else update - attn.to(update)
        parts = [(layer, "attn", attn[i].norm()) for i, layer in enumerate(layers)]
        if mlp is not None:
            parts += [(layer, "mlp", mlp[i].norm()) for i, layer in enumerate(layers)]
        total = float(sum(norm for *_, norm in parts)) or 1.0
        parts.sort(key=lambda part: -float(part[2]))
        blocks = [BlockWrite(lay, kind, round(float(n) / total, 6)) for lay, kind, n in parts]
        stay = StayWrite(position, top, bottom, blocks[:LENS_TOP])
        if mlp is None:
            return stay
        scale = self.capture.get("ln_final.hook_scale")[b, position].reshape(1)
        direct = head_direct_logits(self.model, mlp, scale.expand(len(layers))).float()
        dla = direct[:, self._token(b, target)]
        diff = None if self.foil is None else dla - direct[:, self.foil[0]]
        pick = int((dla if diff is None else diff).argmax())
        stay.mlp_layer, stay.mlp_dla = layers[pick], round(float(dla[pick]), 6)
        stay.mlp_dla_diff = None if diff is None else round(float(diff[pick]), 6)
        return stay

    def _attention_write(self, layer: int, b: int, position: int) -> Float[Tensor, " d_model"]:
        """Layer ``layer``'s attention output at ``position``: every head's ``z · W_O``, plus
        ``b_O``, from the kept ``hook_z``."""
        z = self.capture.get(f"blocks.{layer}.attn.hook_z")[b, position].float()
        with offloaded_weights_loaded(self.model.blocks[layer].attn) as attn:
            W_O = attn.W_O.detach().to(z.device, torch.float32)
            b_O = getattr(attn, "b_O", None)
            out = torch.einsum("hd,hdm->m", z, W_O)
            return out if b_O is None else out + b_O.detach().to(out.device, out.dtype)


def _write(move: tuple, direct: Tensor, token: int, foil, decode: Callable) -> HeadWrite:
    k = min(LENS_TOP, direct.shape[-1])
    up, down = direct.topk(k), (-direct).topk(k)
    return HeadWrite(
        *move,
        promoted=decode(up.indices.tolist()),
        promoted_ids=up.indices.tolist(),
        promoted_logits=[round(x, 6) for x in up.values.tolist()],
        suppressed=decode(down.indices.tolist()),
        suppressed_ids=down.indices.tolist(),
        suppressed_logits=[round(-x, 6) for x in down.values.tolist()],
        dla=round(float(direct[token]), 6),
        dla_diff=None if foil is None else round(float(direct[token] - direct[foil[0]]), 6),
    )


def _unembed(model, rows: Float[Tensor, "row d_model"]) -> Float[Tensor, "row vocab"]:
    """``ln_final(rows) @ W_U + b_U``: each row's own final norm, as the model decodes."""
    # ln_final's hook points fire on this call: under the model's lock, so no other thread's
    # forward (and its hooks on ln_final.hook_scale) runs meanwhile.
    with (
        model_session(model),
        offloaded_weights_loaded(model.ln_final),
        offloaded_weights_loaded(model.unembed),
    ):
        normed = model.ln_final(rows[None])[0]
        W_U, b_U = model.W_U.detach(), getattr(model, "b_U", None)
        logits = normed.to(W_U.device, W_U.dtype) @ W_U
        return logits if b_U is None else logits + b_U.detach().to(logits.device)


def _row(pattern, head: int, query: int) -> Tensor:
    """Attention row ``[key <= query]`` of ``head`` at ``query``, dense or a bounded store's
    (its keys left out read 0: they are no candidates either)."""
    if isinstance(pattern, TopKeys):
        keys, weights = pattern.row(head, query)
        row = torch.zeros(query + 1)
        row[keys] = weights.float().cpu()
        return row
    return pattern[head, query, : query + 1].float().cpu()

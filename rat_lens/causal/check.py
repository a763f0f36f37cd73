"""Does the traced path matter? Causal checks of a trace by ablation through TransformerLens hooks.

Attention weights are not explanations by themselves (Jain & Wallace 2019). :func:`verify`
intervenes on ``blocks.{l}.attn.hook_pattern`` and measures what changes at the target, on one
metric: log p of the model's top prediction, or, with a foil ``F``, the logit difference
logit(T) − logit(F) (``T`` the token asked for, else the trace's target, else the prediction):

- **per beam**: ablate exactly the beam's edges (that head's entry, or every head's when heads
  were aggregated) and measure the drop in the metric (and in log p of a token you name),
  against random paths of the same shape: same layers and heads, same number of edges, each
  key drawn from the row the path reads; the p-value's floor is 1 / (n_random + 1);
- **faithfulness curve**: keep the top p% of traced edges, ablate the rest of the rows they
  leave from, and report (m(kept) − m(all ablated)) / (m(full) − m(all ablated)) with its area
  (Hanna, Pezzelle & Belinkov 2024);
- **token level**: blank each input token (mean token embedding, or a neutral token) and
  correlate that importance with the trace's (Spearman; cf. Abnar & Zuidema 2020).

All variants run as one batched forward (chunked by ``batch_size``). The model is left as it
was: hooks live only inside TransformerLens's ``hooks()`` context, nothing else is touched.
Definitions and sources: ``docs/verify.md``.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from ..capture import pattern_layers
from ..errors import RatLensError, check_choice, check_int, check_number, checked_call
from ..result import (
    BeamEffect,
    Faithfulness,
    PathEffect,
    TokenImportance,
    TraceResult,
    Verification,
    beam_weights,
    check_result,
)
from ..search.stats import beam_mass_importance
from .ablation import (
    ABLATIONS,
    curve_area,
    expand_heads,
    random_path,
    row_entries,
    spearman,
)
from .run import Variant, clean_run, run_variants

__all__ = ["verify", "BLANKS", "PERCENTS"]

BLANKS = ("mean", "token")
PERCENTS = (1, 2, 5, 10, 20, 50, 100)


@checked_call
def verify(
    model,
    result: TraceResult,
    *,
    token: Union[int, str, None] = None,
    foil: Union[int, str, bool, None] = None,
    ablation: str = "renorm",
    n_random: int = 20,
    alpha: Optional[float] = None,
    seed: int = 0,
    percents: Sequence[Union[int, float]] = PERCENTS,
    token_importance: bool = True,
    blank: str = "mean",
    neutral_token: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> Verification:
    """Ablate each beam of ``result`` in ``model`` and compare with random same-shape paths.

    Every part of the check is measured on one metric (``Verification.metric``): log p of the
    model's top prediction (``"logp"``) or, with a foil, the logit difference logit(token) −
    logit(foil) (``"logit_diff"``); an effect is its drop (clean − ablated). The prompt rerun
    is ``result.token_ids[:target_pos + 1]`` (causal: later tokens cannot change the target's
    prediction), without attention mask.

    Args:
        model: the TransformerLens model the trace came from (unchanged afterwards).
        result: a :class:`~rat_lens.TraceResult` of that model.
        token: also measure log p of this token (id, or a string the tokenizer makes one
            token); with a foil, the token of the logit difference. Default: the token the
            trace explained (``result.target_id``: traced with ``target_token`` or
            ``foil_token``), else none (with a foil: the model's top prediction).
        foil: measure logit(token) − logit(foil) (id, or text that is one token). Default:
            the trace's foil (``result.foil_id``), else none; ``False``: none even so.
        ablation: ``"renorm"`` (zero the edges, rescale the rest of the row to its old sum),
            ``"zero"``, or ``"mean"`` (the row's mean weight over the keys its query may see).
        n_random: random paths per beam. A p-value is (1 + #random paths doing as much) /
            (1 + n_random): never below 1 / (n_random + 1), so 20 can reach 0.05 and 99 0.01.
        alpha: the significance level you read the p-values at: refused before any forward
            when ``n_random`` cannot reach it; the text then lists the beams with p ≤ alpha.
        seed: the seed the random paths are drawn with.
        percents: the faithfulness curve's kept shares of traced edges (empty: no curve).
        token_importance: also measure blank-out importance of each prompt token.
        blank: how a token is blanked out: ``"mean"`` (the prompt's mean token embedding, at
            ``hook_embed``) or ``"token"`` (swap in ``neutral_token``).
        neutral_token: the token swapped in with ``blank="token"`` (default: the tokenizer's
            pad, else BOS id).
        batch_size: ablated copies per forward (default: as many as keep the logits ≲ 256 MB).

    Returns:
        A :class:`Verification` (``to_text()``, ``to_markdown()``, ``to_dict()``/``to_json()``).

    Examples:
        >>> from rat_lens import trace
        >>> from rat_lens.models import load
        >>> model = load("induction-2l")
        >>> prompt = "cat dog red blue cat dog red"
        >>> result = trace(model, prompt, layers=(0, 1), agg_heads="none")
        >>> check = verify(model, result, token="blue", n_random=8)
        >>> effect = check.beams[0].effect
        >>> check.metric, check.prediction, effect.effect > 10 * effect.baseline_mean
        ('logp', 'blue', True)
        >>> Verification.from_json(check.to_json()) == check
        True

        Against a foil (here the trace's own), on the logit difference:

        >>> result = trace(model, prompt, layers=(0, 1), agg_heads="none", foil_token="cat")
        >>> check = verify(model, result, n_random=8, token_importance=False)
        >>> check.metric, check.token, check.foil, round(check.logit_diff, 1)
        ('logit_diff', 'blue', 'cat', 16.0)
        >>> effect = check.beams[0].effect
        >>> effect.effect > 5 * effect.baseline_mean
        True

        A p-value is never below 1 / (n_random + 1): asking for more is refused.

        >>> verify(model, result, n_random=8, alpha=0.01)
        Traceback (most recent call last):
        ...
        rat_lens.errors.RatLensError: alpha=0.01 is out of reach of n_random=8: ...
    """
    setup = _checked(
        model,
        result,
        token,
        foil,
        ablation,
        n_random,
        alpha,
        percents,
        token_importance,
        blank,
        neutral_token,
        batch_size,
    )
    clean, n_heads = clean_run(model, setup.tokens, setup.layers)
    metric, target = _metric(model, setup, int(clean.argmax()), foil), result.target_pos

    # Every ablated copy is one variant, in this order: beams, their random paths, the
    # faithfulness curve (kept shares, then all ablated), the blanked positions.
    traced = _traced_edges(result)
    curve = setup.percents if traced else []
    positions = list(range(target + 1)) if token_importance else []
    variants = (
        _beam_variants(result, n_heads, n_random, seed)
        + _curve_variants(traced, curve, n_heads)
        + _blank_variants(positions, setup.neutral)
    )

    logp = run_variants(model, setup.tokens, variants, ablation, setup.batch_size)
    m_clean, m, drops = metric.drops(clean, logp)
    start = len(result.beams) * (1 + n_random)
    at = start + (len(curve) + 1 if curve else 0)  # the blanked positions' copies from here
    importance = _token_importance(result, positions, blank, drops["metric"][at:].tolist())
    return Verification(
        target_pos=target,
        target_token=result.tokens[target],
        ablation=ablation,
        n_random=n_random,
        seed=seed,
        beams=_beam_effects(result, drops, n_random),
        faithfulness=_faithfulness(curve, traced, m[start:at].tolist(), m_clean) if curve else None,
        token_importance=importance,
        alpha=setup.alpha,
        **metric.fields(model, clean),
    )


class _Setup(NamedTuple):
    """The options of one check, resolved and checked."""

    tokens: Tensor  # the prompt up to the target
    layers: list[int]  # the layers to probe
    token_id: Optional[int]
    foil_id: Optional[int]
    neutral: Optional[int]
    percents: list[float]
    batch_size: int
    alpha: Optional[float]


@dataclass(frozen=True)
class _Metric:
    """What each copy is measured on: log p of ``main`` or, with a ``foil``, logit(main) −
    logit(foil), read off log-probabilities (the log-softmax's normaliser cancels); ``token``
    is the token whose log p is reported beside it (None: none asked); ``prediction`` the
    model's top token in the clean run."""

    prediction: int
    main: int
    token: Optional[int] = None
    foil: Optional[int] = None

    def __call__(self, logp: Tensor) -> Tensor:
        value = logp[..., self.main]
        return value if self.foil is None else value - logp[..., self.foil]

    def drops(self, clean: Tensor, logp: Tensor) -> tuple[float, Tensor, dict[str, Tensor]]:
        """The clean metric, each copy's, and each copy's drops: in the metric, and in log p
        of the token asked for."""
        m_clean, m = float(self(clean)), self(logp)
        drops = {"metric": m_clean - m}
        if self.token is not None:
            drops["token"] = clean[self.token] - logp[:, self.token]
        return m_clean, m, drops

    def fields(self, model, clean: Tensor) -> dict:
        """The :class:`Verification` fields that say what was measured."""
        token, foil, top = self.token, self.foil, self.prediction
        return {
            "prediction_id": top,
            "prediction": _decode(model, top),
            "prediction_logp": float(clean[top]),
            "token_id": token,
            "token": None if token is None else _decode(model, token),
            "token_logp": None if token is None else float(clean[token]),
            "metric": "logp" if foil is None else "logit_diff",
            "foil_id": foil,
            "foil": None if foil is None else _decode(model, foil),
            "logit_diff": None if foil is None else float(self(clean)),
        }


def _metric(model, setup: _Setup, top_id: int, foil) -> _Metric:
    """The metric, once the prediction is known (with a foil, the token defaults to it)."""
    if setup.foil_id is None:
        return _Metric(top_id, top_id, setup.token_id)
    token_id = top_id if setup.token_id is None else setup.token_id
    if token_id == setup.foil_id:  # only a prediction gets here: a named token was checked
        raise RatLensError(_same_foil(model, foil, token_id, "the model's prediction"))
    return _Metric(top_id, token_id, token_id, setup.foil_id)


def _same_foil(model, foil, foil_id: int, measured: str) -> str:
    given = "the trace's foil (result.foil_id)" if foil is None else f"foil={foil!r}"
    return (
        f"{given} is {_decode(model, foil_id)!r} (id {foil_id}), the token measured "
        f"({measured}): a foil is another token, e.g. the runner-up"
    )


def _checked(
    model,
    result,
    token,
    foil,
    ablation,
    n_random,
    alpha,
    percents,
    token_importance,
    blank,
    neutral_token,
    batch_size,
) -> _Setup:
    """Every option checked before any forward (a typo costs nothing), and resolved."""
    check_result(result, "verify")
    n_layers = pattern_layers(model)
    check_choice("ablation", ablation, ABLATIONS)
    check_choice("blank", blank, BLANKS)
    check_int("n_random", n_random, minimum=0)
    alpha = _alpha(alpha, n_random)
    percents = _percents(percents)
    vocab = _vocab(model)
    tokens = _prompt(model, result, vocab)
    token_id, foil_id = _token_and_foil(model, result, token, foil, vocab)
    neutral = (
        _neutral(model, neutral_token, vocab) if token_importance and blank == "token" else None
    )
    if token_importance and blank == "mean" and "hook_embed" not in model.hook_dict:
        raise RatLensError(
            "blank='mean' needs the model's hook_embed hook point, which this "
            "model lacks: use blank='token'"
        )
    layers = sorted({lay for beam in result.beams for lay in beam.layers} | {result.layer})
    if max(layers) >= n_layers:
        raise RatLensError(f"result traces layer {max(layers)}, but the model has {n_layers}")
    heads = [h for beam in result.beams for h in beam.heads if h is not None]
    n_heads = getattr(getattr(model, "cfg", None), "n_heads", None)
    if heads and n_heads is not None and max(heads) >= n_heads:
        raise RatLensError(f"result traces head {max(heads)}, but the model has {n_heads}")
    if batch_size is None:  # keep a chunk's logits [batch, seq, vocab] under ~256 MB
        batch_size = max(1, min(64, 2**26 // (len(tokens) * (vocab or 50_000))))
    check_int("batch_size", batch_size)
    return _Setup(tokens, layers, token_id, foil_id, neutral, percents, batch_size, alpha)


def _token_and_foil(model, result, token, foil, vocab) -> tuple[Optional[int], Optional[int]]:
    """The token and the foil asked for, else the trace's own (``target_id``, ``foil_id``)."""
    token_id = (
        _token_id(model, token, vocab)
        if token is not None
        else _token_id(model, result.target_id, vocab, "result.target_id")
    )
    if foil is False:  # no foil, whatever the trace had
        return token_id, None
    foil_id = (
        _token_id(model, foil, vocab, "foil")
        if foil is not None
        else _token_id(model, result.foil_id, vocab, "result.foil_id")
    )
    if foil_id is not None and foil_id == token_id:
        measured = f"token={token!r}" if token is not None else "the trace's target_token"
        raise RatLensError(_same_foil(model, foil, foil_id, measured))
    return token_id, foil_id


def _alpha(alpha, n_random: int) -> Optional[float]:
    """``alpha`` if ``n_random`` random paths can give a p-value that low (the smallest is
    1 / (n_random + 1)); else RatLensError naming the n_random that can."""
    if alpha is None:
        return None
    alpha = check_number("alpha", alpha)
    if not 0 < alpha < 1:
        raise RatLensError(f"alpha={alpha!r} must lie in (0, 1)")
    if 1 / (n_random + 1) > alpha * (1 + 1e-9):
        need = math.ceil(1 / alpha - 1e-9) - 1
        raise RatLensError(
            f"alpha={alpha:g} is out of reach of n_random={n_random}: the smallest p-value is "
            f"1 / (n_random + 1) = {1 / (n_random + 1):.3g}; pass n_random >= {need}"
        )
    return alpha


def _beam_variants(result: TraceResult, n_heads: int, n_random: int, seed: int) -> list[Variant]:
    """Each beam's edges, then ``n_random`` random paths of each beam's shape."""
    variants = [Variant(expand_heads(_edges(beam), n_heads)) for beam in result.beams]
    generator = torch.Generator().manual_seed(seed)
    for beam in result.beams:
        for _ in range(n_random):
            path = random_path(
                result.target_pos,
                beam.num_edges,
                chain=result.mode == "chain",
                generator=generator,
                exclude_bos=result.exclude_bos,
            )
            if beam.kinds:  # residual stays keep their position: random keys for moves only
                path = _stay_where_the_beam_stays(beam, path, generator, result.exclude_bos)
            shape = [
                e
                for i, e in enumerate(zip(beam.layers, beam.heads, path, path[1:]))
                if not beam.is_residual(i)
            ]
            variants.append(Variant(expand_heads(shape, n_heads)))
    return variants


def _blank_variants(positions: list[int], neutral: Optional[int]) -> list[Variant]:
    """Each position blanked out: the token ``neutral`` swapped in, or (None) its embedding
    replaced by the prompt's mean token embedding."""
    return [
        Variant(blank_embed=p) if neutral is None else Variant(token_swap=(p, neutral))
        for p in positions
    ]


def _stay_where_the_beam_stays(beam, path, generator, exclude_bos: bool) -> list[int]:
    """A random path of the beam's shape where the beam stays in the residual stream."""
    out = [path[0]]
    for i in range(beam.num_edges):
        if beam.is_residual(i):
            out.append(out[-1])
        else:
            out.append(
                random_path(
                    out[-1],
                    1,
                    chain=False,
                    generator=generator,
                    exclude_bos=exclude_bos and out[-1] > 0,
                )[1]
            )
    return out


def _beam_effects(result: TraceResult, drops: dict[str, Tensor], n_random: int) -> list[BeamEffect]:
    n_beams, out = len(result.beams), []
    for b, beam in enumerate(result.beams):
        start = n_beams + b * n_random
        effects = {
            name: PathEffect.against(float(d[b]), d[start : start + n_random].tolist())
            for name, d in drops.items()
        }
        edges = [list(e) for e in _edges(beam)]
        out.append(BeamEffect(b + 1, edges, effects["metric"], effects.get("token")))
    return out


def _edges(beam) -> list[tuple]:
    """A beam's head edges (layer, head, query, key); residual stays read no pattern."""
    return [edge for edge, _ in _weighted_edges(beam)]


def _weighted_edges(beam) -> list[tuple[tuple, float]]:
    """A beam's head edges, each with its own weight (the stays, left out, have weights too:
    pairing the head edges with ``edge_weights`` by rank would credit a stay's weight to the
    head edge after it)."""
    return [
        ((beam.layers[i], beam.heads[i], beam.positions[i], beam.positions[i + 1]), attn)
        for i, attn in enumerate(beam.edge_weights)
        if not beam.is_residual(i)
    ]


def _traced_edges(result: TraceResult) -> list[tuple]:
    """Distinct edges of all beams, by traced mass (Σ softmax(score_norm) × weight), heaviest
    first; ties by layer (top first), query, key."""
    mass: dict[tuple, float] = {}
    for beam, share in zip(result.beams, beam_weights(result.beams)):
        for edge, attn in _weighted_edges(beam):
            mass[edge] = mass.get(edge, 0.0) + share * attn
    return sorted(mass, key=lambda e: (-mass[e], -e[0], e[2], e[3], -1 if e[1] is None else e[1]))


def _layer_rows(traced: list[tuple]) -> dict[int, list[int]]:
    """The query rows the traced edges leave from, per layer."""
    rows: dict[int, list[int]] = {}
    for layer, _, query, _ in traced:
        rows.setdefault(layer, []).append(query)
    return rows


def _kept_counts(curve: list[float], traced: list[tuple]) -> list[int]:
    return [math.ceil(p / 100 * len(traced)) for p in curve]


def _curve_variants(traced: list[tuple], curve: list[float], n_heads: int) -> list[Variant]:
    """The faithfulness curve's copies: the traced edges' rows ablated but the heaviest edges
    kept, for each kept share, then with nothing kept."""
    if not curve:
        return []
    rows = _layer_rows(traced)
    return [
        Variant(row_entries(rows, n_heads, expand_heads(traced[:n_keep], n_heads)))
        for n_keep in _kept_counts(curve, traced) + [0]
    ]


def _faithfulness(curve, traced, m_curve: list[float], m_full: float) -> Faithfulness:
    """The curve from the metric of each kept share's copy, the last all ablated."""
    m_kept, m_empty = m_curve[:-1], m_curve[-1]
    span = m_full - m_empty
    values = [None if abs(span) < 1e-9 else (m - m_empty) / span for m in m_kept]
    return Faithfulness(
        percents=list(curve),
        kept_edges=_kept_counts(curve, traced),
        total_edges=len(traced),
        rows=sum(len(set(q)) for q in _layer_rows(traced).values()),
        metric=m_kept,
        full=m_full,
        empty=m_empty,
        faithfulness=values,
        area=curve_area(curve, values),
    )


def _token_importance(
    result: TraceResult, positions: list[int], blank: str, blank_effect: list[float]
) -> Optional[TokenImportance]:
    if not positions:  # not asked for
        return None
    keys, mass = [], []
    for beam, share in zip(result.beams, beam_weights(result.beams)):
        keys += beam.positions[1:]
        mass += [share * a for a in beam.edge_weights]
    beam_mass = beam_mass_importance(
        torch.tensor(keys, dtype=torch.long),
        torch.tensor(mass, dtype=torch.float64),
        result.seq_len,
    )[: len(positions)]
    effect = torch.tensor(blank_effect, dtype=torch.float64)
    corr = {"beam_mass": spearman(effect, beam_mass)}
    rollout = [float(x) for x in (result.rollout or [])][: len(positions)]
    if len(rollout) == len(positions):
        corr["rollout"] = spearman(effect, torch.tensor(rollout, dtype=torch.float64))
    return TokenImportance(
        positions,
        [result.tokens[p] for p in positions],
        blank,
        blank_effect,
        beam_mass.tolist(),
        rollout if "rollout" in corr else [],
        corr,
    )


def _prompt(model, result: TraceResult, vocab: Optional[int]) -> Tensor:
    ids = result.token_ids
    if not ids:
        raise RatLensError(
            "result has no token_ids (a trace_attention result?): verify needs "
            "the prompt the model saw; trace with a model"
        )
    if vocab is not None and not all(0 <= i < vocab for i in ids):
        raise RatLensError(
            f"result.token_ids hold ids outside the model's vocabulary of {vocab}: "
            "was it traced with another model?"
        )
    if not 0 <= result.target_pos < len(ids):
        raise RatLensError(
            f"result.target_pos={result.target_pos} out of range for its {len(ids)} tokens"
        )
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if n_ctx is not None and result.target_pos + 1 > n_ctx:
        raise RatLensError(
            f"target_pos={result.target_pos} is beyond the model's context of {n_ctx}"
        )
    return torch.tensor(ids[: result.target_pos + 1], dtype=torch.long)


def _vocab(model) -> Optional[int]:
    cfg = getattr(model, "cfg", None)
    out = getattr(cfg, "d_vocab_out", -1) or -1
    return out if out > 0 else getattr(cfg, "d_vocab", None)


def _token_id(model, token, vocab: Optional[int], name: str = "token") -> Optional[int]:
    """The id of ``token`` (an id, or text the tokenizer makes exactly one token)."""
    if token is None:
        return None
    if isinstance(token, str):
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise RatLensError(
                f"{name}={token!r} needs a tokenizer, and the model has none: pass a token id"
            )
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise RatLensError(
                f"{name}={token!r} is {len(ids)} tokens ({ids}), not one: give text that is "
                "exactly one token (often with its leading space, e.g. ' Mary') or a token id"
            )
        return int(ids[0])
    if isinstance(token, bool) or not isinstance(token, int):
        raise RatLensError(f"{name} must be an int id or a str, got {token!r}")
    if token < 0 or (vocab is not None and token >= vocab):
        raise RatLensError(f"{name}={token} out of range for a vocabulary of {vocab}")
    return token


def _neutral(model, neutral_token: Optional[int], vocab: Optional[int]) -> int:
    if neutral_token is None:
        tokenizer = getattr(model, "tokenizer", None)
        for name in ("pad_token_id", "bos_token_id"):
            neutral_token = getattr(tokenizer, name, None)
            if neutral_token is not None:
                break
        if neutral_token is None:
            raise RatLensError(
                "blank='token' needs neutral_token=<id> (the model's tokenizer "
                "has no pad or BOS token to default to)"
            )
    if (
        isinstance(neutral_token, bool)
        or not isinstance(neutral_token, int)
        or neutral_token < 0
        or (vocab is not None and neutral_token >= vocab)
    ):
        raise RatLensError(
            f"neutral_token={neutral_token!r} is not a token id of a vocabulary of {vocab}"
        )
    return neutral_token


def _percents(percents) -> list[float]:
    try:
        values = sorted({float(p) for p in percents})
    except (TypeError, ValueError):
        raise RatLensError(f"percents={percents!r} must be numbers in (0, 100]") from None
    if any(not 0 < p <= 100 for p in values):
        raise RatLensError(f"percents={list(percents)!r} must all lie in (0, 100]")
    return values


def _decode(model, token_id: int) -> str:
    tokenizer = getattr(model, "tokenizer", None)
    return str(token_id) if tokenizer is None else tokenizer.decode([token_id])

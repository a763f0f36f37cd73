"""How results read as text, at the bottom of the package: tokens, numbers and routes.

One spelling of each, shared by the tracer's ``paths_text``, the summary, the command line and the
census: :func:`token_label` (a token as Python's repr, cut to 18 columns), :func:`head_label`
(``L17.H3``), :func:`num` (fixed digits, never "-0.000") and :func:`path_text` (a beam, target
first, head moves spelled out, runs of residual stays compressed). Imports nothing from
rat_lens: the result types use it, so it sits below them (``path_text`` reads a beam by its
``route()`` method).
"""

import unicodedata
from typing import Optional

__all__ = [
    "cells",
    "token_label",
    "head_label",
    "num",
    "path_text",
    "verification_text",
    "verification_metric",
]

MAX_TOKEN_CELLS = 18


def cells(text: str) -> int:
    """Terminal columns ``text`` takes: wide East Asian characters 2, combining marks 0."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in text
    )


def token_label(token: str) -> str:
    """A token as Python's repr (spaces and newlines visible), cut to 18 columns.

    >>> token_label(" B"), token_label("a\\nb"), token_label("x" * 40)
    ("' B'", "'a\\\\nb'", "'xxxxxxxxxxxxxxx…'")
    """
    label = repr(token)
    if cells(label) <= MAX_TOKEN_CELLS:
        return label
    while token and cells(repr(token)) > MAX_TOKEN_CELLS - 1:
        token = token[:-1]
    short = repr(token)
    return short[:-1] + "…" + short[-1]


def head_label(layer: int, head: Optional[int], residual: bool = False) -> str:
    """How an edge's head is written everywhere, the page included (its twin is ``headName`` in
    ``render/js/util.js``; a browser test checks they agree): ``L1.H0``; ``L1.res`` for a stay
    in the residual stream; ``L1`` when heads were aggregated (``head`` None).

    >>> head_label(17, 3), head_label(2, None, residual=True), head_label(0, None)
    ('L17.H3', 'L2.res', 'L0')
    """
    return f"L{layer}" + (".res" if residual else "" if head is None else f".H{head}")


def num(value: Optional[float], digits: int = 3) -> str:
    """``value`` with ``digits`` decimals; ``"-"`` for None, and no sign on a rounded zero.

    >>> num(0.12345), num(-0.00001), num(None), num(2.5, 1)
    ('0.123', '0.000', '-', '2.5')
    """
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def path_text(beam, score: bool = True) -> str:
    """A beam as one line, target first: each head move ``←L{layer}.H{head}(weight)─`` and the
    token it reads (``←L{layer}(weight)─`` with heads aggregated), each run of residual stays
    between moves as ``stays L{top}-L{bottom}``; then ``(score: …)`` unless ``score=False``.

    ``beam`` is a :class:`rat_lens.result.BeamPath` (its tokens and ``route()``).

    Examples:
        >>> from rat_lens.result import BeamPath
        >>> beam = BeamPath(positions=[9, 9, 9, 4, 3], tokens=[" B", " B", " B", " C", " B"],
        ...                 token_ids=[0] * 5, edge_attns=[0.7, 0.6, 0.123, 0.31],
        ...                 score_raw=1.5, score_norm=1.5, layers=[3, 2, 1, 0],
        ...                 heads=[None, None, 6, 2], bos_mass=[0.0] * 4,
        ...                 kinds=["residual", "residual", "head", "head"])
        >>> path_text(beam)
        "' B'@9 stays L3-L2 ←L1.H6(0.12)─ ' C'@4 ←L0.H2(0.31)─ ' B'@3 (score: 1.5000)"
    """
    text = f"{token_label(beam.tokens[0])}@{beam.positions[0]}"
    for step in beam.route():
        if hasattr(step, "key"):  # a Move (a Stay keeps its position)
            reached = f"{token_label(beam.tokens[step.edge + 1])}@{step.key}"
            text += f" ←{head_label(step.layer, step.head)}({step.weight:.2f})─ {reached}"
        else:
            span = f"L{step.top}" + ("" if step.bottom == step.top else f"-L{step.bottom}")
            text += f" stays {span}"
    return f"{text} (score: {beam.score_norm:.4f})" if score else text


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}x"


def verification_text(v, markdown: bool = False) -> str:
    """A :class:`rat_lens.result.Verification` as plain text (every line under 100 columns)
    or markdown tables: what ``print(check)`` shows."""
    return "\n".join(_verification_lines(v, markdown))


def verification_metric(v) -> str:
    """What a :class:`rat_lens.result.Verification` measured, in words: ``log p of 'blue'``
    or ``logit('blue') − logit('cat')``."""
    if v.metric == "logit_diff":
        return f"logit({token_label(v.token)}) − logit({token_label(v.foil)})"
    return f"log p of {token_label(v.prediction)}"


def _verification_lines(v, markdown: bool) -> list[str]:
    head = (
        f"Causal check: target {v.target_token!r}@{v.target_pos} predicts "
        f"{v.prediction!r} (log p {v.prediction_logp:.3f})"
    )
    if v.token is not None:
        head += f"; token {v.token!r} (log p {num(v.token_logp)})"
    floor = f"1/{v.n_random + 1} = {num(1 / (v.n_random + 1))}"
    lines = [("### " if markdown else "") + head, ""]
    if v.metric == "logit_diff":
        lines += [f"Against the foil: {verification_metric(v)} = {num(v.logit_diff)}.", ""]
    lines += [
        f"Effect: drop in {verification_metric(v)} when a beam's edges are ablated "
        f"({v.ablation!r});",
        f"random: {v.n_random} random paths of the same shape per beam"
        + (f" (smallest possible p: {floor})." if v.n_random else "."),
        "",
    ]
    if v.beams:
        cols = ["beam", "effect", "random mean", "random sd", "ratio", "p"]
        if v.token is not None:
            cols += ["token effect", "token ratio"]
        lines += _table(cols, [_beam_row(v, b) for b in v.beams], markdown) + [""]
        if v.alpha is not None:
            below = [str(b.rank) for b in v.beams if (b.effect.p_value or 1) <= v.alpha]
            lines += [f"p <= alpha = {v.alpha:g}: beams {', '.join(below) or 'none'}", ""]
    f = v.faithfulness
    if f is not None:
        cols = ["kept %"] + [f"{p:g}" for p in f.percents] + ["area"]
        rows = [
            ["edges"] + [str(n) for n in f.kept_edges] + [""],
            ["faithfulness"] + [num(x, 2) for x in f.faithfulness] + [num(f.area)],
        ]
        unit = "logit diff" if v.metric == "logit_diff" else "log p"
        lines.append(
            f"Faithfulness ({f.total_edges} traced edges, {f.rows} rows ablated; "
            f"{unit} full {f.full:.3f}, all ablated {f.empty:.3f})"
        )
        lines += _table(cols, rows, markdown) + [""]
    t = v.token_importance
    if t is not None:
        corr = ", ".join(f"{name} {num(value)}" for name, value in t.spearman.items())
        lines.append(f"Blank-out importance (blank={t.blank!r}): Spearman with {corr or '-'}")
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _beam_row(v, b) -> list[str]:
    """One beam's row of the check's table: its effect against the random paths, and the token's."""
    e = b.effect
    row = [
        str(b.rank),
        num(e.effect),
        num(e.baseline_mean),
        num(e.baseline_std),
        _ratio(e.ratio),
        num(e.p_value, 2),
    ]
    if v.token is not None:
        t = b.token_effect
        row += [num(t.effect if t else None), _ratio(t.ratio if t else None)]
    return row


def _table(cols: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        esc = [[c.replace("|", "\\|") for c in r] for r in [cols] + rows]
        rule = "|" + "---|" * len(cols)
        return ["| " + " | ".join(esc[0]) + " |", rule] + [
            "| " + " | ".join(r) + " |" for r in esc[1:]
        ]
    widths = [max(len(r[i]) for r in [cols] + rows) for i in range(len(cols))]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths)).rstrip() for r in [cols] + rows]

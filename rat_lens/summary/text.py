"""How a :class:`rat_lens.summary.Summary` reads: sections of rows, then markdown, text or rich.

A summary becomes a list of :class:`Section` (title, note, header, rows); each output format is
one small function over those, so the three never disagree about what a row says.
"""

import html
import re
import textwrap
from dataclasses import dataclass, field

from ..text import cells, num, token_label, verification_metric

__all__ = [
    "sections",
    "indent_wrapped",
    "summary_markdown",
    "summary_text",
    "summary_rich",
    "summary_html",
]


@dataclass
class Section:
    title: str
    header: list[str]
    rows: list[list[str]]
    align: str  # one of "l" / "r" per column
    flex: int = -1  # the column that wraps when the table is too wide
    code: set[int] = field(default_factory=set)  # columns holding tokens: code spans in markdown
    note: str = ""


def _at(token: str, position: int) -> str:
    return f"{token_label(token)}@{position}"


def _head(layer: int, head, agg: str) -> str:
    return f"L{layer}.H{head}" if head is not None else f"L{layer} ({agg})"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _role(label: str, score) -> str:
    return f"{label} {score:.2f}" if label else ""


def _weight_column(s) -> str:
    """The edge weight's column: attention, or (value_norm / contribution) a share."""
    return "attention" if s.edge_weight == "attention" else "share"


def _weight_name(s) -> str:
    if s.edge_weight == "attention":
        return "edge attention"
    return f"edge share of the block output ({s.edge_weight})"


def _title(s) -> tuple[str, str]:
    span = f"layer {s.layer} (chain)" if s.mode == "chain" else f"layers L{s.layer}→L{s.layer_lo}"
    heads = "per-head edges" if s.agg_heads == "none" else f"heads aggregated by {s.agg_heads}"
    if s.edge_weight != "attention":
        heads += f" weighted by {s.edge_weight} (shares of the block output)"
    extra = ", BOS/position 0 excluded" if s.exclude_bos else ""
    if s.ends_on_sink:
        extra += (
            "; the best beam ends on position 0, an attention sink: see past it per head "
            "across layers (the default), or with exclude_bos=True"
        )
    return (
        f"Trace summary: target {_at(s.target_token, s.target_pos)}"
        + (f" (prompt {s.batch_index})" if s.batch_index else ""),
        f"{span}; {heads}; length_norm {s.length_norm}; {len(s.beams)} "
        f"beam{'' if len(s.beams) == 1 else 's'}{extra}",
    )


def sections(s) -> list[Section]:
    """The summary as titled tables, in reading order; empty parts are left out."""
    out = [_beams_section(s)]
    if s.carried is not None:
        out += _carried_sections(s.carried, s.agg_heads)
    if s.heads:
        out += [_heads_section(s), _layers_section(s), _edges_section(s)]
    if s.tokens:
        out.append(_tokens_section(s))
    if s.roles is not None:
        out.append(_roles_section(s))
    if s.stats is not None:
        out.append(_stats_section(s))
    if s.verification is not None:
        out += _verification_sections(s.verification)
    if s.predictions:
        out.append(_predictions_section(s))
    return out


def _carried_sections(c, agg: str) -> list[Section]:
    """What the route carried: the lens at the target in one line, each head move's write,
    each stay's writers."""
    # A result saved without the token explained (hand-made, or older) still has its lens.
    target = "the token explained" if c.target is None else token_label(c.target)
    why = "" if c.target is None and c.foil is None else f": why {target}"
    why += "" if c.foil is None else f" and not {token_label(c.foil)}"
    lens = (
        f"the logit lens at the target reads {target} as its top token from L{c.top1_from} up"
        if c.top1_from is not None
        else f"the logit lens at the target never has {target} on top"
    ) + ("" if c.top_prob is None else f" (p {c.top_prob:.2f} after the last layer)")
    out = [
        Section(
            f"What the route carried{why}",
            [
                "move",
                "key → query",
                "DLA" + ("" if c.foil is None else " T−F"),
                "promotes",
                "suppresses",
            ],
            [_write_row(c, w, agg) for w in c.writes] or [["-", "-", "-", "-", "-"]],
            "llrll",
            flex=3,
            code={1, 3, 4},
            note=f"{lens}; each head move's write z·W_O through the final norm onto the "
            "unembedding: DLA = its direct logit of the target"
            + ("" if c.foil is None else " minus the foil")
            + ", then the tokens it promotes and suppresses most",
        )
    ]
    if c.stays:
        out.append(
            Section(
                "What the stays kept",
                ["at", "layers", "wrote most", "top MLP"],
                [_stay_row(c, stay) for stay in c.stays],
                "llll",
                flex=2,
                code={0},
                note="share of the span's block output norms; top MLP: the MLP layer giving the "
                "target" + ("" if c.foil is None else " minus the foil") + " the largest direct "
                "logit there, and that logit",
            )
        )
    return out


def _write_row(c, w, agg: str) -> list[str]:
    dla = w.dla if c.foil is None else w.dla_diff
    return [
        _head(w.layer, w.head, agg),
        f"{_at(c.token(w.key), w.key)} → {_at(c.token(w.position), w.position)}",
        num(dla, 2),
        ", ".join(token_label(t) for t in w.promoted[:3]),
        ", ".join(token_label(t) for t in w.suppressed[:3]),
    ]


def _stay_row(c, stay) -> list[str]:
    layers = f"L{stay.top}" + ("" if stay.bottom == stay.top else f"-L{stay.bottom}")
    blocks = ", ".join(f"L{b.layer} {b.block} {_pct(b.share)}" for b in stay.blocks[:3])
    dla = stay.mlp_dla if c.foil is None else stay.mlp_dla_diff
    mlp = "-" if stay.mlp_layer is None else f"L{stay.mlp_layer} {num(dla, 2)}"
    return [_at(c.token(stay.position), stay.position), layers, blocks, mlp]


def _heads_section(s) -> Section:
    return Section(
        "Traced mass by head",
        ["head", "mass", "share", "edges", "role"],
        [
            [
                _head(h.layer, h.head, s.agg_heads),
                f"{h.mass:.3f}",
                _pct(h.share),
                str(h.edges),
                _role(h.role, h.role_score),
            ]
            for h in s.heads
        ],
        "lrrrl",
        note=f"mass = Σ over beams of share × {_weight_name(s)}",
    )


def _layers_section(s) -> Section:
    return Section(
        "Traced mass by layer",
        ["layer", "mass", "share"],
        [[f"L{x.layer}", f"{x.mass:.3f}", _pct(x.share)] for x in s.layers],
        "lrr",
    )


def _edges_section(s) -> Section:
    shares = s.edge_weight != "attention"  # then the head's attention has a column of its own
    note = f"{_weight_column(s)}: the {_weight_name(s)}; "
    if shares:
        note += "attention: the head's attention weight on the edge; "
    return Section(
        "Top edges",
        ["edge", "key → query", _weight_column(s)]
        + ["attention"] * shares
        + ["mass", "sink", "beams", "role"],
        [
            [
                _head(e.layer, e.head, s.agg_heads),
                f"{_at(e.key_token, e.key)} → {_at(e.query_token, e.query)}",
                f"{e.weight:.2f}",
            ]
            + [num(e.attention, 2)] * shares
            + [
                f"{e.mass:.3f}",
                f"{e.bos_mass:.2f}",
                ",".join(str(b + 1) for b in e.beams),
                e.role,
            ]
            for e in s.edges
        ],
        "llr" + "r" * shares + "rrll",
        flex=1,
        code={1},
        note=note + "sink = the row's attention on BOS / position 0",
    )


def _tokens_section(s) -> Section:
    roll = "rollout" in s.importance  # the rollout column only when patterns gave one
    return Section(
        "Token importance",
        ["pos", "token", "beam mass"] + ["rollout"] * roll,
        [
            [str(t.position), token_label(t.token), f"{t.beam_mass:.3f}"]
            + ([f"{t.rollout:.3f}"] if roll else [])
            for t in s.tokens
        ],
        "rlr" + "r" * roll,
        code={1},
        note="beam mass: traced mass landing on the token; rollout: Abnar & "
        "Zuidema (2020) over the traced layers",
    )


def _predictions_section(s) -> Section:
    return Section(
        "Predictions at traced positions",
        ["pos", "token", "top next tokens"],
        [
            [
                str(p.position),
                token_label(p.token),
                ", ".join(f"{token_label(t)} {q:.2f}" for t, q in zip(p.tokens, p.probs)),
            ]
            for p in s.predictions
        ],
        "rll",
        flex=2,
        code={1, 2},
    )


def _beams_section(s) -> Section:
    header = ["#", "score", "raw", "share", "circuit"]
    rows = [
        [str(b.rank), f"{b.score_norm:.3f}", f"{b.score_raw:.3f}", _pct(b.share), b.circuit]
        for b in s.beams
    ]
    note = (
        f"share = softmax(score_norm) over the beams; circuit: target first, each head move "
        f"←L{{layer}}.H{{head}}({_weight_column(s)})─ and the token it reads"
    )
    if any(" stays L" in b.circuit for b in s.beams):
        note += "; stays L{top}-L{bottom}: the position kept through the residual stream"
    v = s.verification
    if v is None or len(v.beams) != len(rows):
        return Section("Beams (best first)", header, rows, "rrrrl", flex=4, code={4}, note=note)
    for row, b in zip(rows, v.beams):  # the causal effect goes before the circuit
        row[4:4] = [f"{b.effect.effect:.3f}", _times(b.effect.ratio), num(b.effect.p_value, 2)]
    note += (
        f"; effect = drop in {verification_metric(v)} when the beam's edges "
        f"are ablated ({v.ablation}); ×random = effect / mean |effect| of {v.n_random} "
        "random paths of its shape; p = share of them doing as much"
    )
    return Section(
        "Beams (best first)",
        header[:4] + ["effect", "×random", "p", "circuit"],
        rows,
        "rrrrrrrl",
        flex=7,
        code={7},
        note=note,
    )


def _verification_sections(v) -> list[Section]:
    out = []
    f = v.faithfulness
    if f is not None:
        out.append(
            Section(
                "Faithfulness",
                ["kept", "edges", "faithfulness"],
                [
                    [f"{p:g}%", f"{n}/{f.total_edges}", num(x, 3)]
                    for p, n, x in zip(f.percents, f.kept_edges, f.faithfulness)
                ],
                "rrr",
                note=f"top traced edges kept, the rest of their {f.rows} rows ablated; (m(kept) − "
                f"m(all ablated)) / (m(full) − m(all ablated)), m = {verification_metric(v)} "
                f"(Hanna et al. 2024); area {num(f.area, 3)}",
            )
        )
    t = v.token_importance
    if t is not None and t.spearman:
        out.append(
            Section(
                "Blank-out importance vs trace",
                ["importance", "Spearman"],
                [[name.replace("_", " "), num(value, 3)] for name, value in t.spearman.items()],
                "lr",
                note=f"each token blanked ({t.blank}); its drop in {verification_metric(v)}, "
                "rank-correlated with the trace's",
            )
        )
    return out


def _times(x) -> str:
    return "-" if x is None else f"{x:.1f}×"


def _roles_section(s) -> Section:
    rows = []
    for name, table in s.roles.scores.items():
        scored = sorted(
            ((v, layer, h) for layer, row in zip(s.roles.layers, table) for h, v in enumerate(row)),
            reverse=True,
        )
        named = [f"L{layer}.H{h} {v:.2f}" for v, layer, h in scored if v >= s.role_threshold]
        best = f"none (best L{scored[0][1]}.H{scored[0][2]} {scored[0][0]:.2f})" if scored else ""
        rows.append([name, ", ".join(named) or best])
    return Section(
        "Head roles",
        ["role", "heads (score)"],
        rows,
        "ll",
        flex=1,
        note=f"TransformerLens head_detector scores on the traced tokens, "
        f"shown when >= {s.role_threshold:.2f}",
    )


def _stats_section(s) -> Section:
    table, names = s.stats, ["entropy", "max_weight", "sink_mass", "self_mass", "prev_mass"]
    names = [n for n in names if n in table.scores]
    on_paths = {(h.layer, h.head) for h in s.heads}
    show_all = len(table.layers) * table.n_heads <= 32
    rows = []
    for i, layer in enumerate(table.layers):
        for h in range(table.n_heads):
            if table.aggregated or show_all or (layer, h) in on_paths:
                label = s.agg_heads if table.aggregated else f"H{h}"
                rows.append([f"L{layer}", label] + [f"{table.scores[n][i][h]:.3f}" for n in names])
        if not table.aggregated and table.n_heads > 1:
            rows.append(
                [f"L{layer}", "mean"]
                + [f"{sum(table.scores[n][i]) / table.n_heads:.3f}" for n in names]
            )
    return Section(
        "Attention statistics",
        ["layer", "head"] + [n.replace("_", " ") for n in names],
        rows,
        "ll" + "r" * len(names),
        note="means over query rows; entropy in nats"
        + ("" if show_all else "; heads on the traced paths and each layer's mean"),
    )


def summary_markdown(s) -> str:
    title, sub = _title(s)
    out = [f"## {_md(title)}", "", _md(sub)]
    for sec in sections(s):
        out += ["", f"### {sec.title}", ""] + ([f"_{_md(sec.note)}_", ""] if sec.note else [])
        out.append("| " + " | ".join(_md(h) for h in sec.header) + " |")
        out.append("|" + "|".join("---:" if a == "r" else ":---" for a in sec.align) + "|")
        for row in sec.rows:
            out.append(
                "| "
                + " | ".join(_code(c) if i in sec.code else _md(c) for i, c in enumerate(row))
                + " |"
            )
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return re.sub(r"([\\`*_\[\]<>|])", r"\\\1", text)


def _code(text: str) -> str:
    if not text:
        return ""
    text = text.replace("|", "\\|")  # GFM splits cells on | even inside code spans
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"


def summary_html(s) -> str:
    """One ``<div class="rat-summary">`` of plain tables, every string escaped, no script."""
    esc = html.escape
    title, sub = _title(s)
    out = [f'<div class="rat-summary"><h3>{esc(title)}</h3><p>{esc(sub)}</p>']
    for sec in sections(s):
        kinds = [
            "num" if a == "r" else "code" if i in sec.code else "text"
            for i, a in enumerate(sec.align)
        ]
        out.append(
            f"<table><caption>{esc(sec.title)}</caption><thead><tr>"
            + "".join(f"<th>{esc(h)}</th>" for h in sec.header)
            + "</tr></thead><tbody>"
        )
        out += [
            "<tr>" + "".join(f'<td class="{k}">{esc(c)}</td>' for k, c in zip(kinds, row)) + "</tr>"
            for row in sec.rows
        ]
        note = f'<p class="note">{esc(sec.note)}</p>' if sec.note else ""
        out.append("</tbody></table>" + note)
    return "\n".join(out) + "</div>\n"


def summary_text(s, width: int = 100) -> str:
    title, sub = _title(s)
    lines = _wrap(title, width) + _wrap(sub, width)
    for sec in sections(s):
        lines += ["", sec.title] + (textwrap.wrap(sec.note, width) if sec.note else [])
        lines += _table(sec, width)
    # The tables are sized to fit; this only guards against a label wider than the screen.
    return "\n".join(_cut(line.rstrip(), width) for line in lines) + "\n"


def _table(sec: Section, width: int) -> list[str]:
    widths = [max([cells(h)] + [cells(r[i]) for r in sec.rows]) for i, h in enumerate(sec.header)]
    gap = 2
    total = sum(widths) + gap * (len(widths) - 1)
    flex = sec.flex % len(widths)
    if total > width:
        widths[flex] = max(12, widths[flex] - (total - width))
    lines = []
    for row in [sec.header] + sec.rows:
        parts = [_wrap(c, widths[i]) if i == flex else [c] for i, c in enumerate(row)]
        for k in range(max(len(p) for p in parts)):
            cols = []
            for i, p in enumerate(parts):
                text = p[k] if k < len(p) else ""
                pad = " " * (widths[i] - cells(text))
                cols.append(pad + text if sec.align[i] == "r" else text + pad)
            lines.append((" " * gap).join(cols))
    return lines


def indent_wrapped(text: str, width: int = 100, indent: str = "  ") -> str:
    """``text`` (a path, a circuit) on lines of at most ``width`` columns, broken before its
    moves and stays as the summary's tables break it: the first line indented by ``indent``,
    the rest by twice that.

    >>> print(indent_wrapped("'d'@9 stays L5-L2 ←L1.H0(0.40)─ 'c'@3 ←L0.H2(0.91)─ 'b'@2", 40))
      'd'@9 stays L5-L2 ←L1.H0(0.40)─ 'c'@3
        ←L0.H2(0.91)─ 'b'@2
    """
    lines = _wrap(text, width - 2 * len(indent))
    return "\n".join(indent * (1 + (i > 0)) + line.lstrip() for i, line in enumerate(lines))


def _wrap(text: str, width: int) -> list[str]:
    """Break before ``←`` / ``→`` edges and ``stays`` spans, after commas and semicolons; cut
    only what still does not fit."""
    atoms = [a for a in re.split(r"(?<=, )|(?= ←)|(?= → )|(?= stays L)|(?<=; )", text) if a]
    lines, line = [], ""
    for atom in atoms:
        if line and cells(line + atom) > width:
            lines.append(line)
            line = atom.lstrip() if not atom.startswith((" ←", " stays")) else atom
        else:
            line += atom
        while cells(line) > width:
            head = _cut(line, width, mark="")
            lines.append(head)
            line = line[len(head) :]
    return lines + [line] if line or not lines else lines


def _cut(text: str, width: int, mark: str = "…") -> str:
    if cells(text) <= width:
        return text
    while text and cells(text) > width - len(mark):
        text = text[:-1]
    return text + mark


def summary_rich(s):
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text  # Text, not str: a token like "[b]" must not read as markup

    title, sub = _title(s)
    parts = [Text(title, style="bold"), Text(sub)]
    for sec in sections(s):
        table = Table(
            title=sec.title,
            caption=sec.note or None,
            box=box.SIMPLE_HEAD,
            title_justify="left",
            caption_justify="left",
        )
        for i, header in enumerate(sec.header):
            table.add_column(
                header,
                justify="right" if sec.align[i] == "r" else "left",
                overflow="fold",
                no_wrap=i != sec.flex % len(sec.header),
            )
        for row in sec.rows:
            table.add_row(*(Text(c) for c in row))
        parts += [Text(""), table]
    return Group(*parts)

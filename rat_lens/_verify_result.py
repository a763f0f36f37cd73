"""What :func:`rat_lens.verify.verify` returns: dataclasses with JSON round trips and text.

Effects are drops in log-probability (nats) at the target: ``log p(clean) − log p(ablated)``,
positive when the ablation hurts the prediction.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from ._json import JsonRoundTrip

__all__ = ["PathEffect", "BeamEffect", "Faithfulness", "TokenImportance", "Verification", "NOISE"]

NOISE = 1e-5  # nats: effects below this are float noise, not effects


@dataclass
class PathEffect:
    """One beam's effect on one metric, against random paths of the same shape.

    ``ratio`` = effect / mean |random effect| (None when that mean is below :data:`NOISE`,
    i.e. the random paths had no measurable effect: float32 log-probabilities carry ~1e-6);
    ``p_value`` = (1 + #random paths with effect >= this one) / (1 + #random paths).
    """
    effect: float
    baseline_mean: Optional[float] = None
    baseline_std: Optional[float] = None
    ratio: Optional[float] = None
    p_value: Optional[float] = None
    baseline: list[float] = field(default_factory=list)

    @classmethod
    def against(cls, effect: float, baseline: list[float]) -> "PathEffect":
        if not baseline:
            return cls(effect)
        n = len(baseline)
        mean = sum(baseline) / n
        std = math.sqrt(sum((b - mean) ** 2 for b in baseline) / (n - 1)) if n > 1 else 0.0
        scale = sum(abs(b) for b in baseline) / n
        ratio = effect / scale if scale >= NOISE else None
        p_value = (1 + sum(b >= effect for b in baseline)) / (1 + n)
        return cls(effect, mean, std, ratio, p_value, list(baseline))


@dataclass
class BeamEffect:
    """Ablating beam ``rank`` (1 = best): ``edges`` are ``[layer, head, query, key]`` (head None
    when heads were aggregated: every head's entry was ablated)."""
    rank: int
    edges: list[list[Optional[int]]]
    effect: PathEffect  # on log p of the model's top prediction
    token_effect: Optional[PathEffect] = None  # on log p of the token asked for


@dataclass
class Faithfulness:
    """Keep the top ``percents`` of traced edges (by traced mass), ablate every other entry of
    the rows they leave from, in every head: ``faithfulness[i]`` = (m(kept) − m(empty)) /
    (m(full) − m(empty)), m = log p of the top prediction (Hanna, Pezzelle & Belinkov 2024).
    ``area`` is under the curve over the kept fraction, from (0, 0) to (1, f(100%))."""
    percents: list[float]
    kept_edges: list[int]
    total_edges: int
    rows: int
    metric: list[float]
    full: float
    empty: float
    faithfulness: list[Optional[float]]
    area: Optional[float]


@dataclass
class TokenImportance:
    """Blank-out importance of each position (its drop in log p of the top prediction when its
    token is blanked) and its Spearman correlation with the trace's token importances."""
    positions: list[int]
    tokens: list[str]
    blank: str
    blank_effect: list[float]
    beam_mass: list[float]
    rollout: list[float] = field(default_factory=list)
    spearman: dict[str, Optional[float]] = field(default_factory=dict)


@dataclass
class Verification(JsonRoundTrip):
    """Causal checks of one trace (see :func:`rat_lens.verify.verify`); ``to_json()`` /
    ``from_json()`` come from :class:`JsonRoundTrip`."""
    target_pos: int
    target_token: str
    prediction_id: int
    prediction: str
    prediction_logp: float
    ablation: str
    n_random: int
    seed: int
    beams: list[BeamEffect]
    faithfulness: Optional[Faithfulness] = None
    token_importance: Optional[TokenImportance] = None
    token_id: Optional[int] = None
    token: Optional[str] = None
    token_logp: Optional[float] = None

    def __repr__(self) -> str:
        best = f"{self.beams[0].effect.effect:.3f}" if self.beams else "-"
        ratio = self.beams[0].effect.ratio if self.beams else None
        area = self.faithfulness.area if self.faithfulness else None
        return (f"Verification(target_pos={self.target_pos}, prediction={self.prediction!r}, "
                f"ablation={self.ablation!r}, beams={len(self.beams)}, top_effect={best}, "
                f"top_ratio={_num(ratio)}, faithfulness_area={_num(area)})")

    def to_text(self) -> str:
        """Plain text, every line under 100 columns."""
        return "\n".join(_lines(self, markdown=False))

    def to_markdown(self) -> str:
        """The same as GitHub-flavoured markdown tables."""
        return "\n".join(_lines(self, markdown=True))

    def __str__(self) -> str:
        return self.to_text()

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Verification":
        data = dict(data)
        data["beams"] = [BeamEffect(
            b["rank"], [list(e) for e in b["edges"]], PathEffect(**b["effect"]),
            None if b.get("token_effect") is None else PathEffect(**b["token_effect"]))
            for b in data["beams"]]
        if data.get("faithfulness") is not None:
            data["faithfulness"] = Faithfulness(**data["faithfulness"])
        if data.get("token_importance") is not None:
            data["token_importance"] = TokenImportance(**data["token_importance"])
        return cls(**data)



def _num(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}x"


def _lines(v: Verification, markdown: bool) -> list[str]:
    head = (f"Causal check: target {v.target_token!r}@{v.target_pos} predicts "
            f"{v.prediction!r} (log p {v.prediction_logp:.3f})")
    if v.token is not None:
        head += f"; token {v.token!r} (log p {_num(v.token_logp)})"
    lines = [("### " if markdown else "") + head, "",
             f"Effect: drop in log p when a beam's edges are ablated ({v.ablation!r});",
             f"random: {v.n_random} random paths of the same shape per beam.", ""]
    if v.beams:
        cols = ["beam", "effect", "random mean", "random sd", "ratio", "p"]
        if v.token is not None:
            cols += ["token effect", "token ratio"]
        rows = []
        for b in v.beams:
            e = b.effect
            row = [str(b.rank), _num(e.effect), _num(e.baseline_mean), _num(e.baseline_std),
                   _ratio(e.ratio), _num(e.p_value, 2)]
            if v.token is not None:
                t = b.token_effect
                row += [_num(t.effect if t else None), _ratio(t.ratio if t else None)]
            rows.append(row)
        lines += _table(cols, rows, markdown) + [""]
    f = v.faithfulness
    if f is not None:
        cols = ["kept %"] + [f"{p:g}" for p in f.percents] + ["area"]
        rows = [["edges"] + [str(n) for n in f.kept_edges] + [""],
                ["faithfulness"] + [_num(x, 2) for x in f.faithfulness] + [_num(f.area)]]
        lines.append(f"Faithfulness ({f.total_edges} traced edges, {f.rows} rows ablated; "
                     f"log p full {f.full:.3f}, all ablated {f.empty:.3f})")
        lines += _table(cols, rows, markdown) + [""]
    t = v.token_importance
    if t is not None:
        corr = ", ".join(f"{name} {_num(value)}" for name, value in t.spearman.items())
        lines.append(f"Blank-out importance (blank={t.blank!r}): Spearman with {corr or '-'}")
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _table(cols: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        esc = [[c.replace("|", "\\|") for c in r] for r in [cols] + rows]
        rule = "|" + "---|" * len(cols)
        return ["| " + " | ".join(esc[0]) + " |", rule] + \
            ["| " + " | ".join(r) + " |" for r in esc[1:]]
    widths = [max(len(r[i]) for r in [cols] + rows) for i in range(len(cols))]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths)).rstrip() for r in [cols] + rows]

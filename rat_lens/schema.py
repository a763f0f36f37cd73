"""What a saved trace must look like: the check that every load runs before a result is built.

A ``trace.json`` may come from another machine, another version, a hand edit or a hostile
source. :func:`check_trace` walks the dict field by field and raises one :class:`RatLensError`
naming the first bad field (``beams[2].edge_weights[0] must be a finite number, got nan``), so
``TraceResult.from_dict`` / ``from_json`` and ``rat-lens render`` never fail later with a raw
traceback. :func:`from_reverse_attention` reads reverse-attention 0.1.0's ``trace.json`` as ours.
Pure Python, no torch.

>>> check_trace({"seq_len": 2, "target_pos": 5, "layer": 0, "top_beam": 1, "top_k": 1,
...              "tokens": ["a", "b"], "beams": [], "sankey": {}, "paths_text": []})
Traceback (most recent call last):
...
rat_lens.errors.RatLensError: trace: target_pos must be an int in 0..1, got 5
"""

import math
import warnings
from collections.abc import Callable
from typing import Any, Optional

from .errors import RatLensError
from .options import AGG_HEADS, EDGE_WEIGHTS, RESIDUALS, check_length_norm

__all__ = [
    "FORMAT_VERSION",
    "PEER_METADATA",
    "check_trace",
    "is_reverse_attention_trace",
    "from_reverse_attention",
]

# Bump when a saved field changes meaning; loads accept 1..FORMAT_VERSION. 2: a beam's
# edge_weights (what the search used) and edge_attns (the head's attention) are kept apart.
FORMAT_VERSION = 2
# The fields reverse-attention 0.1.0 keeps in its ``metadata`` block (to_dict writes them too).
PEER_METADATA = ("seq_len", "target_pos", "layer", "top_beam", "top_k")
MODES = ("chain", "layers")

_REQUIRED = (
    "seq_len",
    "target_pos",
    "layer",
    "top_beam",
    "top_k",
    "tokens",
    "beams",
    "sankey",
    "paths_text",
)
_OPTIONAL = (
    "mode",
    "layer_lo",
    "agg_heads",
    "length_norm",
    "residual",
    "exclude_bos",
    "batch_index",
    "token_ids",
    "top_attention",
    "predictions",
    "rollout",
    "head_rows",
    "edge_weight",
    "move_threshold",
    "depth_discount",
    "verification",
    "prompt_len",
    "target_token",
    "target_id",
    "foil_token",
    "foil_id",
    "lens",
    "writes",
    "stays",
    "format_version",
    "metadata",
)


def is_reverse_attention_trace(data) -> bool:
    """reverse-attention 0.1.0's ``trace.json``: a ``metadata`` block, none of our own fields."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("metadata"), dict)
        and "format_version" not in data
        and "mode" not in data
    )


def check_trace(data: Any, where: str = "trace") -> dict:
    """``data`` if it is a valid ``TraceResult.to_dict()`` (one saved in an older format comes
    back in today's, :func:`upgraded`); else RatLensError naming the field."""
    # The groups run in the order of the saved fields, so the first bad field is the one named.
    _check_field_names(data, where)
    at = _At(where)
    seq, layer = _check_sizes(at, data)
    data = upgraded(data)
    mode = _check_options(at, data, layer)
    ids = at.items("token_ids", data.get("token_ids", []))
    if ids:
        at.need("token_ids", len(ids) == seq, f"must hold {seq} ids, got {len(ids)}")
        for i, value in enumerate(ids):
            at.integer(f"token_ids[{i}]", value, 0)
    _check_beams(at, data, seq, layer, mode)
    _check_extras(at, data, seq, layer)
    check_explained(at, data, seq, layer)
    _check_metadata(at, data)
    return data


def upgraded(data: dict) -> dict:
    """A format-1 trace in format 2. Format 1 kept one number per edge, ``edge_attns``: the
    weight the search used. It becomes ``edge_weights``; it was also the head's attention only
    with attention edges and no rollout, so only there does it stay ``edge_attns`` (elsewhere
    no attention is recorded, and a warning says so). Beams of the wrong shape are left for
    the checks to name."""
    if data.get("format_version", 1) != 1:
        return data
    attention = data.get("edge_weight", "attention") == "attention"
    attention = attention and data.get("residual", "none") == "none"
    beams = data["beams"] if isinstance(data["beams"], list) else []
    upgrade = [
        isinstance(b, dict) and "edge_weights" not in b and isinstance(b.get("edge_attns"), list)
        for b in beams
    ]
    if not any(upgrade):
        return {**data, "format_version": FORMAT_VERSION}
    if not attention:
        warnings.warn(
            f"a trace saved in format 1 with edge_weight={data.get('edge_weight')!r} and "
            f"residual={data.get('residual', 'none')!r}: its beams' edge_attns were the "
            "search's weights, read as edge_weights; it records no attention (edge_attns empty)",
            UserWarning,
            stacklevel=4,
        )
    return {
        **data,
        "format_version": FORMAT_VERSION,
        "beams": [
            {
                **b,
                "edge_weights": b["edge_attns"],
                "edge_attns": b["edge_attns"] if attention else [],
            }
            if up
            else b
            for b, up in zip(beams, upgrade)
        ],
    }


def _check_field_names(data, where: str) -> None:
    """An object with every required field and no field a trace does not have."""
    if not isinstance(data, dict):
        raise RatLensError(f"{where}: expected a JSON object, got {_kind(data)}")
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL), key=str)
    if unknown:
        raise RatLensError(
            f"{where}: unknown field(s) {unknown}; a trace has {list(_REQUIRED) + list(_OPTIONAL)}"
        )
    missing = [name for name in _REQUIRED if name not in data]
    if missing:
        raise RatLensError(f"{where}: missing field(s) {missing}")


def _check_sizes(at: "_At", data: dict) -> tuple[int, int]:
    """The format version, the prompt and the top layer; returns (seq_len, layer), the bounds
    of every position and layer checked after."""
    at.integer(
        "format_version",
        data.get("format_version", 1),
        1,
        FORMAT_VERSION,
        hint=" (saved by a newer rat_lens: upgrade to read it)",
    )
    seq = at.integer("seq_len", data["seq_len"], 1)
    at.integer("target_pos", data["target_pos"], 0, seq - 1)
    layer = at.integer("layer", data["layer"], 0)
    at.integer("top_beam", data["top_beam"], 1)
    at.integer("top_k", data["top_k"], 1)
    at.strings("tokens", data["tokens"], seq)
    return seq, layer


def _check_options(at: "_At", data: dict, layer: int) -> str:
    """The trace's options, each optional with the default older files were traced with;
    returns the mode (it decides how beam positions may move)."""
    mode = at.choice("mode", data.get("mode", "chain"), MODES)
    if data.get("layer_lo") is not None:
        at.integer("layer_lo", data["layer_lo"], 0, layer)
    at.choice("agg_heads", data.get("agg_heads", "mean"), AGG_HEADS)
    at.check("length_norm", lambda: check_length_norm(data.get("length_norm", "avg_logprob")))
    at.choice("residual", data.get("residual", "none"), RESIDUALS)
    at.flag("exclude_bos", data.get("exclude_bos", False))
    weight = at.choice("edge_weight", data.get("edge_weight", "attention"), EDGE_WEIGHTS)
    for name in ("move_threshold", "depth_discount"):
        if data.get(name) is not None:
            at.need(name, weight != "attention", "is set, but edge_weight is 'attention'")
            value = at.number(name, data[name], 0.0)
            at.need(name, 0 < value <= 1, f"must be in (0, 1], got {value!r}")
    at.integer("batch_index", data.get("batch_index", 0), 0)
    if data.get("prompt_len") is not None:  # a generated continuation follows the prompt
        at.integer("prompt_len", data["prompt_len"], 1, data["seq_len"])
    return mode


def _check_beams(at: "_At", data: dict, seq: int, layer: int, mode: str) -> None:
    """Each beam, one text per beam, and the Sankey graph drawn from them."""
    beams = at.items("beams", data["beams"])
    for i, beam in enumerate(beams):
        _check_beam(at.sub(f"beams[{i}]"), beam, data["target_pos"], seq, layer, mode)
    texts = at.strings("paths_text", data["paths_text"])
    at.need(
        "paths_text",
        len(texts) == len(beams),
        f"must hold one text per beam ({len(beams)}), got {len(texts)}",
    )
    _check_sankey(at.sub("sankey"), data["sankey"], seq, len(beams))


def _check_extras(at: "_At", data: dict, seq: int, layer: int) -> None:
    """What the tracer or verify may add: top attention, predictions, rollout, head rows and
    the verification (here only an object or null: ``TraceResult.from_dict`` reads its fields
    and names a bad one)."""
    for i, row in enumerate(at.items("top_attention", data.get("top_attention", []))):
        row_at = f"top_attention[{i}]"
        at.need(row_at, isinstance(row, list) and len(row) == 3, "must be [query, key, weight]")
        at.integer(f"{row_at}[0]", row[0], 0, seq - 1)
        at.integer(f"{row_at}[1]", row[1], 0, seq - 1)
        at.number(f"{row_at}[2]", row[2])
    for i, prediction in enumerate(at.items("predictions", data.get("predictions", []))):
        _check_prediction(at.sub(f"predictions[{i}]"), prediction, seq)
    rollout = at.items("rollout", data.get("rollout", []))
    at.need("rollout", len(rollout) in (0, seq), f"must hold 0 or {seq} values, got {len(rollout)}")
    for i, value in enumerate(rollout):
        at.number(f"rollout[{i}]", value)
    for i, row in enumerate(at.items("head_rows", data.get("head_rows", []))):
        _check_head_row(at.sub(f"head_rows[{i}]"), row, seq, layer)
    verification = data.get("verification")
    at.need(
        "verification",
        verification is None or isinstance(verification, dict),
        f"must be an object or null, got {_kind(verification)}",
    )


def _check_metadata(at: "_At", data: dict) -> None:
    """reverse-attention's ``metadata`` block, when kept, must agree with the trace's fields."""
    metadata = data.get("metadata")
    if metadata is not None:
        at.need("metadata", isinstance(metadata, dict), "must be an object")
        for name in PEER_METADATA:
            if name in metadata:
                at.need(
                    f"metadata.{name}",
                    metadata[name] == data[name],
                    f"is {metadata[name]!r} but the trace's {name} is {data[name]!r}",
                )


def _check_beam(at: "_At", beam, target: int, seq: int, layer: int, mode: str) -> None:
    at.need("", isinstance(beam, dict), f"must be an object, got {_kind(beam)}")
    names = (
        "positions",
        "edge_weights",
        "layers",
        "heads",
        "bos_mass",
        "score_raw",
        "score_norm",
        "kinds",
        "edge_attns",
        "tokens",
        "token_ids",
    )
    unknown = sorted(set(beam) - set(names), key=str)
    at.need("", not unknown, f"unknown field(s) {unknown}")
    missing = [name for name in names[:7] if name not in beam]
    at.need("", not missing, f"missing field(s) {missing}")
    positions = at.items("positions", beam["positions"])
    at.need("positions", len(positions) >= 1, "must not be empty")
    for i, p in enumerate(positions):
        at.integer(f"positions[{i}]", p, 0, seq - 1)
    at.need(
        "positions[0]", positions[0] == target, f"must be the target {target}, got {positions[0]}"
    )
    edges = len(positions) - 1
    for name in ("edge_weights", "layers", "heads", "bos_mass"):
        values = at.items(name, beam[name])
        at.need(
            name, len(values) == edges, f"must hold one value per edge ({edges}), got {len(values)}"
        )
    _check_kinds(at, beam, edges)
    for i in range(edges):
        at.number(f"edge_weights[{i}]", beam["edge_weights"][i], minimum=0.0)
        at.number(f"bos_mass[{i}]", beam["bos_mass"][i], minimum=0.0)
        at.integer(f"layers[{i}]", beam["layers"][i], 0, layer)
        if beam["heads"][i] is not None:
            at.integer(f"heads[{i}]", beam["heads"][i], 0)
        if mode == "chain":
            at.need(
                f"positions[{i + 1}]",
                positions[i + 1] < positions[i],
                "must be earlier than the position before it (chain mode)",
            )
        else:
            at.need(
                f"positions[{i + 1}]",
                positions[i + 1] <= positions[i],
                "must not be later than the position before it",
            )
    at.number("score_raw", beam["score_raw"])
    at.number("score_norm", beam["score_norm"])
    at.strings("tokens", beam.get("tokens", []), len(positions) if beam.get("tokens") else 0)
    ids = at.items("token_ids", beam.get("token_ids", []))
    at.need("token_ids", len(ids) in (0, len(positions)), "must hold one id per position")
    for i, value in enumerate(ids):
        at.integer(f"token_ids[{i}]", value, 0)


def _check_kinds(at: "_At", beam: dict, edges: int) -> None:
    """Each edge's kind (none: every edge a head's), and its attention: none recorded, or one
    per edge, a head edge's attention weight and None for a stay."""
    kinds = at.items("kinds", beam.get("kinds", []))
    at.need("kinds", len(kinds) in (0, edges), f"must hold one kind per edge ({edges})")
    for i, kind in enumerate(kinds):
        at.choice(f"kinds[{i}]", kind, ("head", "residual"))
    attns = at.items("edge_attns", beam.get("edge_attns", []))
    at.need("edge_attns", len(attns) in (0, edges), f"must hold 0 or {edges} values")
    for i, value in enumerate(attns):
        if kinds and kinds[i] == "residual":
            at.need(f"edge_attns[{i}]", value is None, f"must be null (a stay), got {_show(value)}")
        else:
            at.number(f"edge_attns[{i}]", value, minimum=0.0)


def _check_sankey(at: "_At", sankey, seq: int, n_beams: int) -> None:
    at.need(
        "",
        isinstance(sankey, dict) and set(sankey) == {"nodes", "links"},
        "must be an object with 'nodes' and 'links'",
    )
    ids = set()
    for i, node in enumerate(at.items("nodes", sankey["nodes"])):
        node_at = at.sub(f"nodes[{i}]")
        node_at.need(
            "",
            isinstance(node, dict)
            and {"id", "name", "position"} <= set(node)
            and set(node) <= {"id", "name", "position", "layer"},
            "must be an object with id, name, position (and layer)",
        )
        node_at.text("id", node["id"])
        node_at.text("name", node["name"])
        node_at.integer("position", node["position"], 0, seq - 1)
        node_at.integer("layer", node.get("layer", 0), -1)
        ids.add(node["id"])
    fields = {"source", "target", "value", "beam_indices", "layer", "heads"}
    for i, link in enumerate(at.items("links", sankey["links"])):
        link_at = at.sub(f"links[{i}]")
        link_at.need(
            "",
            isinstance(link, dict)
            and {"source", "target", "value"} <= set(link)
            and set(link) <= fields,
            f"must be an object with fields {sorted(fields)}",
        )
        for end in ("source", "target"):
            link_at.need(end, link[end] in ids, f"names no node: {link[end]!r}")
        link_at.number("value", link["value"], minimum=0.0)
        for j, b in enumerate(link_at.items("beam_indices", link.get("beam_indices", []))):
            link_at.integer(f"beam_indices[{j}]", b, 0, n_beams - 1)
        link_at.integer("layer", link.get("layer", 0), 0)
        for j, head in enumerate(link_at.items("heads", link.get("heads", []))):
            if head is not None:
                link_at.integer(f"heads[{j}]", head, 0)


_LENS_FIELDS = ("layer", "position", "tokens", "token_ids", "probs", "target_rank", "target_prob")
_WRITE_FIELDS = ("layer", "head", "position", "key", "dla", "dla_diff") + tuple(
    f"{side}{part}" for side in ("promoted", "suppressed") for part in ("", "_ids", "_logits")
)


def check_explained(at: "_At", data: dict, seq: int, layer: int) -> None:
    """What the route carried (``rat_lens.lens``): the target and foil tokens, the lens
    records, the head writes and the stays' blocks."""
    for name in ("target", "foil"):
        if data.get(f"{name}_token") is not None:
            at.text(f"{name}_token", data[f"{name}_token"])
        if data.get(f"{name}_id") is not None:
            at.integer(f"{name}_id", data[f"{name}_id"], 0)
    for i, record in enumerate(at.items("lens", data.get("lens", []))):
        rec = at.sub(f"lens[{i}]")
        _check_record(rec, record, _LENS_FIELDS)
        rec.integer("layer", record["layer"], -1, layer)
        rec.integer("position", record["position"], 0, seq - 1)
        _check_top(rec, record, "", "probs")
        for p in record["probs"] + [record["target_prob"]]:
            rec.need("probs", rec.number("probs", p, 0.0) <= 1.0, f"must be <= 1, got {p}")
        rec.integer("target_rank", record["target_rank"], 0)
    for i, write in enumerate(at.items("writes", data.get("writes", []))):
        rec = at.sub(f"writes[{i}]")
        _check_record(rec, write, _WRITE_FIELDS)
        rec.integer("layer", write["layer"], 0, layer)
        rec.integer("head", write["head"], 0)
        query = rec.integer("position", write["position"], 0, seq - 1)
        rec.integer("key", write["key"], 0, query)
        for side in ("promoted", "suppressed"):
            _check_top(rec, write, side, "_logits")
        rec.number("dla", write["dla"])
        if write["dla_diff"] is not None:
            rec.number("dla_diff", write["dla_diff"])
    for i, stay in enumerate(at.items("stays", data.get("stays", []))):
        _check_stay(at.sub(f"stays[{i}]"), stay, seq, layer)


_STAY_FIELDS = ("position", "top", "bottom", "blocks", "mlp_layer", "mlp_dla", "mlp_dla_diff")


def _check_stay(at: "_At", stay, seq: int, layer: int) -> None:
    _check_record(at, stay, _STAY_FIELDS)
    at.integer("position", stay["position"], 0, seq - 1)
    top = at.integer("top", stay["top"], 0, layer)
    bottom = at.integer("bottom", stay["bottom"], 0, top)
    for j, block in enumerate(at.items("blocks", stay["blocks"])):
        rec = at.sub(f"blocks[{j}]")
        _check_record(rec, block, ("layer", "block", "share"))
        rec.integer("layer", block["layer"], bottom, top)
        rec.choice("block", block["block"], ("attn", "mlp"))
        rec.need("share", rec.number("share", block["share"], 0.0) <= 1.0, "must be <= 1")
    if stay["mlp_layer"] is not None:
        at.integer("mlp_layer", stay["mlp_layer"], bottom, top)
    for name in ("mlp_dla", "mlp_dla_diff"):
        if stay[name] is not None:
            at.number(name, stay[name])


def _check_record(at: "_At", record, names: tuple) -> None:
    at.need(
        "",
        isinstance(record, dict) and set(record) == set(names),
        f"must be an object with fields {sorted(names)}",
    )


def _check_top(at: "_At", record: dict, side: str, values: str) -> None:
    """A top-k list: ``{side}`` (or ``tokens``) strings, ``{side}_ids`` and ``{side}{values}``
    numbers, one each per token."""
    tokens = at.strings(side or "tokens", record[side or "tokens"])
    for name in (f"{side}_ids" if side else "token_ids", f"{side}{values}"):
        items = at.items(name, record[name])
        at.need(name, len(items) == len(tokens), f"must hold {len(tokens)} items")
        for j, value in enumerate(items):
            if name.endswith("ids"):
                at.integer(f"{name}[{j}]", value, 0)
            else:
                at.number(f"{name}[{j}]", value)


def _check_head_row(at: "_At", row, seq: int, layer: int) -> None:
    names = {"layer", "head", "query", "keys", "weights"}
    at.need(
        "",
        isinstance(row, dict) and set(row) == names,
        f"must be an object with fields {sorted(names)}",
    )
    at.integer("layer", row["layer"], 0, layer)
    if row["head"] is not None:
        at.integer("head", row["head"], 0)
    query = at.integer("query", row["query"], 0, seq - 1)
    keys, weights = at.items("keys", row["keys"]), at.items("weights", row["weights"])
    at.need("weights", len(weights) == len(keys), "must hold one weight per key")
    for i, (key, weight) in enumerate(zip(keys, weights)):
        at.integer(f"keys[{i}]", key, 0, query)
        at.number(f"weights[{i}]", weight, minimum=0.0)


def _check_prediction(at: "_At", prediction, seq: int) -> None:
    names = {"position", "token", "token_ids", "tokens", "probs"}
    at.need(
        "",
        isinstance(prediction, dict) and set(prediction) == names,
        f"must be an object with fields {sorted(names)}",
    )
    at.integer("position", prediction["position"], 0, seq - 1)
    at.text("token", prediction["token"])
    k = len(at.items("token_ids", prediction["token_ids"]))
    at.strings("tokens", prediction["tokens"], k)
    probs = at.items("probs", prediction["probs"])
    at.need("probs", len(probs) == k, f"must hold {k} values")
    for i, value in enumerate(prediction["token_ids"]):
        at.integer(f"token_ids[{i}]", value, 0)
    for i, value in enumerate(probs):
        at.number(f"probs[{i}]", value, minimum=0.0)


class _At:
    """Checks that name the field they look at: ``_At("trace").sub("beams[0]")``."""

    def __init__(self, path: str):
        self.path = path

    def sub(self, name: str) -> "_At":
        return _At(f"{self.path}.{name}" if self.path else name)

    def need(self, name: str, ok: bool, message: str) -> None:
        if not ok:
            field = f"{self.path}.{name}" if name else self.path
            raise RatLensError(f"{self._prefix(field)}{message}")

    def check(self, name: str, run: Callable[[], Any]) -> None:
        try:
            run()
        except RatLensError as err:
            raise RatLensError(f"{self._prefix(self.path)}{err}") from None

    def integer(
        self,
        name: str,
        value,
        minimum: Optional[int] = None,
        maximum: Optional[int] = None,
        hint: str = "",
    ) -> int:
        ok = (
            isinstance(value, int)
            and not isinstance(value, bool)
            and (minimum is None or value >= minimum)
            and (maximum is None or value <= maximum)
        )
        if not ok:
            span = (
                f" in {minimum}..{maximum}"
                if maximum is not None
                else (f" >= {minimum}" if minimum is not None else "")
            )
            self.need(name, False, f"must be an int{span}, got {_show(value)}{hint}")
        return value

    def number(self, name: str, value, minimum: Optional[float] = None) -> float:
        ok = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (minimum is None or value >= minimum)
        )
        span = f" >= {minimum:g}" if minimum is not None else ""
        self.need(name, ok, f"must be a finite number{span}, got {_show(value)}")
        return float(value)

    def text(self, name: str, value) -> str:
        self.need(name, isinstance(value, str), f"must be a string, got {_kind(value)}")
        return value

    def flag(self, name: str, value) -> bool:
        self.need(name, isinstance(value, bool), f"must be true or false, got {_show(value)}")
        return value

    def choice(self, name: str, value, choices) -> str:
        self.need(
            name,
            isinstance(value, str) and value in choices,
            f"must be one of {list(choices)}, got {_show(value)}",
        )
        return value

    def items(self, name: str, value) -> list:
        self.need(name, isinstance(value, list), f"must be a list, got {_kind(value)}")
        return value

    def strings(self, name: str, value, length: Optional[int] = None) -> list:
        self.items(name, value)
        if length is not None:
            self.need(name, len(value) == length, f"must hold {length} strings, got {len(value)}")
        for i, item in enumerate(value):
            self.text(f"{name}[{i}]", item)
        return value

    @staticmethod
    def _prefix(field: str) -> str:
        head, _, rest = field.partition(".")
        return f"{head}: {rest} " if rest else f"{head}: "


def _kind(value) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{_kind(value)} ({text[:30]}...)"


def from_reverse_attention(data: dict) -> dict:
    """reverse-attention 0.1.0's ``trace.json`` (``metadata``, ``tokens``, ``beams`` without
    layers/heads/BOS mass, ``sankey``, ``paths_text``) as our ``to_dict()``, checked: a chain in
    its layer, heads aggregated, BOS mass unknown (read as 0), the length norm read off the
    scores, the Sankey graph left empty (``TraceResult.from_dict`` rebuilds it from the beams by
    the same rule)."""
    meta = data["metadata"]
    unknown = sorted(set(data) - {"metadata", "tokens", "beams", "sankey", "paths_text"})
    if unknown or not isinstance(data.get("beams"), list):
        raise RatLensError(
            f"reverse-attention trace: unexpected fields {unknown} or no 'beams' list"
        )
    beams = []
    for i, beam in enumerate(data["beams"]):
        if (
            not isinstance(beam, dict)
            or not isinstance(beam.get("positions"), list)
            or not isinstance(beam.get("edge_attns"), list)
        ):
            raise RatLensError(
                f"reverse-attention trace: beams[{i}] needs 'positions' and 'edge_attns' lists"
            )
        edges = len(beam["edge_attns"])
        beams.append(
            {
                "positions": beam["positions"],
                "edge_weights": beam["edge_attns"],  # the peer's weights are attention
                "edge_attns": beam["edge_attns"],
                "layers": [meta.get("layer")] * edges,
                "heads": [None] * edges,
                "bos_mass": [0.0] * edges,
                "score_raw": beam.get("score_raw"),
                "score_norm": beam.get("score_norm"),
                "tokens": beam.get("tokens", []),
                "token_ids": beam.get("token_ids", []),
            }
        )
    ours = {
        **{name: meta.get(name) for name in PEER_METADATA},
        "tokens": data.get("tokens"),
        "beams": beams,
        "sankey": {"nodes": [], "links": []},
        "paths_text": data.get("paths_text"),
        "mode": "chain",
        "length_norm": _length_norm_of(beams),
        "format_version": FORMAT_VERSION,
    }
    return check_trace(ours, "reverse-attention trace")


def _length_norm_of(beams: list[dict]) -> str:
    """Which of reverse-attention's norms turns each beam's score_raw into its score_norm."""
    for norm in ("avg_logprob", "none", "sqrt"):

        def matches(beam, norm=norm) -> bool:
            edges, raw, scored = len(beam["edge_attns"]), beam["score_raw"], beam["score_norm"]
            if not all(isinstance(x, (int, float)) for x in (raw, scored)):
                return False
            denominator = (
                1.0
                if norm == "none" or edges == 0
                else float(edges)
                if norm == "avg_logprob"
                else math.sqrt(edges)
            )
            return math.isclose(raw / denominator, scored, rel_tol=1e-9, abs_tol=1e-12)

        if all(matches(beam) for beam in beams):
            return norm
    return "avg_logprob"  # a pow:α norm: the scores are kept as saved

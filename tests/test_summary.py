"""Summaries: masses by hand, every trace mode, markdown that parses, text that fits 100 columns."""

import io
import itertools
import random

import pytest
import torch
from markdown_it import MarkdownIt
from rich.cells import cell_len

import rat_lens
from rat_lens import TraceResult, trace_attention
from rat_lens.capture import capture_patterns
from rat_lens.compat import ReverseAttentionTracer
from rat_lens.models import load, repeated_tokens
from rat_lens.result import (
    Beam,
    BeamPath,
    BlockWrite,
    HeadTable,
    HeadWrite,
    LensRecord,
    Move,
    Stay,
    StayWrite,
    build_sankey,
)
from rat_lens.roles import head_roles
from rat_lens.search.stats import attention_stats, rollout_importance
from rat_lens.summary import Summary, summarize
from rat_lens.text import path_text

TEXT = "cat dog red blue green cat dog red"


def result_from(attn, tokens, target=-1, **opts) -> TraceResult:
    """A TraceResult from any attention tensor, built as the tracer builds it (no model)."""
    beams = trace_attention(attn, target, **opts)
    paths = [BeamPath.from_beam(b, tokens, list(range(len(tokens)))) for b in beams]
    mode = "chain" if opts.get("layers") is None else "layers"
    top = beams[0].layers[0] if beams else 0
    return TraceResult(
        seq_len=len(tokens),
        target_pos=beams[0].positions[0],
        layer=top,
        top_beam=5,
        top_k=5,
        tokens=tokens,
        beams=paths,
        sankey=build_sankey(paths, tokens, mode, top),
        paths_text=[path_text(p) for p in paths],
        mode=mode,
        layer_lo=opts["layers"][0] if mode == "layers" else top,
        agg_heads=opts.get("agg_heads", "mean"),
        token_ids=list(range(len(tokens))),
    )


def full_depth_beam(seed: int, n_layers: int = 30, seq: int = 300) -> BeamPath:
    """A contribution-weighted route as a full-depth trace makes them: from the target at the top
    layer, each layer a stay (kind "residual", head None) or a head move to an earlier position."""
    rng = random.Random(seed)
    positions, kinds, heads, weights = [seq - 1], [], [], []
    for _ in range(n_layers):
        move = rng.random() < 0.2 and positions[-1] > 0
        kinds.append("head" if move else "residual")
        heads.append(rng.randrange(9) if move else None)
        positions.append(rng.randrange(positions[-1]) if move else positions[-1])
        weights.append(rng.uniform(0.05, 0.3) if move else rng.uniform(0.5, 0.9))
    return BeamPath(
        positions=positions,
        tokens=[f" w{p}" for p in positions],
        token_ids=positions,
        edge_weights=weights,
        score_raw=1.0,
        score_norm=1.0,
        layers=list(range(n_layers - 1, -1, -1)),
        heads=heads,
        bos_mass=[0.0] * n_layers,
        kinds=kinds,
    )


def test_route_lists_moves_and_runs_of_stays_target_first():
    beam = Beam(
        positions=[9, 9, 9, 4, 4, 3, 3],
        edge_weights=[0.7, 0.6, 0.12, 0.8, 0.31, 0.5],
        layers=[5, 4, 3, 2, 1, 0],
        heads=[None, None, 6, None, 2, None],
        bos_mass=[0.0] * 6,
        score_raw=0.0,
        score_norm=0.0,
        kinds=["residual", "residual", "head", "residual", "head", "residual"],
    )
    assert beam.route() == [
        Stay(9, 5, 4, (0, 1)),
        Move(2, 3, 6, 9, 4, 0.12),
        Stay(4, 2, 2, (3,)),
        Move(4, 1, 2, 4, 3, 0.31),
        Stay(3, 0, 0, (5,)),
    ]
    assert beam.moves() == [Move(2, 3, 6, 9, 4, 0.12), Move(4, 1, 2, 4, 3, 0.31)]
    path = BeamPath.from_beam(beam, ["a", "b", "c", " B", " C", "e", "f", "g", "h", " B"], [0] * 10)
    assert path_text(path) == (
        "' B'@9 stays L5-L4 ←L3.H6(0.12)─ ' C'@4 stays L2 ←L1.H2(0.31)─ ' B'@3 stays L0 "
        "(score: 0.0000)"
    )
    assert path_text(path, score=False) == path_text(path).rsplit(" (score", 1)[0]


def test_routes_without_stays_write_every_edge_as_a_move():
    """Attention edges (every layer a head's, self-reads included) and chains: one move per
    edge, in the edges' order; aggregated heads print as the layer alone."""
    chain = BeamPath(
        positions=[7, 4, 0], tokens=[" B", " C", "<s>"], token_ids=[0, 1, 2],
        edge_weights=[0.912, 0.38], score_raw=-1.06, score_norm=-0.53,
        layers=[1, 1], heads=[None, None], bos_mass=[0.0, 0.0],
    )  # fmt: skip
    assert chain.moves() == [Move(0, 1, None, 7, 4, 0.912), Move(1, 1, None, 4, 0, 0.38)]
    assert path_text(chain) == "' B'@7 ←L1(0.91)─ ' C'@4 ←L1(0.38)─ '<s>'@0 (score: -0.5300)"
    per_head = BeamPath.from_beam(
        Beam(positions=[5, 5, 2], edge_weights=[0.4, 0.9], layers=[1, 0], heads=[3, 0],
             bos_mass=[0.0, 0.0], score_raw=0.0, score_norm=0.0),
        ["x"] * 6, list(range(6)),
    )  # fmt: skip
    assert path_text(per_head, score=False) == "'x'@5 ←L1.H3(0.40)─ 'x'@5 ←L0.H0(0.90)─ 'x'@2"


@pytest.mark.parametrize("seed", range(20))
def test_a_route_reads_back_into_its_beam(seed):
    """Oracle: the edges, rebuilt from the route (each stay run edge by edge), are the beam's."""
    beam = full_depth_beam(seed)
    edges = {}
    for step in beam.route():
        if isinstance(step, Stay):
            assert list(step.edges) == list(range(step.edges[0], step.edges[-1] + 1))
            for i, layer in zip(step.edges, range(step.top, step.bottom - 1, -1)):
                edges[i] = (layer, None, step.position, step.position, "residual")
        else:
            edges[step.edge] = (step.layer, step.head, step.query, step.key, "head")
            assert step.weight == beam.edge_weights[step.edge]
    runs = [isinstance(step, Stay) for step in beam.route()]
    assert not any(a and b for a, b in itertools.pairwise(runs))  # stays merged into runs
    assert [edges[i] for i in range(beam.num_edges)] == [
        (beam.layers[i], beam.heads[i], beam.positions[i], beam.positions[i + 1], beam.kinds[i])
        for i in range(beam.num_edges)
    ]


def test_a_full_depth_route_fits_a_few_lines():
    """The issue's measurement: 30 edges, most of them stays, wrapped onto ~30 lines. Written as
    moves with compressed stays, every beam's circuit takes at most one line per two moves
    (and one more) in a 100-column summary."""
    beams = [full_depth_beam(seed) for seed in range(5)]
    tokens = [f" w{p}" for p in range(300)]
    result = TraceResult(
        seq_len=300, target_pos=299, layer=29, top_beam=5, top_k=5, tokens=tokens, beams=beams,
        sankey=build_sankey(beams, tokens, "layers", 29), paths_text=[path_text(b) for b in beams],
        mode="layers", layer_lo=0, agg_heads="none", edge_weight="value_norm",
    )  # fmt: skip
    summary = summarize(result)
    text = summary.to_text()
    assert max(cell_len(line) for line in text.splitlines()) <= 100
    rows = text.split("#  score")[1].split("\n\n")[0].splitlines()[1:]
    starts = [i for i, line in enumerate(rows) if line[:1].isdigit()] + [len(rows)]
    for beam, start, end in zip(beams, starts, starts[1:]):
        assert beam.num_edges == 30 and end - start <= len(beam.moves()) // 2 + 1
    assert "stays L29-" in summary.beams[0].circuit
    assert "share: the edge share of the block output (value_norm)" in text
    check_outputs(summary)


def test_masses_by_hand_on_a_two_layer_per_head_trace():
    attn = torch.zeros(2, 2, 3, 3)  # [layer, head, q, k]
    attn[:, :, 0, 0] = 1.0
    attn[:, :, 2, 2] = 1.0
    attn[0, 0, 1] = torch.tensor([1.0, 0.0, 0.0])  # layer 0, q1: head 0 reads k0, head 1 mostly k1
    attn[0, 1, 1] = torch.tensor([0.1, 0.9, 0.0])
    attn[1, :, 1, 1] = 1.0
    attn[1, 0, 2] = torch.tensor([0.2, 0.8, 0.0])  # layer 1, q2: head 0 -> k1, head 1 -> k0
    attn[1, 1, 2] = torch.tensor([0.6, 0.0, 0.4])
    result = result_from(
        attn,
        ["a", "b", "c"],
        layers=(0, 1),
        agg_heads="none",
        top_beam=3,
        top_k=2,
        length_norm="none",
        stop_at_bos=False,
    )
    # A: 2 -(L1.H0 .8)-> 1 -(L0.H0 1)-> 0;  B: 2 -(L1.H0 .8)-> 1 -(L0.H1 .9)-> 1;
    # C: 2 -(L1.H1 .6)-> 0
    assert [b.positions for b in result.beams] == [[2, 1, 0], [2, 1, 1], [2, 0]]
    # softmax of summed log-weights = each path's product of weights over their sum
    a, b, c = (p / 2.12 for p in (0.8, 0.72, 0.6))
    summary = summarize(result)
    masses = {(h.layer, h.head): h.mass for h in summary.heads}
    assert masses == pytest.approx(
        {(1, 0): (a + b) * 0.8, (0, 0): a * 1.0, (0, 1): b * 0.9, (1, 1): c * 0.6}
    )
    total = sum(masses.values())
    layer_mass = {x.layer: (x.mass, x.share) for x in summary.layers}
    assert layer_mass[1][0] == pytest.approx((a + b) * 0.8 + c * 0.6)
    assert layer_mass[0][1] == pytest.approx((a + b * 0.9) / total)
    assert [x.share for x in summary.beams] == pytest.approx([a, b, c])
    assert summary.beams[0].circuit == "'c'@2 ←L1.H0(0.80)─ 'b'@1 ←L0.H0(1.00)─ 'a'@0"
    assert summary.importance["beam_mass"] == pytest.approx(
        [a * 1.0 + c * 0.6, (a + b) * 0.8 + b * 0.9, 0.0]
    )
    top = summary.edges[0]
    assert (top.layer, top.head, top.key, top.query, top.beams) == (1, 0, 1, 2, [0, 1])
    assert top.mass == pytest.approx((a + b) * 0.8)
    assert [t.position for t in summary.tokens] == [1, 0]
    assert [t.beam_mass for t in summary.tokens] == pytest.approx(
        [(a + b) * 0.8 + b * 0.9, a + c * 0.6]
    )


def induction_trace(model, **opts):
    tokens = model.to_tokens(TEXT)
    return tokens, rat_lens.trace(model, tokens[0], **opts)


@pytest.mark.parametrize(
    "opts",
    [
        dict(layer=1),
        dict(layer=0, agg_heads="max"),
        dict(layers=(0, 1)),
        dict(layers=(0, 1), agg_heads="none"),
        dict(layers=(0, 1), residual="rollout", exclude_bos=True),
    ],
)
def test_every_mode_summarises_with_patterns_and_logits(model, opts):
    tokens, result = induction_trace(model, **opts)
    logits, cache = model.run_with_cache(tokens)
    summary = summarize(
        result,
        patterns=cache,
        logits=logits,
        tokenizer=model.tokenizer,
        roles=head_roles(model, tokens),
    )
    assert len(summary.beams) == len(result.beams)
    assert sum(h.share for h in summary.heads) == pytest.approx(1.0)
    assert {h.layer for h in summary.heads} == {x.layer for x in summary.layers}
    traced = {result.layer, result.layer_lo}
    assert set(summary.stats.layers) == traced and summary.stats.n_heads == 4
    assert sum(summary.importance["rollout"]) == pytest.approx(1.0)
    assert summary.predictions[0].position == result.target_pos
    assert summary.predictions[0].tokens[0] == model.to_string(logits[0, -1].argmax())
    if opts.get("agg_heads", "mean" if "layer" in opts else "none") != "none":
        assert all(h.head is None and h.role == "" for h in summary.heads)
    check_outputs(summary)


def test_captured_head_mean_gives_the_same_rollout_and_aggregated_stats(model):
    tokens, result = induction_trace(model, layers=(0, 1), agg_heads="mean")
    _, full = model.run_with_cache(tokens)
    mean = capture_patterns(model, tokens, [0, 1], agg_heads="mean")  # what the tracer keeps
    a, b = summarize(result, patterns=full), summarize(result, patterns=mean)
    assert a.importance["rollout"] == pytest.approx(b.importance["rollout"], abs=1e-6)
    assert b.stats.aggregated and b.stats.n_heads == 1 and not a.stats.aggregated
    assert "L1     mean" in b.to_text()


def test_batched_traces_use_their_own_prompt(model):
    tokens = repeated_tokens(3, prefix_len=12, repeat_len=8, seed=5)
    results = ReverseAttentionTracer(model).trace_batch(
        tokens, [-1, -3], layers=(0, 1), agg_heads="none", predictions=0
    )  # no predictions recorded: summarize reads them from the logits given
    logits, cache = model.run_with_cache(tokens)
    for result in results:
        b = result.batch_index
        summary = summarize(result, patterns=cache, logits=logits)
        stats = attention_stats(cache["pattern", 1][b])
        assert summary.stats.get("entropy", 1, 2) == pytest.approx(stats["entropy"][2].item())
        layers_lo_hi = torch.stack([cache["pattern", layer][b] for layer in (0, 1)])
        assert summary.importance["rollout"] == pytest.approx(
            rollout_importance(layers_lo_hi, result.target_pos).tolist(), abs=1e-6
        )
        assert summary.predictions[0].token_ids[0] == logits[b, result.target_pos].argmax()
        assert summary.predictions[0].tokens[0] == str(summary.predictions[0].token_ids[0])
    assert [summarize(r).target_pos for r in results] == [20, 18] * 3


def test_fields_recorded_by_the_tracer_are_used(model):
    tokens, result = induction_trace(model, layers=(0, 1), agg_heads="none")
    roles = head_roles(model, tokens)
    stats = HeadTable.from_tensors([0], {"entropy": torch.ones(1, 4)})
    result.predictions = [dict(position=8, token="red", token_ids=[3], tokens=["cow"], probs=[0.5])]
    result.rollout = [1.0 / 9] * 9
    summary = summarize(result, roles=roles.to_dict(), stats=stats.to_dict())
    assert summary.roles == roles and summary.stats.layers == [0]
    assert summary.predictions[0].tokens == ["cow"] and "rollout" in summary.importance
    assert Summary.from_json(summary.to_json()) == summary
    result.predictions, result.rollout = [], []  # empty fields: the tensors given win
    logits = torch.randn(1, 9, 64)
    summary = summarize(result, logits=logits, k=1)
    assert summary.predictions[0].token_ids == [int(logits[0, 8].argmax())]


def test_json_round_trip_with_every_section(model):
    tokens, result = induction_trace(model, layers=(0, 1), agg_heads="none")
    logits, cache = model.run_with_cache(tokens)
    summary = summarize(
        result,
        patterns=cache,
        logits=logits,
        roles=head_roles(model, tokens),
        tokenizer=model.tokenizer,
    )
    again = Summary.from_json(summary.to_json())
    assert again == summary and again.to_markdown() == summary.to_markdown()


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every table as rows of cell texts (header first), by an independent GFM parser."""
    tables, rows, row = [], None, None
    for token in MarkdownIt("commonmark").enable("table").parse(text):
        if token.type == "table_open":
            rows = []
        elif token.type == "tr_open":
            row = []
        elif token.type == "inline" and row is not None:  # the cell as rendered, escapes undone
            row.append("".join(c.content for c in token.children if c.type != "softbreak"))
        elif token.type == "tr_close":
            rows.append(row)
            row = None
        elif token.type == "table_close":
            tables.append(rows)
    return tables


def check_outputs(summary: Summary, width: int = 100) -> None:
    """Markdown parses into one well-formed table per section, HTML has them all, escaped;
    text and rich fit ``width``."""
    md = summary.to_markdown()
    tables = markdown_tables(md)
    assert len(tables) == md.count("\n### ")
    for table in tables:
        assert len(table) >= 2 and len({len(row) for row in table}) == 1
    beams = tables[0]
    assert beams[0] == ["#", "score", "raw", "share", "circuit"]
    circuits = [row[-1] for row in beams[1:]]
    assert circuits == [b.circuit for b in summary.beams]
    page = summary.html_fragment()  # tokens such as "<script>" arrive escaped
    assert page.count("<table>") == len(tables) and "<script" not in page
    text = summary.to_text(width)
    assert max(cell_len(line) for line in text.splitlines()) <= width
    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(summary)
    assert max(cell_len(line) for line in console.export_text().splitlines()) <= width


def awkward_tokens(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pool = [
        " the",
        "a|b",
        "`tick`",
        "[b]bold[/b]",
        "\n",
        "日本語のトークンです",
        "x" * 60,
        "*_#",
        " ",
        "é",
        "<script>",
        "🙂🙂🙂",
    ]
    return [rng.choice(pool) for _ in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_long_and_awkward_traces_fit_and_parse(seed):
    g = torch.Generator().manual_seed(seed)
    seq = 40
    scores = torch.randn(3, 4, seq, seq, generator=g) * 3
    attn = scores.masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), -1e9).softmax(-1)
    tokens = awkward_tokens(seq, seed)
    longest = 0
    for opts in (
        dict(layer=2, top_beam=8),
        dict(layers=(0, 2), agg_heads="none", top_beam=8),
        dict(layer=1, agg_heads="none", length_norm="none"),
    ):
        result = result_from(attn, tokens, **opts)
        summary = summarize(
            result,
            patterns={layer: attn[layer] for layer in range(3)},
            logits=torch.randn(seq, 30, generator=g),
        )
        longest = max([longest] + [cell_len(b.circuit) for b in summary.beams])
        check_outputs(summary)
        check_outputs(summary, width=72)
    assert longest > 100  # some circuit had to wrap


def circuit_hits(model, prompts, roles=None) -> tuple[int, Summary]:
    """How many prompts' summaries show the top beam as induction head → previous-token head."""
    hits = 0
    for m, j, seed in prompts:
        tokens = repeated_tokens(1, prefix_len=m, repeat_len=j, seed=seed)
        result = rat_lens.trace(model, tokens[0], layers=(0, 1), agg_heads="none", exclude_bos=True)
        summary = summarize(result, roles=roles if roles is not None else head_roles(model, tokens))
        best, heads = result.beams[0], {(h.layer, h.head): h.role for h in summary.heads}
        hits += (
            best.positions == [m + j, j + 1, j]
            and best.layers == [1, 0]
            and summary.beams[0].roles == ["induction", "prev-token"]
            and heads[(1, best.heads[0])] == "induction"
            and heads[(0, best.heads[1])] == "prev-token"
        )
    return hits, summary


def test_the_summary_names_the_induction_circuit_on_many_prompts():
    """BOS x1..xm x1..xj: from the last x_j, an induction head (layer 1) reads x_(j+1) after the
    earlier x_j, which got x_j through a previous-token head (layer 0). The summary names both
    by TL's detector. Fails until the shipped weights show the circuit."""
    model = load("induction-2l")
    rng = random.Random(0)
    prompts = []
    for seed in range(40):
        m = rng.randint(10, 30)
        prompts.append((m, rng.randint(3, min(m - 1, 62 - m)), 2000 + seed))
    # Roles from a reference batch: TL's score of a short repeat is diluted by the rows before it.
    hits, summary = circuit_hits(model, prompts, head_roles(model, repeated_tokens(16, 24, 24)))
    assert hits >= 36, f"{hits}/40 prompts: top beam is not induction → previous-token"
    roles_line = [
        line for line in summary.to_text().splitlines() if line.startswith("induction_head")
    ][0]
    assert "L1.H" in roles_line and "none" not in roles_line
    # Roles of each prompt's own traced tokens, where the repeat is long enough to score.
    prompts = [
        (m, rng.randint(min(m // 2 + 2, 47 - m), min(m, 47 - m)), 3000 + m) for m in range(10, 30)
    ]
    hits, _ = circuit_hits(model, prompts)
    assert hits >= 18, f"{hits}/20 prompts: top beam is not induction → previous-token"


def test_a_chain_ending_on_the_sink_says_so(model):
    """A chain's best beam that ends on position 0 shows the attention sink, not a circuit:
    the summary says so; a per-head layers trace (the default) does not need the note."""
    text = "cat dog red blue cat dog red"
    for layer in (0, 1):
        chain = rat_lens.trace(model, text, layer=layer)
        summary = rat_lens.summarize(chain)
        assert summary.ends_on_sink == (chain.beams[0].positions[-1] == 0)
        assert ("attention sink" in summary.to_text()) == summary.ends_on_sink
    assert any(
        rat_lens.summarize(rat_lens.trace(model, text, layer=layer)).ends_on_sink
        for layer in (0, 1)
    ), "neither chain ends on the sink: the note is untested"
    assert not rat_lens.summarize(rat_lens.trace(model, text)).ends_on_sink


@pytest.mark.parametrize("foil", [None, " cat"])
def test_an_explained_trace_says_what_its_route_carried(model, foil):
    """The lens line against the model's own residual stream decoded by hand, one row per
    head write (per head and query), each stay's writers; a trace not explained says nothing."""
    tokens = model.to_tokens(TEXT)
    result = rat_lens.trace(model, tokens, layers=(0, 1), agg_heads="none", explain=True,
                            foil_token=foil)  # fmt: skip
    summary = summarize(result)
    carried = summary.carried
    _, cache = model.run_with_cache(tokens)
    t = result.target_pos
    tops = []  # whether the lens reads the target on top, embeddings first
    for name in ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]:
        logits = model.ln_final(cache[name][:, t : t + 1])[0, 0] @ model.W_U + model.b_U
        tops.append(int(logits.argmax()) == result.target_id)
    first = next((i - 1 for i in range(len(tops)) if all(tops[i:])), None)
    assert carried.top1_from == first and carried.target == result.target_token
    heads_at = list(dict.fromkeys((w.layer, w.head, w.position) for w in result.writes))
    assert [(w.layer, w.head, w.position) for w in carried.writes] == heads_at
    assert carried.stays == result.stays and carried.foil == result.foil_token
    text = summary.to_text()
    why = f"why {result.target_token!r}"
    why += "" if foil is None else f" and not {result.foil_token!r}"
    assert why in text and ("DLA T−F" in text) == (foil is not None)
    assert Summary.from_json(summary.to_json()) == summary
    check_outputs(summary)
    plain = summarize(rat_lens.trace(model, tokens, layers=(0, 1), agg_heads="none"))
    assert plain.carried is None and "What the route carried" not in plain.to_text()


def test_a_result_with_a_lens_but_no_token_explained_says_what_its_route_carried():
    """A hand-made (or older) result with lens, writes and stays but target_token None: every
    format names the token explained in words, never as the token ``None``."""
    attn = torch.softmax(torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(0)), -1)
    attn = attn.tril() / attn.tril().sum(-1, keepdim=True)
    result = result_from(attn, [" a", " b", " c", " a", " b"], layers=(0, 1), agg_heads="none")
    move = result.beams[0].moves()[0]
    result.lens = [LensRecord(1, 4, [" c"], [2], [0.5], target_rank=0, target_prob=0.5)]
    result.writes = [
        HeadWrite(move.layer, move.head, 4, move.key, [" c"], [2], [1.0], [" a"], [0], [-1.0], 0.3)
    ]
    result.stays = [StayWrite(position=4, top=1, bottom=1, blocks=[BlockWrite(1, "attn", 1.0)])]
    assert result.target_token is None
    summary = summarize(result)
    text = summary.to_text()
    assert "What the route carried\n" in text and "None" not in text
    assert "reads the token explained as its top token from L1 up" in " ".join(text.split())
    assert "None" not in summary.to_markdown() and "None" not in summary.html_fragment()
    check_outputs(summary)

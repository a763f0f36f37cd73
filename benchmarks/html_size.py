"""Size of the rendered HTML page for large traces (the issue's bound: under 2 MB).

The headline case: a 30-layer per-head trace (``agg_heads="none"``) of a 2,000-token prompt,
from a random causal attention stack ``[30, heads, 2000, 2000]`` (4 heads by default, to keep
~2 GB of memory; the page holds only traced edges, so the head count barely changes its size).
Also a 2,000-token chain-mode trace on a previous-token matrix, where every beam runs ~2,000
hops: the most nodes a trace of that length can have.

Usage: python benchmarks/html_size.py [--tokens 2000] [--layers 30] [--heads 4]
"""

import argparse
import random
import time

import torch
from beam_search import previous_token_matrix  # same matrix as the search benchmark

import rat_lens
from rat_lens.render import to_html
from rat_lens.render._payload import inline_json, payload
from rat_lens.result import BeamPath, TraceResult, build_sankey, path_text

WORDS = [
    " the",
    " cat",
    " sat",
    " on",
    " mat",
    ",",
    ".",
    "\n",
    " attention",
    " sink",
    " über",
    " 東京",
    " 🙂",
    "\t",
    " supercalifragilisticexpialidocious",
]


def causal_stack(layers: int, heads: int, n: int, seed: int = 0) -> torch.Tensor:
    """Random causal attention, one layer at a time (peak memory: the stack plus one layer)."""
    gen = torch.Generator().manual_seed(seed)
    future = ~torch.ones(n, n, dtype=torch.bool).tril()
    stack = torch.empty(layers, heads, n, n)
    for layer in range(layers):
        logits = torch.randn(heads, n, n, generator=gen) * 3
        stack[layer] = logits.masked_fill_(future, float("-inf")).softmax(-1)
    return stack


def as_result(beams, tokens, layer_ids, *, chain, agg_heads, top_beam, top_k) -> TraceResult:
    """A TraceResult built from tensor-search beams the way rat_lens.tracer builds one."""
    ids = list(range(len(tokens)))
    mode = "chain" if chain else "layers"
    paths = [BeamPath.from_beam(beam, tokens, ids) for beam in beams]
    return TraceResult(
        seq_len=len(tokens),
        target_pos=len(tokens) - 1,
        layer=layer_ids[0],
        top_beam=top_beam,
        top_k=top_k,
        tokens=tokens,
        beams=paths,
        sankey=build_sankey(paths, tokens, mode, layer_ids[0]),
        paths_text=[path_text(p) for p in paths],
        mode=mode,
        layer_lo=layer_ids[-1],
        agg_heads=agg_heads,
        token_ids=ids,
    )


def measure(name: str, result: TraceResult) -> None:
    page = to_html(result).encode()
    data = inline_json(payload(result)).encode()
    print(
        f"| {name} | {len(result.beams)} | {len(result.sankey.nodes)} | "
        f"{len(result.sankey.links)} | {len(data) / 1e3:,.1f} kB | {len(page) / 1e6:.3f} MB | "
        f"{'yes' if len(page) < 2e6 else 'NO'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()
    n = args.tokens
    tokens = ["<bos>"] + random.Random(0).choices(WORDS, k=n - 1)

    start = time.perf_counter()
    stack = causal_stack(args.layers, args.heads, n)
    print(f"random stack {tuple(stack.shape)} built in {time.perf_counter() - start:.1f} s\n")
    print("| trace | beams | nodes | links | inline data | HTML | < 2 MB |")
    print("|---|---|---|---|---|---|---|")
    for top_beam, top_k in [(5, 5), (20, 10)]:
        beams = rat_lens.trace_attention(
            stack,
            n - 1,
            layers=(0, args.layers - 1),
            agg_heads="none",
            top_beam=top_beam,
            top_k=top_k,
            bos_positions=[0],
            exclude_bos=True,
        )
        result = as_result(
            beams,
            tokens,
            list(range(args.layers - 1, -1, -1)),
            chain=False,
            agg_heads="none",
            top_beam=top_beam,
            top_k=top_k,
        )
        measure(
            f"layers {args.layers - 1}→0, {args.heads} heads, per head, {n} tokens, "
            f"top_beam {top_beam}, top_k {top_k}",
            result,
        )
    del stack

    beams = rat_lens.trace_attention(previous_token_matrix(n), n - 1, top_beam=5, top_k=5)
    measure(
        f"chain, previous-token matrix, {n} tokens, top_beam 5, top_k 5",
        as_result(beams, tokens, [0], chain=True, agg_heads="mean", top_beam=5, top_k=5),
    )


if __name__ == "__main__":
    main()

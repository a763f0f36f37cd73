"""Beam search alone, rat_lens against reverse-attention 0.1.0 on the same matrix.

(a) chain mode on a previous-token-like matrix (0.9 of each row on the previous token, the rest
spread), where paths run ~n hops as on trained previous-token heads; beams must be identical.
(b) layers mode per head: 12 layers x 12 heads at 2,048 tokens, top_beam 50, top_k 10 (the
peer has no such mode).

Each configuration runs in a fresh process; times are medians of --repeat runs (the peer runs
once where it takes longer than 5 s). Usage: python benchmarks/beam_search.py [--quick]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def previous_token_matrix(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rest = torch.rand(n, n, generator=gen).tril(-2)
    attn = rest / rest.sum(-1, keepdim=True).clamp_min(1e-9) * 0.1
    attn[torch.arange(1, n), torch.arange(n - 1)] += 0.9
    attn[0, 0] = attn[1, 0] = 1.0
    return attn


def per_head_stack(n: int, layers: int = 12, heads: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, heads, n, n, generator=gen) * 3
    return logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")).softmax(-1)


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        if times[-1] > 5:
            break
    return statistics.median(times), out


def run_one(kind: str, n: int, top_beam: int, top_k: int, repeat: int) -> dict:
    from rat_lens import trace_attention

    if kind == "chain":
        from reverse_attention.beam import beam_search_backward

        attn = previous_token_matrix(n)
        ours_t, ours = timed(lambda: trace_attention(attn, top_beam=top_beam, top_k=top_k), repeat)
        peer_t, peer = timed(lambda: beam_search_backward(attn, n - 1, top_beam, top_k), repeat)
        same = [b.positions for b in ours] == [p.positions for p in peer] and all(
            abs(b.score_raw - p.log_score) < 1e-6 for b, p in zip(ours, peer)
        )
        return dict(ours=ours_t, peer=peer_t, same=same, hops=ours[0].num_edges)
    stack = per_head_stack(n)
    ours_t, ours = timed(
        lambda: trace_attention(
            stack, layers=(0, 11), agg_heads="none", top_beam=top_beam, top_k=top_k
        ),
        repeat,
    )
    return dict(ours=ours_t, peer=None, same=None, hops=ours[0].num_edges)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 and 1,024 tokens only")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*json.loads(args.one), args.repeat)))
        return

    sizes = [512, 1024] if args.quick else [512, 1024, 2048]
    configs = [("chain", n, b, k) for n in sizes for b, k in ((5, 5), (20, 20), (50, 10))]
    configs.append(("layers/head", 1024 if args.quick else 2048, 50, 10))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(
        "| search | tokens | top_beam/top_k | hops | rat_lens (s) | reverse-attention (s) "
        "| speed-up | same beams |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind, n, b, k in configs:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--repeat",
                str(args.repeat),
                "--one",
                json.dumps([kind.split("/")[0], n, b, k]),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout)
        peer = "-" if r["peer"] is None else f"{r['peer']:.3f}"
        ratio = "-" if r["peer"] is None else f"{r['peer'] / r['ours']:.0f}x"
        same = "-" if r["same"] is None else ("yes" if r["same"] else "NO")
        print(
            f"| {kind} | {n:,} | {b}/{k} | {r['hops']} | {r['ours']:.3f} | {peer} | {ratio} "
            f"| {same} |",
            flush=True,
        )
        if (kind, n, b, k) == ("chain", 2048, 50, 10):
            speed_up = r["peer"] / r["ours"]
            target = (
                f"\nTarget (issue 7): chain mode at 2,048 tokens, 50/10, >= 100x faster than "
                f"the peer with identical beams: {speed_up:.0f}x, beams "
                f"{'identical' if r['same'] else 'DIFFERENT'}: "
                f"{'met' if speed_up >= 100 and r['same'] else '**missed**'}."
            )
    if not args.quick:
        print(target)


if __name__ == "__main__":
    main()

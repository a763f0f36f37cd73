"""The whole trace, rat_lens against reverse-attention 0.1.0 on the same weights and tokens.

A GPT-2-small-config Hugging Face model with seeded random weights (eager attention), wrapped by
TransformerBridge for rat_lens and used directly by the peer; plus a plain no-hook forward of the
same HF model as the floor. Every configuration runs in a fresh process: wall time is the median
of --repeat runs (more for short ones, up to 3 s in all); memory is the peak RSS above the
process's RSS after loading the model and one 64-token warm-up call (imports and first-call
set-up are not the trace's working memory). The peak is reset there (Linux ``clear_refs``), so
the model's own construction is not counted.

    python benchmarks/forward.py              # tables 1 (vs peer), 2 (many targets),
                                              # 3 (layers mode per head), 4 (long context)
    python benchmarks/forward.py --quick      # 256 and 1,024 tokens only
    python benchmarks/forward.py --only long  # one table
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    """The process's peak RSS since the last reset_peak() (Linux VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def reset_peak() -> None:
    """Forget the peak so far (building the model peaks above where it settles)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(n_ctx: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    from rat_lens.models import load_induction_tokenizer

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=n_ctx, attn_implementation="eager")).eval()
    # Token ids stay below 64, so the embedded model's word tokenizer can decode them for both.
    return hf, load_induction_tokenizer()


def runner(who: str, hf, tok, layer: int, targets: int, chunk: int):
    """``(run(ids, **options), bridge)`` for one contender: rat_lens (bridge is its model), the
    peer or the plain forward (bridge is None).

    ``layers_head`` is rat_lens in layers mode per head over all 12 layers (top_beam 50, top_k 10).
    """
    if who in ("rat_lens", "layers_head"):
        from transformer_lens.model_bridge import TransformerBridge

        from rat_lens import ReverseAttentionTracer

        model = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tok)
        tracer = ReverseAttentionTracer(model)
        where = (
            dict(layers=(0, 11), agg_heads="none", top_beam=50, top_k=10, edge_weight="attention")
            if who == "layers_head"
            else dict(layer=layer)
        )
        return (
            lambda ids, **options: tracer.trace_batch(
                ids, list(range(-targets, 0)), query_chunk=chunk, **where, **options
            )
        ), model
    if who == "peer":
        from reverse_attention import ReverseAttentionTracer as Peer

        tracer = Peer(hf, tok)
        return (
            lambda ids: [
                tracer.trace(ids, target_pos=-t, layer=layer) for t in range(1, targets + 1)
            ]
        ), None

    def forward(ids):  # the floor: a plain forward, no hooks, no attention returned
        with torch.no_grad():
            return hf(ids)

    return forward, None


def timed(fn, repeat: int, at_least_s: float = 3.0) -> float:
    """Median of ``repeat`` runs, more while they add up to under ``at_least_s`` (short runs are
    the noisiest on a shared machine)."""
    times = []
    while len(times) < repeat or sum(times) < at_least_s:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_one(who: str, n: int, layer: int, targets: int, repeat: int, chunk="auto") -> dict:
    """One configuration; ``chunk`` is rat_lens's ``query_chunk`` ("auto", None or N)."""
    hf, tok = build(max(n, 1024))
    ids = torch.randint(1, 64, (1, n), generator=torch.Generator().manual_seed(1))
    run, bridge = runner(who, hf, tok, layer, targets, chunk)
    run(ids[:, :64])
    reset_peak()
    base = rss_mb()
    out = dict(seconds=timed(lambda: run(ids), repeat))
    out.update(mb=max(peak_mb() - base, 0.0), peak=peak_mb())
    if who == "layers_head":
        # On patterns captured beforehand: the beam search alone, and the whole trace but the
        # forward (search, rollout, token strip, results).
        from rat_lens import trace_attention
        from rat_lens.capture import capture_patterns

        cache = capture_patterns(bridge, ids, list(range(12)), agg_heads="none")
        stack = torch.stack([cache["pattern", layer][0] for layer in range(12)])
        out["search_seconds"] = timed(
            lambda: trace_attention(
                stack, target_pos=n - 1, layers=(0, 11), agg_heads="none", top_beam=50, top_k=10
            ),
            repeat,
        )
        out["after_forward_seconds"] = timed(lambda: run(ids, cache=cache), repeat)
    return out


def measure(who, n, layer, targets, repeat, chunk="auto") -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps([who, n, layer, targets, repeat, chunk])],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        return dict(
            seconds=float("nan"),
            mb=float("nan"),
            peak=float("nan"),
            error=out.stderr.strip()[-200:],
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(title, header, rows):
    print(f"\n### {title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["peer", "targets", "layers", "long"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*json.loads(args.one))))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; GPT-2-small config, "
        f"random weights; seconds = median of {args.repeat}+ runs; MB = peak RSS above the "
        f'model; rat_lens runs with its default query_chunk="auto" (chunks of 256 above 512 '
        f'tokens), "one forward" with query_chunk=None'
    )
    sizes = [256, 1024] if args.quick else [256, 1024, 2048]
    want = lambda name: args.only in (None, name)  # noqa: E731
    targets = []  # (issue 7's target, what was measured, met)

    if want("peer"):
        rows, seen = [], {}
        for n in sizes:
            floor = measure("floor", n, -1, 1, args.repeat)
            for layer, name in ((11, "last"), (5, "middle")):
                ours = measure("rat_lens", n, layer, 1, args.repeat)
                whole = measure("rat_lens", n, layer, 1, args.repeat, None)
                peer = measure("peer", n, layer, 1, args.repeat)
                seen[n, name] = dict(
                    forward=ours["seconds"] / floor["seconds"],
                    peer=ours["seconds"] / peer["seconds"],
                    mb=ours["mb"] / max(peer["mb"], 1),
                    whole_mb=whole["mb"] / max(peer["mb"], 1),
                )
                rows.append(
                    [
                        f"{n:,}",
                        name,
                        f"{floor['seconds']:.2f}",
                        f"{ours['seconds']:.2f}",
                        f"{whole['seconds']:.2f}",
                        f"{peer['seconds']:.2f}",
                        f"{ours['seconds'] / floor['seconds']:.2f}",
                        f"{ours['seconds'] / peer['seconds']:.2f}",
                        f"{floor['mb']:.0f}",
                        f"{ours['mb']:.0f}",
                        f"{whole['mb']:.0f}",
                        f"{peer['mb']:.0f}",
                        f"{ours['mb'] / max(peer['mb'], 1):.2f}",
                        f"{whole['mb'] / max(peer['mb'], 1):.2f}",
                    ]
                )
        table(
            "1. One trace: rat_lens vs reverse-attention (and a plain forward)",
            [
                "tokens",
                "layer",
                "forward s",
                "rat_lens s",
                "one forward s",
                "peer s",
                "rat/forward",
                "rat/peer",
                "forward MB",
                "rat_lens MB",
                "one forward MB",
                "peer MB",
                "rat/peer MB",
                "one forward/peer MB",
            ],
            rows,
        )
        worst = max(seen, key=lambda key: seen[key]["forward"])
        targets.append(
            (
                "trace time <= 1.05x a plain forward",
                f"at most {seen[worst]['forward']:.2f}x ({worst[0]:,}, {worst[1]})",
                seen[worst]["forward"] <= 1.05,
            )
        )
        last = max(v["peer"] for (n, name), v in seen.items() if name == "last")
        lower = all(seen[n, "middle"]["peer"] < seen[n, "last"]["peer"] for n in sizes)
        targets.append(
            (
                "trace time <= 0.8x the peer's (last layer), lower for a middle layer",
                f"last layer at most {last:.2f}x; middle lower at every size: "
                f"{'yes' if lower else 'no'}",
                last <= 0.8 and lower,
            )
        )
        if 2048 in sizes:
            for key, what in (("mb", "default"), ("whole_mb", "one forward")):
                ratio = max(seen[2048, name][key] for name in ("last", "middle"))
                targets.append(
                    (
                        f"memory above the model <= 0.15x the peer's at 2,048 tokens ({what})",
                        f"at most {ratio:.2f}x",
                        ratio <= 0.15,
                    )
                )

    if want("targets"):
        n = 1024
        one = measure("rat_lens", n, 11, 1, args.repeat)
        rows = []
        for many in (1, 8, 32):
            ours = one if many == 1 else measure("rat_lens", n, 11, many, args.repeat)
            peer = measure("peer", n, 11, many, 1)
            rows.append(
                [
                    str(many),
                    f"{ours['seconds']:.2f}",
                    f"{peer['seconds']:.2f}",
                    f"{ours['seconds'] / one['seconds']:.2f}",
                    f"{peer['seconds'] / ours['seconds']:.1f}x",
                ]
            )
        table(
            f"2. Many targets in one {n:,}-token prompt (last layer)",
            ["targets", "rat_lens s", "peer s", "rat_lens / 1 target", "speed-up"],
            rows,
        )
        ratio = ours["seconds"] / one["seconds"]
        targets.append(("32 targets <= 1.3x one target", f"{ratio:.2f}x", ratio <= 1.3))

    if want("layers") and not args.quick:
        rows = []
        for n in (1024, 2048):
            ours = measure("layers_head", n, 11, 1, args.repeat)
            rows.append(
                [
                    f"{n:,}",
                    f"{ours['seconds']:.2f}",
                    f"{ours['search_seconds']:.3f}",
                    f"{100 * ours['search_seconds'] / ours['seconds']:.1f}%",
                    f"{ours['after_forward_seconds']:.3f}",
                    f"{100 * ours['after_forward_seconds'] / ours['seconds']:.1f}%",
                    f"{ours['mb']:.0f}",
                ]
            )
        table(
            "3. Layers mode per head: 12 layers x 12 heads, top_beam 50, top_k 10",
            [
                "tokens",
                "trace s",
                "beam search s",
                "search share",
                "all but the forward s",
                "its share",
                "MB above model",
            ],
            rows,
        )
        share = ours["search_seconds"] / ours["seconds"]
        targets.append(
            (
                "multi-layer per-head beam search <= 5% of the trace's time (2,048)",
                f"{100 * share:.1f}% (all but the forward: "
                f"{100 * ours['after_forward_seconds'] / ours['seconds']:.1f}%)",
                share <= 0.05,
            )
        )

    if want("long") and not args.quick:
        rows = []
        for n in (4096, 8192):
            for chunk in ("auto", None):
                ours = measure("rat_lens", n, 11, 1, 1, chunk)
                what = "default" if chunk else "one forward"
                rows.append(
                    [
                        f"{n:,}",
                        what,
                        f"{ours['seconds']:.1f}",
                        f"{ours['mb']:.0f}",
                        f"{ours['peak'] / 1024:.2f}",
                        ours.get("error", ""),
                    ]
                )
                if n == 8192:
                    targets.append(
                        (
                            f"8,192 tokens traced with peak RSS under 8 GB ({what})",
                            f"{ours['peak'] / 1024:.2f} GB",
                            ours["peak"] < 8 * 1024,
                        )
                    )
        table(
            "4. Long context, rat_lens alone (n_ctx raised, last layer)",
            ["tokens", "forward", "seconds", "MB above model", "peak RSS GB", "error"],
            rows,
        )

    if targets:
        table(
            "Issue 7's targets",
            ["target", "measured", "met"],
            [[t, value, "yes" if met else "**no**"] for t, value, met in targets],
        )


if __name__ == "__main__":
    main()

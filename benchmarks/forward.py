"""The whole trace, rat_lens against reverse-attention 0.1.0 on the same weights and tokens.

A GPT-2-small-config Hugging Face model with seeded random weights (eager attention), wrapped by
TransformerBridge for rat_lens and used directly by the peer; plus a plain no-hook forward of the
same HF model as the floor. Every configuration runs in a fresh process: wall time is the median
of --repeat runs, memory is the peak RSS above the process's RSS after loading the model.

    python benchmarks/forward.py             # tables 1 (vs peer), 2 (many targets), 4 (long context)
    python benchmarks/forward.py --quick     # 256 and 1,024 tokens only
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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(n_ctx: int):
    from transformers import GPT2Config, GPT2LMHeadModel
    from rat_lens.models import load_induction_tokenizer
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=n_ctx, attn_implementation="eager")).eval()
    # Token ids stay below 64, so the embedded model's word tokenizer can decode them for both.
    return hf, load_induction_tokenizer()


def run_one(who: str, n: int, layer: int, targets: int, repeat: int) -> dict:
    hf, tok = build(max(n, 1024))
    ids = torch.randint(1, 64, (1, n), generator=torch.Generator().manual_seed(1))
    if who == "rat_lens":
        from transformer_lens.model_bridge import TransformerBridge
        from rat_lens import ReverseAttentionTracer
        model = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tok)
        tracer = ReverseAttentionTracer(model)
        run = lambda: tracer.trace_batch(ids, list(range(-targets, 0)), layer=layer)  # noqa: E731
    elif who == "peer":
        from reverse_attention import ReverseAttentionTracer as Peer
        tracer = Peer(hf, tok)
        run = lambda: [tracer.trace(ids, target_pos=-t, layer=layer)  # noqa: E731
                       for t in range(1, targets + 1)]
    else:  # the floor: a plain forward, no hooks, no attention returned
        def run():
            with torch.no_grad():
                return hf(ids)
    base = rss_mb()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return dict(seconds=statistics.median(times), mb=max(peak_mb() - base, 0.0))


def measure(who, n, layer, targets, repeat) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one",
                          json.dumps([who, n, layer, targets, repeat])],
                         capture_output=True, text=True)
    if out.returncode:
        return dict(seconds=float("nan"), mb=float("nan"), error=out.stderr.strip()[-200:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(title, header, rows):
    print(f"\n### {title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["peer", "targets", "long"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*json.loads(args.one))))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GPT-2-small config, "
          f"random weights; seconds = median of {args.repeat}; MB = peak RSS above the model")
    sizes = [256, 1024] if args.quick else [256, 1024, 2048]

    if args.only in (None, "peer"):
        rows = []
        for n in sizes:
            floor = measure("floor", n, -1, 1, args.repeat)
            for layer, name in ((11, "last"), (5, "middle")):
                ours = measure("rat_lens", n, layer, 1, args.repeat)
                peer = measure("peer", n, layer, 1, args.repeat)
                rows.append([f"{n:,}", name, f"{floor['seconds']:.2f}", f"{ours['seconds']:.2f}",
                             f"{peer['seconds']:.2f}",
                             f"{ours['seconds'] / floor['seconds']:.2f}",
                             f"{ours['seconds'] / peer['seconds']:.2f}",
                             f"{floor['mb']:.0f}", f"{ours['mb']:.0f}", f"{peer['mb']:.0f}",
                             f"{ours['mb'] / max(peer['mb'], 1):.2f}"])
        table("1. One trace: rat_lens vs reverse-attention (and a plain forward)",
              ["tokens", "layer", "forward s", "rat_lens s", "peer s", "rat/forward",
               "rat/peer", "forward MB", "rat_lens MB", "peer MB", "rat/peer MB"], rows)

    if args.only in (None, "targets"):
        n = 1024
        one = measure("rat_lens", n, 11, 1, args.repeat)
        rows = []
        for targets in (1, 8, 32):
            ours = one if targets == 1 else measure("rat_lens", n, 11, targets, args.repeat)
            peer = measure("peer", n, 11, targets, 1)
            rows.append([str(targets), f"{ours['seconds']:.2f}", f"{peer['seconds']:.2f}",
                         f"{ours['seconds'] / one['seconds']:.2f}",
                         f"{peer['seconds'] / ours['seconds']:.1f}x"])
        table(f"2. Many targets in one {n:,}-token prompt (last layer)",
              ["targets", "rat_lens s", "peer s", "rat_lens / 1 target", "speed-up"], rows)

    if args.only in (None, "long") and not args.quick:
        rows = []
        for n in (4096, 8192):
            ours = measure("rat_lens", n, 11, 1, 1)
            rows.append([f"{n:,}", f"{ours['seconds']:.1f}", f"{ours['mb']:.0f}",
                         ours.get("error", "")])
        table("4. Long context, rat_lens alone (n_ctx raised)",
              ["tokens", "seconds", "MB above model", "error"], rows)


if __name__ == "__main__":
    main()

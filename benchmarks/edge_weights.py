"""What each edge weight costs against a plain forward: SmolLM2-135M (30 layers x 9 heads).

A per-head trace of layers 0-29 from one target with the defaults (``edge_weight`` value_norm),
with attention edges, and with contribution edges, beside the model's plain forward
(``model(tokens)`` through the bridge, no hooks) and the peer (reverse-attention 0.1.0 on the
same Hugging Face model with eager attention: a chain in the last layer, its only mode). Random
tokens. Each configuration runs in a fresh process: median wall seconds of the call after a
64-token warm-up, and the process's peak RSS above the loaded model (``ru_maxrss``).

    python benchmarks/edge_weights.py                      # 512 and 2,048 tokens
    python benchmarks/edge_weights.py --sizes 8192 --only default forward
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

WHO = ("forward", "default", "attention", "contribution", "peer")


def runner(who: str):
    from rat_lens import Tracer, load

    model = load("smollm2")
    if who == "peer":
        from reverse_attention import ReverseAttentionTracer as Peer

        hf = model.original_model
        hf.config._attn_implementation = "eager"  # sdpa returns no attentions: the peer needs them
        peer = Peer(hf, model.tokenizer)
        return lambda ids: peer.trace(ids, target_pos=-1, layer=-1)
    if who == "forward":

        def forward(ids):
            with torch.no_grad():
                return model(ids)

        return forward
    tracer = Tracer(model)
    weight = {} if who == "default" else dict(edge_weight=who)
    return lambda ids: tracer.trace(ids, -1, layers=(0, 29), progress=False, **weight)


def run_one(who: str, n: int, repeat: int) -> dict:
    run = runner(who)
    ids = torch.randint(1, 49_000, (1, n), generator=torch.Generator().manual_seed(1))
    run(ids[:, :64])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = run(ids)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    weight = getattr(result, "edge_weight", "-")
    return dict(seconds=statistics.median(times), above_gb=peak - base, peak_gb=peak, weight=weight)


def measure(who: str, n: int, repeat: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps([who, n, repeat])],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        return dict(error=out.stderr.strip().splitlines()[-1][-160:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--only", nargs="+", choices=WHO, default=list(WHO))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*json.loads(args.one))))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M, per-head "
        f"trace of layers 0-29, one target, defaults otherwise; median of {args.repeat}\n"
    )
    print(f"load average before: {load_average()}\n")
    print("| tokens | run | edge weight | seconds | × forward | peak RSS GiB | above model GiB |")
    print("|" + "---|" * 7)
    for n in args.sizes:
        floor = None
        for who in args.only:
            got = measure(who, n, args.repeat)
            if "error" in got:
                print(f"| {n:,} | {who} | - | - | - | - | {got['error']} |", flush=True)
                continue
            floor = got["seconds"] if who == "forward" else floor
            ratio = f"{got['seconds'] / floor:.2f}" if floor else "-"
            print(
                f"| {n:,} | {who} | {got['weight']} | {got['seconds']:.2f} | {ratio} | "
                f"{got['peak_gb']:.2f} | {got['above_gb']:.2f} |",
                flush=True,
            )
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()

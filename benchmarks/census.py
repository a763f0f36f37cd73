"""Census throughput: prompts traced per second by ``rat_lens.census``, by batch size and edge
weight, and on 1 process and 2.

Models: the embedded ``induction-2l`` (2 layers x 4 heads) and, when its local folder exists
(``rat_lens.models.catalogue()``), SmolLM2-135M (30 layers x 9 heads). Prompts: random words
with a repeat (the induction circuit's favourite), the same for every configuration. Each
configuration runs in a fresh process (2 processes: ``torchrun --standalone``, gloo), one thread
per process (on small prompts intra-op threads do not pay, and on a shared machine they spin);
seconds are rank 0's wall time around ``census()`` (tracing, writing the shards, merging and
aggregating), the fastest of 3 censuses after a warm-up one of other prompts, not the model load;
the batch table's two edge weights run interleaved in one process.

Usage: python benchmarks/census.py [--prompts 96] [--smollm2-prompts 32] [--batches 1 8 32]
       [--no-torchrun] [--quick]
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rat_lens.models import WORDS  # the embedded model's vocabulary: both models read it

REPEATS = 3  # timed censuses per configuration; the fastest counts (the least disturbed)
# (label, census keywords): what each row traces.
RUNS = {
    "induction-2l": [
        ("layers 1..0, per head", {"layers": (0, 1), "agg_heads": "none"}),
        ("+ roles", {"layers": (0, 1), "agg_heads": "none", "roles": True}),
        (
            "+ verify (n_random 5)",
            {"layers": (0, 1), "agg_heads": "none", "verify": {"n_random": 5}},
        ),
    ],
    "smollm2": [
        ("chain, last layer, head mean", {"layer": -1}),
        ("layers 29..0, per head", {"layers": (0, 29), "agg_heads": "none"}),
    ],
}


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        half = rng.sample(WORDS, rng.randint(6, 12))
        out.append(" ".join(half + half[: rng.randint(3, len(half))]))
    return out


def worker(spec: dict, out: str) -> None:
    """Censuses of ``spec``'s model and prompts into ``out``, one per census keywords of
    ``spec["variants"]``, interleaved ``spec["repeats"]`` times (a shared machine's load falls
    on each alike) and timed; rank 0 prints the fastest of each as JSON."""

    from rat_lens.corpus import census, init_distributed
    from rat_lens.models import load

    rank, world = init_distributed()
    model = load(spec["model"])
    texts, variants = prompts(spec["n"]), spec["variants"]
    # Warm up (first forwards, lazy imports) on other prompts; census() is collective: every
    # rank starts the timed one together.
    for keywords in variants:
        census(model, prompts(2 * world, seed=1), Path(out) / "warm-up", progress=False, **keywords)
    seconds = [[] for _ in variants]
    for repeat in range(spec["repeats"]):
        for i, keywords in enumerate(variants):
            start = time.perf_counter()
            found = census(model, texts, Path(out) / f"t{repeat}-{i}", progress=False, **keywords)
            seconds[i].append(time.perf_counter() - start)
    if rank == 0:
        tokens = [len(r.tokens) for r in found.traces()]
        weights = f"{found.options['edge_weight']}, {found.options['length_norm']}"
        print(
            json.dumps(
                {
                    "seconds": [min(s) for s in seconds],
                    "tokens": sum(tokens) / len(tokens),
                    "weights": weights,
                }
            )
        )


def measure(spec: dict, processes: int) -> dict:
    out = tempfile.mkdtemp(prefix="rat_lens_census_")  # the folder every rank writes to
    me = [str(Path(__file__).resolve()), "--worker", json.dumps(spec), out]
    if processes == 1:
        command = [sys.executable, *me]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        command = [torchrun, "--standalone", "--nproc_per_node", str(processes), *me]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def processes_table(available: dict, sizes: dict, processes: list[int], repeats: int) -> None:
    """Each of ``RUNS`` on 1 process and on 2."""
    print(
        f"| model | trace | prompts | tokens / prompt | processes | seconds (best of {repeats}) "
        "| prompts/s | vs 1 process | edge weights, length norm |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for model_name, runs in RUNS.items():
        if not available.get(model_name):
            print(f"| {model_name} | not available here | | | | | | | |")
            continue
        for label, keywords in runs:
            one = None
            for p in processes:
                spec = dict(model=model_name, n=sizes[model_name], variants=[keywords])
                got = measure({**spec, "repeats": repeats}, p)
                rate = sizes[model_name] / got["seconds"][0]
                one = one or rate
                print(
                    f"| {model_name} | {label} | {sizes[model_name]} | {got['tokens']:.1f} | "
                    f"{p} | {got['seconds'][0]:.1f} | {rate:.2f} | {rate / one:.2f}x | "
                    f"{got['weights']} |",
                    flush=True,
                )


def batches_table(available: dict, sizes: dict, batches: list[int], repeats: int) -> None:
    """Per-head traces of every layer, value_norm (the default) beside attention edges, by
    ``batch_size`` (prompts in one padded, masked forward), 1 process."""
    print(
        "| model | prompts | tokens / prompt | batch_size | value_norm prompts/s | attention "
        "prompts/s | value_norm / attention |"
    )
    print("|---|---|---|---|---|---|---|")
    for model_name, layers in (("induction-2l", (0, 1)), ("smollm2", (0, 29))):
        if not available.get(model_name):
            print(f"| {model_name} | not available here | | | | | |")
            continue
        n = sizes[model_name]
        for batch in batches:
            variants = [
                dict(layers=layers, agg_heads="none", batch_size=batch, edge_weight=weight)
                for weight in ("value_norm", "attention")
            ]
            got = measure(dict(model=model_name, n=n, variants=variants, repeats=repeats), 1)
            vn, attention = (n / s for s in got["seconds"])
            print(
                f"| {model_name} | {n} | {got['tokens']:.1f} | {batch} | {vn:.2f} | "
                f"{attention:.2f} | {vn / attention:.2f}x |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96, help="induction-2l prompts")
    parser.add_argument("--smollm2-prompts", type=int, default=32, help="SmolLM2 prompts")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--no-torchrun", action="store_true", help="1 process only")
    parser.add_argument("--quick", action="store_true", help="the batch table only, 1 census")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker[0]), args.worker[1])
        return

    import torch

    from rat_lens.models import catalogue

    available = {name: ok for name, ok, _ in catalogue()}
    sizes = {"induction-2l": args.prompts, "smollm2": args.smollm2_prompts}
    repeats = 1 if args.quick else REPEATS
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores; load average (1, 5, 15 min) before: "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; 1 thread per process; top_beam 5, "
        f"top_k 5, JSONL traces; seconds: the fastest of {repeats} censuses\n"
    )
    print(
        "### By batch size: value_norm (the default) and attention edges, 1 process\n\n"
        "Per-head traces of every layer; `batch_size` prompts in one padded, masked forward.\n"
    )
    batches_table(available, sizes, args.batches, repeats)
    if not args.quick:
        print(
            "\n### 1 process and 2 (batch_size 8; edge weights and length norm: the defaults "
            "for each row's trace)\n"
        )
        processes_table(available, sizes, [1] if args.no_torchrun else [1, 2], repeats)
    print(f"\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

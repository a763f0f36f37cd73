"""Census throughput: prompts traced per second by ``rat_lens.census``, 1 process and 2.

Models: the embedded ``induction-2l`` (2 layers x 4 heads) and, when its local folder exists
(``rat_lens.models.catalogue()``), SmolLM2-135M (30 layers x 9 heads). Prompts: random words
with a repeat (the induction circuit's favourite), the same for every configuration. Each
configuration runs in a fresh process (2 processes: ``torchrun --standalone``, gloo), one thread
per process (on small prompts intra-op threads do not pay, and on a shared machine they spin);
seconds are rank 0's wall time around ``census()`` (tracing, writing the shards, merging and
aggregating), the fastest of 3 censuses after a warm-up one of other prompts, not the model load.

Usage: python benchmarks/census.py [--prompts 96] [--smollm2-prompts 16] [--no-torchrun]
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


def worker(model_name: str, n: int, run: int, out: str) -> None:
    """One census into ``out``, timed; rank 0 prints the measurement as JSON."""

    from rat_lens.corpus import census, init_distributed
    from rat_lens.models import load

    rank, world = init_distributed()
    model = load(model_name)
    keywords = RUNS[model_name][run][1]
    texts = prompts(n)
    # Warm up (first forwards, lazy imports) on other prompts; census() is collective: every
    # rank starts the timed one together.
    census(model, prompts(2 * world, seed=1), Path(out) / "warm-up", progress=False, **keywords)
    seconds = []
    for repeat in range(REPEATS):
        start = time.perf_counter()
        found = census(model, texts, Path(out) / f"timed{repeat}", progress=False, **keywords)
        seconds.append(time.perf_counter() - start)
    if rank == 0:
        tokens = [len(r.tokens) for r in found.traces()]
        weights = f"{found.options['edge_weight']}, {found.options['length_norm']}"
        print(
            json.dumps(
                {"seconds": min(seconds), "tokens": sum(tokens) / len(tokens), "weights": weights}
            )
        )


def measure(model_name: str, n: int, run: int, processes: int) -> dict:
    out = tempfile.mkdtemp(prefix="rat_lens_census_")  # the folder every rank writes to
    me = [str(Path(__file__).resolve()), "--worker", model_name, str(n), str(run), out]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96, help="induction-2l prompts")
    parser.add_argument("--smollm2-prompts", type=int, default=16, help="SmolLM2 prompts")
    parser.add_argument("--no-torchrun", action="store_true", help="1 process only")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), int(args.worker[2]), args.worker[3])
        return

    import torch

    from rat_lens.models import catalogue

    offline = {name: ok for name, ok, _ in catalogue()}
    sizes = {"induction-2l": args.prompts, "smollm2": args.smollm2_prompts}
    processes = [1] if args.no_torchrun else [1, 2]
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores; load average before: "
        f"{os.getloadavg()[0]:.1f}; 1 thread per process; top_beam 5, top_k 5, batch_size 8, "
        "JSONL traces; edge weights and length norm: the defaults for each row's trace\n"
    )
    print(
        f"| model | trace | prompts | tokens / prompt | processes | seconds (best of {REPEATS}) "
        "| prompts/s | vs 1 process | edge weights, length norm |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for model_name, runs in RUNS.items():
        if not offline.get(model_name):
            print(f"| {model_name} | not available here | | | | | | | |")
            continue
        for run, (label, _) in enumerate(runs):
            one = None
            for p in processes:
                got = measure(model_name, sizes[model_name], run, p)
                rate = sizes[model_name] / got["seconds"]
                one = one or rate
                print(
                    f"| {model_name} | {label} | {sizes[model_name]} | {got['tokens']:.1f} | "
                    f"{p} | "
                    f"{got['seconds']:.1f} | {rate:.2f} | {rate / one:.2f}x | {got['weights']} |",
                    flush=True,
                )
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

"""Per-head traces at long contexts: dense per-head patterns against the bounded store.

GPT-2-small config (12 layers x 12 heads), seeded random weights, through TransformerBridge; a
layers-mode per-head trace with attention edges over all 12 layers (top_beam 50, top_k 10, one
target, the default query_chunk="auto"), with ``store="dense"`` (every head's whole pattern) and
``store="bounded"`` (per row the strongest keys, rat_lens.search.store). Each configuration runs
in a fresh process: wall and CPU seconds of one trace after a 64-token warm-up (CPU time moves
less than wall time on a shared machine), and the process's peak RSS (``resource.getrusage``'s
``ru_maxrss``, model and all). Beams are compared where both ran.

    python benchmarks/long_context.py                 # 2,048 dense and bounded, 8,192 bounded
    python benchmarks/long_context.py --sizes 1024 2048 --dense-up-to 2048
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

OPTIONS = dict(layers=(0, 11), agg_heads="none", edge_weight="attention", top_beam=50, top_k=10)


def run_one(n: int, store: str) -> dict:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    from rat_lens import ReverseAttentionTracer
    from rat_lens.models import load_induction_tokenizer

    torch.manual_seed(0)
    config = GPT2Config(n_positions=max(n, 1024), attn_implementation="eager")
    hf = GPT2LMHeadModel(config).eval()
    model = TransformerBridge.boot_transformers(
        "gpt2", hf_model=hf, tokenizer=load_induction_tokenizer()
    )
    tracer = ReverseAttentionTracer(model)
    ids = torch.randint(1, 64, (1, n), generator=torch.Generator().manual_seed(1))
    tracer.trace(ids[:, :64], store=store, **OPTIONS)
    model_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start, cpu = time.perf_counter(), time.process_time()
    result = tracer.trace(ids, store=store, **OPTIONS)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    beams = [
        (b.positions, b.layers, b.heads, b.edge_weights, b.score_raw, b.score_norm)
        for b in result.beams
    ]
    return dict(
        seconds=seconds,
        cpu_seconds=cpu,
        peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        model_gb=model_gb,
        beams=beams,
        rollout=bool(result.rollout),
    )


def load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def measure(n: int, store: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps([n, store])], capture_output=True, text=True
    )
    if out.returncode:
        return dict(error=out.stderr.strip().splitlines()[-1][-160:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--dense-up-to", type=int, default=2048, help="longest dense run")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*json.loads(args.one))))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; GPT-2-small config "
        f"(12 x 12), random weights; per-head trace of layers 0-11, attention edges, "
        f"top_beam 50, top_k 10; peak RSS of the whole process (ru_maxrss), after-load RSS "
        f"peak in brackets\n"
    )
    print(f"load average before: {load()}\n")
    header = "tokens | store | seconds | CPU seconds | peak RSS GiB | dense patterns GiB | rollout"
    print(f"| {header} | same beams |\n|" + "---|" * 8)
    for n in args.sizes:
        dense_gb = 4 * 12 * 12 * n * n / 2**30
        runs = {}
        for store in ("dense", "bounded"):
            if store == "dense" and n > args.dense_up_to:
                print(
                    f"| {n:,} | dense | - | - | - | {dense_gb:.1f} | - | not run (does not fit) |"
                )
                continue
            runs[store] = run = measure(n, store)
            if "error" in run:
                print(f"| {n:,} | {store} | - | - | - | {dense_gb:.1f} | - | {run['error']} |")
                continue
            same = (
                ("yes" if runs["dense"]["beams"] == run["beams"] else "**no**")
                if store == "bounded" and "beams" in runs.get("dense", {})
                else "-"
            )
            print(
                f"| {n:,} | {store} | {run['seconds']:.1f} | {run['cpu_seconds']:.1f} | "
                f"{run['peak_gb']:.2f} "
                f"({run['model_gb']:.2f}) | {dense_gb:.1f} | {'yes' if run['rollout'] else 'no'}"
                f" | {same} |",
                flush=True,
            )
    print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()

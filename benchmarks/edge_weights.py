"""What each edge weight costs against a plain forward: SmolLM2-135M (30 layers x 9 heads).

1. Time: a per-head trace of layers 0-29 from one target with the defaults (``edge_weight``
   value_norm), with attention edges and with contribution edges, beside the model's plain
   forward (``model(tokens)`` through the bridge, no hooks) and the peer (reverse-attention
   0.1.0 on the same weights, loaded by Hugging Face with eager attention: a chain in the last
   layer, its only mode). Random tokens. All of them run interleaved in one process (forward,
   default, attention, ..., then again), so a shared machine's load falls on every column
   alike; each is the fastest of ``--repeat`` rounds, after a 64-token warm-up.
2. Memory: each configuration again in a fresh process, its peak RSS (``ru_maxrss``) and what
   it adds above the loaded model (and a 64-token warm-up); the peer's model is its own copy.
3. Long prompts (``--long``): the default trace's peak RSS on SmolLM2 and on a GPT-2-small
   config (12 layers x 12 heads, seeded random weights, ``n_positions`` raised, through
   TransformerBridge: TransformerLens 4 has no HookedTransformer), each in a fresh process.

    python benchmarks/edge_weights.py                  # 512 and 2,048 tokens, then 8,192
    python benchmarks/edge_weights.py --quick          # 512 tokens, 2 rounds, no long prompts
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

WHO = ("forward", "default", "attention", "contribution", "peer")
LAYERS = (0, 29)


def runners(who: list[str]) -> dict:
    """Each configuration as a function of the token ids, its model loaded once."""
    from rat_lens import Tracer, load

    model = load("smollm2")
    tracer = Tracer(model)
    out = {}
    for name in who:
        if name == "peer":
            out[name] = peer_runner()
        elif name == "forward":
            out[name] = lambda ids: model(ids)
        else:
            weight = {} if name == "default" else dict(edge_weight=name)
            out[name] = lambda ids, w=weight: tracer.trace(
                ids, -1, layers=LAYERS, progress=False, **w
            )
    return out


def peer_runner():
    from reverse_attention import ReverseAttentionTracer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rat_lens.models._catalogue import smollm2_cached

    # The bridge's own HF modules are wrapped (their attentions are not returned): the peer
    # gets the converted weights loaded afresh, with eager attention (sdpa returns none).
    folder = smollm2_cached()
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    peer = ReverseAttentionTracer(hf, AutoTokenizer.from_pretrained(folder))
    return lambda ids: peer.trace(ids, target_pos=-1, layer=-1)


def tokens(n: int) -> torch.Tensor:
    return torch.randint(1, 49_000, (1, n), generator=torch.Generator().manual_seed(1))


def time_all(who: list[str], n: int, repeat: int) -> dict:
    """Fastest of ``repeat`` interleaved rounds per configuration (an error: its message)."""
    run = runners(who)
    ids = tokens(n)
    best, weights = {}, {}
    with torch.no_grad():
        for f in run.values():
            f(ids[:, :64])
        for _ in range(repeat):
            for name, f in run.items():
                if isinstance(best.get(name), str):
                    continue
                start = time.perf_counter()
                try:
                    result = f(ids)
                except Exception as error:  # in the table: e.g. contribution over the budget
                    best[name] = f"{type(error).__name__}: {error}".splitlines()[0][:120]
                    continue
                seconds = time.perf_counter() - start
                best[name] = min(best.get(name, seconds), seconds)
                weights[name] = getattr(result, "edge_weight", "-")
    return dict(seconds=best, weights=weights)


def memory_one(who: str, n: int) -> dict:
    run = runners([who])[who]
    with torch.no_grad():
        run(tokens(64))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        run(tokens(n))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return dict(peak_gb=peak, above_gb=peak - base)


def long_one(model_name: str, n: int) -> dict:
    """The default trace of ``n`` random tokens (all layers, per head) on ``model_name``."""
    from rat_lens import Tracer, load

    if model_name == "smollm2":
        model = load("smollm2")
    else:  # TransformerLens 4 has no HookedTransformer: the bridge over a random HF GPT-2
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import GPT2Config, GPT2LMHeadModel

        from rat_lens.models import load_induction_tokenizer

        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config(n_positions=n, attn_implementation="eager")).eval()
        model = TransformerBridge.boot_transformers(
            "gpt2", hf_model=hf, tokenizer=load_induction_tokenizer()
        )
    tracer = Tracer(model)
    n_layers = model.cfg.n_layers
    ids = torch.randint(1, 40_000, (1, n), generator=torch.Generator().manual_seed(1))
    tracer.trace(ids[:, :64], -1, layers=(0, n_layers - 1), progress=False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    result = tracer.trace(ids, -1, layers=(0, n_layers - 1), progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return dict(seconds=seconds, peak_gb=peak, above_gb=peak - base, weight=result.edge_weight)


def in_process(*args) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(args)], capture_output=True, text=True
    )
    if out.returncode:
        return dict(error=(out.stderr.strip().splitlines() or ["?"])[-1][-160:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def one(kind: str, *args):
    if kind == "time":
        return time_all(*args)
    return memory_one(*args) if kind == "memory" else long_one(*args)


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) and b else "-"


def table(n: int, who: list[str], repeat: int) -> None:
    timed = in_process("time", who, n, repeat)
    if "error" in timed:
        print(f"| {n:,} | - | - | {timed['error']} | | | | | |")
        return
    seconds, weights = timed["seconds"], timed["weights"]
    mem = {name: in_process("memory", name, n) for name in who}
    peer = mem.get("peer", {}).get("above_gb")
    for name in who:
        s, m = seconds.get(name), mem[name]
        shown = f"{s:.2f}" if isinstance(s, float) else str(s)
        above = m.get("above_gb")
        memory = f"{m['peak_gb']:.2f} | {above:.2f}" if "peak_gb" in m else f"- | {m.get('error')}"
        print(
            f"| {n:,} | {name} | {weights.get(name, '-')} | {shown} | "
            f"{ratio(s, seconds.get('forward'))} | {memory} | {ratio(above, peer)} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--only", nargs="+", choices=WHO, default=list(WHO))
    parser.add_argument("--repeat", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--long", type=int, nargs="*", default=[8192], help="long prompts")
    parser.add_argument("--quick", action="store_true", help="512 tokens, 2 rounds, no --long")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one(*json.loads(args.one))))
        return
    if args.quick:
        args.sizes, args.repeat, args.long = [512], 2, []
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the subprocesses'
    print(
        f"torch {torch.__version__}, {args.threads} thread(s) per process; SmolLM2-135M, "
        f"per-head trace of layers 0-29, one target, defaults otherwise; seconds: the fastest "
        f"of {args.repeat} interleaved rounds in one process; memory: a fresh process each\n"
    )
    print(f"load average (1, 5, 15 min) before: {load_average()}\n")
    print(
        "| tokens | run | edge weight | seconds | × forward | peak RSS GiB | above model GiB "
        "| above model / peer's |"
    )
    print("|" + "---|" * 8)
    for n in args.sizes:
        table(n, args.only, args.repeat)
    if args.long:
        print(f"\nload average before the long prompts: {load_average()}\n")
        print("| model | tokens | edge weight | seconds | peak RSS GiB | above model GiB |")
        print("|" + "---|" * 6)
        for n in args.long:
            for name in ("smollm2", "gpt2-small config"):
                got = in_process("long", name, n)
                if "error" in got:
                    print(f"| {name} | {n:,} | - | - | - | {got['error']} |", flush=True)
                    continue
                print(
                    f"| {name} | {n:,} | {got['weight']} | {got['seconds']:.1f} | "
                    f"{got['peak_gb']:.2f} | {got['above_gb']:.2f} |",
                    flush=True,
                )
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()

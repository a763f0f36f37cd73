"""Train induction-2l from scratch: ``python -m rat_lens.models.train_induction --out DIR``.

About a minute of CPU (1,500 AdamW steps of 64 rows). The data (``training_batch``) repeats a
stretch of tokens at a random lookback distance, often a short one: with the repeat always at the
same place (or always far back) the model learns positional shortcuts instead of the
previous-token + induction circuit.

Seeded, on one thread, under ``torch.use_deterministic_algorithms(True)``: the same seed gives
the same bytes with the same torch on the same kind of CPU. Elsewhere the last bits of a matmul
differ and training amplifies them (weights end up 10-30% apart), but the circuit is the same:
tests/test_models.py checks both, with the measured margins.
"""

import argparse
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ._induction import (
    InductionConfig,
    InductionTransformer,
    init_weights,
    training_batch,
)
from ._tokenizer import build_tokenizer

DEFAULTS = {"seed": 0, "steps": 1500, "batch_size": 64, "lr": 1e-3}


@contextmanager
def _reproducible() -> Iterator[None]:
    """Deterministic kernels on one CPU thread, the caller's settings restored after.

    One thread because a matmul's reduction order depends on the thread count: measured, 1 and 2
    threads give weights 10-30% apart after 1,500 steps (the same circuit, though).
    """
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def repeat_loss(
    model: InductionTransformer, tokens: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over the predictable repeated positions (``mask`` = 1)."""
    logits = model(tokens)[:, :-1]
    loss = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    mask = mask[:, :-1]
    return (loss * mask).sum() / mask.sum()


def train(
    seed: int = DEFAULTS["seed"],
    steps: int = DEFAULTS["steps"],
    *,
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    log: Callable[[int, float], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Train a fresh induction-2l on fresh random batches; returns its state dict.

    Args:
        seed: seeds the initial weights and the data stream (the global RNG is left untouched).
        steps: AdamW steps (lr ``lr``, default betas and weight decay).
        batch_size: prompts per step.
        log: called as ``log(step, loss)`` every 100 steps and after the last.

    Returns:
        ``{name: tensor}`` in the native layout (``tok_embed.weight``,
        ``layers.0.attn.q.weight``...).
    """
    g = torch.Generator().manual_seed(seed)
    with _reproducible(), torch.random.fork_rng(devices=[]):
        model = InductionTransformer()  # nn.Linear's own init draws from the global RNG: forked
        init_weights(model, g)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        for step in range(1, steps + 1):
            tokens, mask = training_batch(batch_size, g)
            loss = repeat_loss(model, tokens, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log is not None and (step % 100 == 0 or step == steps):
                log(step, loss.item())
    model.eval()
    return {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}


def evaluate(state_dict: dict[str, torch.Tensor], seed: int = 12345, n: int = 512) -> float:
    """Repeat-part loss of ``state_dict`` on ``n`` held-out training-style prompts."""
    model = InductionTransformer()
    model.load_state_dict(state_dict)
    tokens, mask = training_batch(n, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return repeat_loss(model.eval(), tokens, mask).item()


def save(state_dict: dict[str, torch.Tensor], out: Path, info: dict) -> None:
    """Write model.safetensors, info.json (config, training run) and the tokenizer files into
    ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, out / "model.safetensors", metadata={"format": "pt"})
    config = {"model": asdict(InductionConfig()), "training": info}
    (out / "info.json").write_text(json.dumps(config, indent=2) + "\n")
    build_tokenizer().save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    args = parser.parse_args(argv)

    start = time.perf_counter()
    state = train(args.seed, args.steps, log=lambda s, loss: print(f"step {s:5d}  loss {loss:.4f}"))
    seconds = time.perf_counter() - start
    held_out = evaluate(state)
    print(f"trained in {seconds:.1f} s; held-out repeat loss {held_out:.4f}")
    info = {
        **DEFAULTS,
        "seed": args.seed,
        "steps": args.steps,
        "held_out_repeat_loss": held_out,
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
    }
    save(state, args.out, info)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

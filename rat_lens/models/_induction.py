"""induction-2l: a 2-layer attention-only transformer with a known induction circuit.

The module is plain torch, in reading order: config, attention, block, model, data. Its
parameter names are those of TransformerLens's native bridge model (``NativeModel``), so the
weights copy into a ``TransformerBridge`` by name, and its forward computes the same numbers.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..errors import RatLensError

BOS = 0  # also the pad and end-of-text token


@dataclass(frozen=True)
class InductionConfig:
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_head: int = 16
    d_vocab: int = 64
    n_ctx: int = 64
    eps: float = 1e-5


class Attention(nn.Module):
    """Causal self-attention with separate q/k/v/o projections (nn.Linear, with biases)."""

    def __init__(self, cfg: InductionConfig):
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.scale = math.sqrt(cfg.d_head)
        d_qkv = cfg.n_heads * cfg.d_head
        self.q = nn.Linear(cfg.d_model, d_qkv)
        self.k = nn.Linear(cfg.d_model, d_qkv)
        self.v = nn.Linear(cfg.d_model, d_qkv)
        self.o = nn.Linear(d_qkv, cfg.d_model)
        mask = torch.triu(torch.ones(cfg.n_ctx, cfg.n_ctx, dtype=torch.bool), diagonal=1)
        self.register_buffer("future", mask, persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, T, _ = x.shape
        # (B, T, nh*dh) -> (B, nh, T, dh)
        q = self.q(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)
        # Same op order as NativeAttention (matmul, then divide), so the bridge agrees bitwise.
        scores = torch.matmul(q, k.transpose(-2, -1)) / self.scale
        scores = scores.masked_fill(self.future[:T, :T], float("-inf"))
        pattern = F.softmax(scores, dim=-1)  # (B, nh, T, T): [batch, head, query, key]
        z = torch.matmul(pattern, v).transpose(1, 2).contiguous().view(B, T, -1)
        return self.o(z), pattern


class Block(nn.Module):
    """Pre-LN attention-only block: x + attn(ln1(x))."""

    def __init__(self, cfg: InductionConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.attn = Attention(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        attn_out, pattern = self.attn(self.ln1(x))
        return x + attn_out, pattern


class InductionTransformer(nn.Module):
    """The raw induction-2l model: tokens in, logits out (no hooks; TL wraps a copy of it).

    Examples:
        >>> model = InductionTransformer()
        >>> model(torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([2, 5, 64])
    """

    def __init__(self, cfg: InductionConfig = InductionConfig()):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_out = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.head = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)

    def forward(self, tokens: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch seq vocab"]:
        return self.forward_with_patterns(tokens)[0]

    def forward_with_patterns(
        self, tokens: Int[Tensor, "batch seq"]
    ) -> tuple[Float[Tensor, "batch seq vocab"], Float[Tensor, "layer batch head seq seq"]]:
        """Logits and every layer's attention pattern, stacked."""
        seq = tokens.shape[1]
        if seq > self.cfg.n_ctx:
            raise RatLensError(f"input length {seq} exceeds n_ctx={self.cfg.n_ctx}")
        x = self.tok_embed(tokens) + self.pos(torch.arange(seq, device=tokens.device))
        patterns = []
        for block in self.layers:
            x, pattern = block(x)
            patterns.append(pattern)
        return self.head(self.ln_out(x)), torch.stack(patterns)


def init_weights(model: InductionTransformer, generator: torch.Generator) -> None:
    """GPT-2 style init drawn from ``generator``: N(0, 0.02) weights, zero biases, unit
    LayerNorm."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                shape = module.weight.shape
                module.weight.copy_(torch.randn(shape, generator=generator) * 0.02)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()


def repeated_tokens(
    n_prompts: int, prefix_len: int, repeat_len: int, seed: int = 0, *, d_vocab: int = 64
) -> Int[Tensor, "batch seq"]:
    """Induction prompts: BOS, ``prefix_len`` distinct random tokens, then their first
    ``repeat_len``.

    Token ids are drawn from 1..d_vocab-1 (0 is BOS) with a seeded ``torch.Generator``, so the same
    arguments give the same prompts on every machine. Sequence length is
    1 + prefix_len + repeat_len.

    Examples:
        >>> tokens = repeated_tokens(3, prefix_len=5, repeat_len=2, seed=0)
        >>> tokens.shape
        torch.Size([3, 8])
        >>> bool((tokens[:, 6:] == tokens[:, 1:3]).all()), bool((tokens[:, 0] == 0).all())
        (True, True)
    """
    if not 1 <= prefix_len <= d_vocab - 1:
        raise RatLensError(
            f"prefix_len={prefix_len} not in 1..{d_vocab - 1} (distinct non-BOS tokens of d_vocab)"
        )
    if not 0 <= repeat_len <= prefix_len:
        raise RatLensError(f"repeat_len={repeat_len} not in 0..prefix_len={prefix_len}")
    if n_prompts < 1:
        raise RatLensError(f"n_prompts={n_prompts} must be >= 1")
    g = torch.Generator().manual_seed(seed)
    prefix = _distinct_tokens(n_prompts, prefix_len, d_vocab, g)
    bos = torch.full((n_prompts, 1), BOS, dtype=torch.long)
    return torch.cat([bos, prefix, prefix[:, :repeat_len]], dim=1)


def _distinct_tokens(n: int, length: int, d_vocab: int, g: torch.Generator) -> Tensor:
    # A random permutation of 1..d_vocab-1 per row (argsort of uniform noise), first `length`.
    return torch.rand(n, d_vocab - 1, generator=g).argsort(dim=1)[:, :length] + 1


def training_batch(
    batch: int, g: torch.Generator, cfg: InductionConfig = InductionConfig()
) -> tuple[Int[Tensor, "batch seq"], Float[Tensor, "batch seq"]]:
    """One training batch (full n_ctx rows) and its loss mask.

    Each row is BOS and distinct random tokens, except for a stretch of m tokens (m uniform in
    2..24) starting at a random place, where every token repeats the one D places back (D
    log-uniform in 2..48; D < m makes the stretch periodic). ``mask[b, t]`` is 1 where the token
    at t+1 is the 2nd..m-th token of the stretch: predictable only by finding the previous
    occurrence of the token at t and copying what followed it (induction).
    """
    n = cfg.n_ctx - 1  # tokens after BOS
    x = _distinct_tokens(batch, n, cfg.d_vocab, g)
    mask = torch.zeros(batch, cfg.n_ctx)
    m_len = torch.randint(2, 25, (batch,), generator=g)
    lookback = torch.exp(torch.empty(batch).uniform_(math.log(2), math.log(49), generator=g))
    for b in range(batch):
        m = int(m_len[b])
        d = min(int(lookback[b]), n - m)
        s = int(torch.randint(d, n - m + 1, (1,), generator=g))
        for t in range(s, s + m):
            x[b, t] = x[b, t - d]
        mask[b, s + 1 : s + m] = 1.0
    bos = torch.full((batch, 1), BOS, dtype=torch.long)
    return torch.cat([bos, x], dim=1), mask

"""A tiny decoder-only transformer that learns to add: the language-model example.

The corpus is generated here, so nothing is downloaded: every sequence is one sum written out
character by character, `12+34=046.` (for `digits=2`), the answer zero-padded to `digits + 1`
characters so all sequences have the same length. The model reads the characters left to right
and predicts the next one; only the answer characters are scored.

    python train_single.py --config configs/sums_lm.yaml

Plugged in by import path, like any user code:
`model.name=launch.examples.sums_lm:TinyGPT`, `data.name=launch.examples.sums_lm:SumsDataset`.
Afterwards, ask the trained model (runs/sums_lm/model.pt holds TinyGPT's state dict):

    model = TinyGPT(seq_len=9)
    model.load_state_dict(torch.load("runs/sums_lm/model.pt", weights_only=True))
    prompt = torch.tensor([SumsDataset.encode("47+85=")])
    SumsDataset.decode(model.eval().complete(prompt, 4)[0])  # '47+85=132.'
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

VOCAB = "0123456789+=."
"""The characters, in token order: token i is VOCAB[i]. No padding token: every sequence has the same length."""
IGNORE_INDEX = -100
"""Targets with this value count neither in the loss nor in the accuracy (the prompt part)."""


class SumsDataset(Dataset):
    """Sums `a+b=c.` of two `digits`-digit numbers, as next-character prediction.

    All (a, b) pairs are shuffled by a permutation seeded with `seed`; the first `n_eval` pairs are
    the eval split and the next `n` pairs the train split, so the splits never share a sum (and the
    same `seed` gives the same splits everywhere). With the defaults (`digits=2`: 10,000 pairs) the
    two splits together use every pair.

    Item i is `(tokens, targets)`, two int64 tensors of shape [T] with T = 3 * digits + 3:
    `tokens` is the sequence without its last character and `targets` the sequence shifted left by
    one (the next character at every position), except that every target inside the prompt (up to
    and including '=') is -100. The loss and the per-token accuracy therefore count only the
    answer: its `digits + 1` digits and the closing '.'.
    """

    vocab_size = len(VOCAB)

    def __init__(self, split: str, n: int = 8000, digits: int = 2, seed: int = 0, n_eval: int = 2000):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
        pairs = 10 ** (2 * digits)
        if n < 1 or n_eval < 1 or n + n_eval > pairs:
            raise ValueError(f"n={n} and n_eval={n_eval} must be >= 1 and fit into the {pairs} distinct sums of {digits}-digit numbers")
        self.digits = digits
        perm = torch.randperm(pairs, generator=torch.Generator().manual_seed(seed))
        chosen = perm[:n_eval] if split == "eval" else perm[n_eval:n_eval + n]
        top = 10 ** digits
        seqs = [self.encode(f"{a:0{digits}d}+{b:0{digits}d}={a + b:0{digits + 1}d}.")
                for a, b in zip((chosen // top).tolist(), (chosen % top).tolist())]
        full = torch.tensor(seqs, dtype=torch.int64)  # [N, T + 1]
        self.tokens = full[:, :-1].contiguous()
        self.targets = full[:, 1:].clone()
        # targets[:, j] is character j + 1; the prompt ends with '=' at character 2 * digits + 1.
        self.targets[:, : 2 * digits + 1] = IGNORE_INDEX
        self.seq_len = self.tokens.shape[1]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int):
        return self.tokens[i], self.targets[i]

    @staticmethod
    def encode(text: str) -> list[int]:
        return [VOCAB.index(c) for c in text]

    @staticmethod
    def decode(tokens) -> str:
        """Token ids (a list or a 1-D tensor) back to text; -100 (an ignored target) shows as '_'."""
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        return "".join("_" if t == IGNORE_INDEX else VOCAB[t] for t in ids)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees only positions <= t (so training on
    every position at once is the same as predicting one character at a time)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        # Queries, keys and values in one matmul, without biases: a key bias adds q.b to every score
        # of a row, which softmax ignores, so its gradient is zero in exact arithmetic. AdamW would
        # divide that zero's rounding noise by its own RMS and take lr-sized steps on it, and runs
        # that differ only in summation order (DDP against one process) would drift apart there.
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # [B, T, C] -> [B, heads, T, C / heads]: each head attends on its own slice of the channels.
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """One pre-LN transformer block: x + attention(LN(x)), then x + MLP(LN(x)). Normalising before
    each sublayer keeps the residual stream an untouched sum, which trains stably at this size."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A decoder-only transformer: token + learned position embeddings, `n_layers` pre-LN blocks,
    a final LayerNorm and a linear head. `forward(tokens [B, T]) -> logits [B, T, vocab_size]`
    for any T <= seq_len; logits[:, t] predict the token after position t.

    The defaults (d_model=64, 2 layers) have about 100k parameters; SumsDataset with digits=2
    needs seq_len >= 9.
    """

    def __init__(self, vocab_size: int = len(VOCAB), seq_len: int = 16, d_model: int = 64, n_heads: int = 4, n_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.seq_len = seq_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)  # learned: the sums have a fixed layout, position matters
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.apply(self._init)
        # GPT-2's scaling: the projections that write into the residual stream start smaller, so the
        # stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        if T > self.seq_len:
            raise ValueError(f"sequence length {T} exceeds seq_len={self.seq_len}")
        pos = torch.arange(T, device=tokens.device)
        x = self.drop(self.tok(tokens) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def complete(self, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
        """Greedy decoding: append the most likely next token `n_new` times (prompt [B, T0] -> [B, T0 + n_new])."""
        out = prompt
        for _ in range(n_new):
            out = torch.cat([out, self(out[:, -self.seq_len:])[:, -1].argmax(-1, keepdim=True)], dim=1)
        return out


def write_token_files(directory: str, n: int = 8000, n_eval: int = 2000, digits: int = 2, seed: int = 0) -> None:
    """The sums back to back as token files in nanoGPT's layout (train.bin, val.bin: uint16 ids), for
    data.name=tokens and the token-stream example: the shipped data/tokens/ is
    `write_token_files("data/tokens")`."""
    from pathlib import Path

    import numpy as np

    Path(directory).mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train.bin"), ("eval", "val.bin")):
        ds = SumsDataset(split, n, digits, seed, n_eval)
        text = torch.cat([ds.tokens, torch.full((len(ds), 1), VOCAB.index("."), dtype=torch.int64)], dim=1)  # + the closing "."
        text.reshape(-1).numpy().astype(np.uint16).tofile(Path(directory) / name)

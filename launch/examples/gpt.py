"""nanoGPT's model interface, so a nanoGPT-style `model.py` runs without a wrapper class.

nanoGPT builds its model as `GPT(GPTConfig(...))` and its forward is `forward(idx, targets=None) ->
(logits, loss)`, the loss a mean cross-entropy over the targets other than -1. The launcher takes that
as it is (configs/nanogpt.yaml):

    model.name: launch.examples.gpt:GPT
    model.kwargs: {config: {_target_: launch.examples.gpt:GPTConfig, n_layer: 2, ...}}   # built first
    model.loss_arg: targets          # the forward computes its own loss from `targets`
    model.loss_reduction: mean       # a mean over the counted targets: weighted by their count
    train.ignore_index: -1           # nanoGPT's ignored target

The network itself is the example transformer of launch.examples.sums_lm (pre-LN blocks, causal
attention), with dropout: under DDP each rank draws its own masks (launch.train.randomness).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from launch.examples.sums_lm import TinyGPT


@dataclass
class GPTConfig:
    block_size: int = 32
    vocab_size: int = 13
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.1


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = TinyGPT(config.vocab_size, config.block_size, config.n_embd, config.n_head, config.n_layer, config.dropout)

    def forward(self, idx: torch.Tensor, targets=None):
        logits = self.transformer(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        return logits, loss

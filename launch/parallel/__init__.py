"""How the model is spread over the ranks: one module per strategy, one line each in STRATEGIES.

A strategy is the only place that knows how gradients meet. The run asks it to `prepare` the bare
model before the optimizer exists (global BatchNorm statistics, a check for unused parameters), to
`wrap` the training module, for the context of each micro-step (`micro_step`: accumulate without
syncing, stand-in batches), to clip by the global norm, and to make every rank hold the saved buffers
before evaluation (`before_eval`). The loop never asks which strategy it runs.
"""

from __future__ import annotations

import importlib

STRATEGIES = {
    "ddp": "launch.parallel.ddp:Replicated",  # every rank holds the whole model; DDP all-reduces gradients
    "fsdp": "launch.parallel.fsdp:Sharded",  # parameters, gradients, optimizer state sharded (FSDP2)
}


# dist.tp > 1 or dist.replicate != 1: either strategy on a device mesh (HSDP, TP, FSDP x TP; launch.parallel.mesh)
MESHED = "launch.parallel.meshed:Meshed"


def make(cfg, rt, say):
    from launch.parallel.mesh import layout

    path = MESHED if layout(cfg, rt.env).meshed else STRATEGIES[cfg.dist.strategy]
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(module), cls)(cfg, rt, say)

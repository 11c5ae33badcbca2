"""Peers: PyTorch Lightning and Hugging Face Accelerate on the seeds' workload, next to our loop.

Both are optional (`pip install -e ".[bench]"`), never required: a peer that is not installed is
recorded as "not installed" with one line, and the comparison goes on without it. What each peer
loop is timed over is said in its docstring; like the other loops, only the training epochs count,
one epoch at a time with a device synchronisation at each epoch end.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import time
import warnings

import torch
import torch.nn.functional as F

from launch.commands.bench.workloads import loop_table, mlp_params, our_bare_and_seed_loops, repeat, scale_overrides, sync, warm, workload

# peer -> the packages that provide it, tried in order, and how to get it
PACKAGES = {"lightning": ("lightning", "pytorch_lightning"), "accelerate": ("accelerate",)}
INSTALL = {"lightning": "pip install lightning", "accelerate": "pip install accelerate"}


def find(peer: str):
    """The peer's module, or None where none of its packages imports."""
    for name in PACKAGES[peer]:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _loader(cfg, x, y):
    """The seeds' DataLoader: a TensorDataset on the host, shuffled by a seeded generator."""
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(x, y), batch_size=cfg.data.batch_size, shuffle=True, generator=torch.Generator().manual_seed(cfg.train.seed))


@contextlib.contextmanager
def _quiet():
    """Peers announce their accelerator, warn about num_workers and so on: not part of the bench's output."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "accelerate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def lightning_loop(cfg_path, overrides: list[str], device: str, pl) -> dict:
    """`Trainer.fit` of a LightningModule whose training_step returns F.cross_entropy, fed by the
    seeds' DataLoader (batches moved to the device by Lightning). Timed by a callback from
    on_train_epoch_start to on_train_epoch_end (with a device synchronisation at both): data
    iteration, the transfer, forward, backward, the optimizer step and Lightning's per-step hooks
    and loop bookkeeping. Not timed: Trainer construction, the strategy and accelerator setup, the
    model's move to the device, and the fit's teardown."""
    dev = torch.device(device)
    cfg, x, y, model = workload(cfg_path, overrides, torch.device("cpu"))
    times: list[float] = []

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            return F.cross_entropy(self.net(xb), yb)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=cfg.train.lr)

    class EpochClock(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            sync(dev)
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            sync(dev)
            times.append(time.perf_counter() - self.t0)

    with _quiet():
        trainer = pl.Trainer(
            max_epochs=cfg.train.epochs, accelerator=dev.type, devices=1, logger=False, callbacks=[EpochClock()],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(Module(), _loader(cfg, x, y))
    return {"epochs": times}


def accelerate_loop(cfg_path, overrides: list[str], device: str, accelerate) -> dict:
    """`Accelerator(cpu=device == "cpu")`, `prepare(model, optimizer, dataloader)` on the seeds'
    DataLoader, and a plain loop with `accelerator.backward`. Timed from the start of each epoch's
    iteration to its end (device synchronised): data iteration with Accelerate's device placement,
    forward, backward and the step. Not timed: the Accelerator's construction and prepare()."""
    dev = torch.device(device)
    cfg, x, y, model = workload(cfg_path, overrides, torch.device("cpu"))
    times = []
    with _quiet():
        acc = accelerate.Accelerator(cpu=device == "cpu")
        model, opt, loader = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=cfg.train.lr), _loader(cfg, x, y))
        for _ in range(cfg.train.epochs):
            t0 = time.perf_counter()
            for xb, yb in loader:
                opt.zero_grad()
                acc.backward(F.cross_entropy(model(xb), yb))
                opt.step()
            sync(dev)
            times.append(time.perf_counter() - t0)
    return {"epochs": times}


LOOPS = {"lightning": lightning_loop, "accelerate": accelerate_loop}


def peer_comparison(cfg_path, scale: int, device: str, reps: int, epochs: int, say=print) -> dict:
    """The installed peers, our loop, the bare loop and the seeds' DataLoader loop on the same
    workload: each warmed up once, then `reps` interleaved runs in rotating order (as `overhead`).
    A missing peer is recorded as "not installed"; one whose warm-up raises, as "failed: ..."."""
    ov = [*scale_overrides(cfg_path, scale), f"train.epochs={epochs}"]
    variants = our_bare_and_seed_loops(cfg_path, device)
    for fn in variants.values():
        fn(warm(cfg_path, scale))
    status = {}
    for peer, loop in LOOPS.items():
        module = find(peer)
        if module is None:
            status[peer] = "not installed"
            say(f"  {peer}: not installed ({INSTALL[peer]} to compare with it); going on without it")
            continue
        variant = lambda o, loop=loop, module=module: loop(cfg_path, o, device, module)  # noqa: E731
        try:
            variant(warm(cfg_path, scale))
        except Exception as e:  # a peer's own failure is a result, not the end of the bench
            status[peer] = f"failed: {type(e).__name__}: {e}"[:300]
            say(f"  {peer}: {status[peer]}")
            continue
        status[peer] = f"{module.__name__} {getattr(module, '__version__', '?')}"
        variants[peer] = variant
    res = repeat(variants, reps, ov, None)
    return {"scale": scale, "params": mlp_params(scale), "device": device, "epochs": epochs, "peers": status, "loops": loop_table(res, cfg_path, ov, epochs)}

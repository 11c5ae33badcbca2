"""Changing settings on a resume: which may change, what a change does, and the run's config history.

A rerun compares its config with the one the checkpoint's state was trained under (inside the
checkpoint; config.yaml for older ones). Three kinds of setting:
- where and how the run executes (devices, workers, logging, checkpoint cadence, timeouts, the data's
  location) and how long it trains (`train.epochs`, `train.max_steps`): taken as given;
- the optimizer's numbers (`train.lr`, `momentum`, `weight_decay`, `grad_clip`) and the schedule's
  (`schedule`, `warmup_steps`, `step_every`, `gamma`, `min_lr_ratio`): applied to the restored
  optimizer and schedule, so lowering the LR after a NaN (exit 3) does what it says;
- everything that defines the run (model, data, loss, seed, batch and accumulation, optimizer kind,
  precision): refused, as a different run.
Every change is named in one line, with what it does to the LR at this step, and config.yaml's
previous version is kept in config-history/. Nothing of the checkpoint's is kept against the config
silently.
"""

from __future__ import annotations

from pathlib import Path

from launch.checkpoint import integrity

AS_GIVEN = (
    "run.", "ckpt.", "log.", "dist.", "train.epochs", "train.max_steps", "train.device", "train.check_every_steps",
    "train.cuda_graphs", "train.compile", "train.compile_mode", "train.metrics", "data.num_workers", "data.pin_memory",
    "data.eval_batch_size", "data.eval_max_samples", "data.path", "data.val_path",
    "model.tp_plan",  # how the model is split over tensor-parallel ranks, not which model
    "data.cache_mb", "data.index_dir", "data.accept_corpus_change",
)
APPLIED = (
    "train.lr", "train.momentum", "train.weight_decay", "train.grad_clip", "train.ema_decay", "train.ema_warmup_steps",
    "train.schedule", "train.warmup_steps", "train.step_every", "train.gamma", "train.min_lr_ratio",
)
SPLIT = ("data.batch_size", "train.accum_steps", "train.global_batch")  # how a global batch is split: free while the global batch stays
QUIET = ("run.", "ckpt.resume")  # where the run lives and how it started: no news on a rerun
HISTORY = "config-history"


def _matches(name: str, keys) -> bool:
    return any(name == k or (k.endswith(".") and name.startswith(k)) for k in keys)


def review(old: dict, new: dict, same_global_batch: bool = False) -> tuple[list[tuple[str, object, object]], list[str]]:
    """(allowed changes as (name, before, after), refused changes as 'name: a -> b'). A setting the old
    config does not know (added since) is not a change. `data.batch_size` and `train.accum_steps` may
    change with the world size when the global batch stays the same (3 x 16 after 2 x 24, or what
    train.global_batch derives): the same run, resharded."""
    allowed, refused = [], []
    for section, body in new.items():
        for key, value in body.items():
            name = f"{section}.{key}"
            before = (old.get(section) or {}).get(key, value)
            if before == value or (name in SPLIT and same_global_batch and (new.get("train") or {}).get("global_batch")):
                continue  # train.global_batch derives the split at each world size: no news
            if _matches(name, AS_GIVEN) or _matches(name, APPLIED) or (name in SPLIT and same_global_batch):
                allowed.append((name, before, value))
            else:
                refused.append(f"{name}: {before!r} -> {value!r}")
    return allowed, refused


def apply(changes: list, optimizer, scheduler, cfg, step: int) -> list[str]:
    """Put the changed numbers into the restored optimizer and schedule; one line per change, and one
    for the LR at this step if it moved (a longer cosine schedule raises it again: said, not hidden)."""
    if not changes:
        return []
    lines = [f"changed on resume at step {step}: {name} {before!r} -> {after!r}" for name, before, after in changes if not _matches(name, QUIET)]
    if any(_matches(name, APPLIED) or name in ("train.epochs", "train.max_steps") for name, _, _ in changes):
        t = cfg.train
        was = [float(g["lr"]) for g in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["initial_lr"] = t.lr
            if "momentum" in group:
                group["momentum"] = t.momentum
            if "weight_decay" in group:
                group["weight_decay"] = t.weight_decay
        scheduler.base_lrs = [t.lr for _ in optimizer.param_groups]
        now = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, now):
            group["lr"] = lr
        scheduler._last_lr = list(now)
        if now != was:
            lines.append(f"the learning rate at step {step} is now {now[0]:.6g} (was {was[0]:.6g}), following train.schedule={t.schedule} with the new settings")
    return lines


def keep_history(config_file: Path, step: int) -> Path | None:
    """Before config.yaml is rewritten with changed settings: keep the previous one in config-history/."""
    if not config_file.is_file():
        return None
    target = config_file.parent / HISTORY / f"config.before-step_{step:08d}.yaml"
    target.parent.mkdir(exist_ok=True)
    body = config_file.read_bytes()
    integrity.atomic_write(target, lambda f: f.write(body), what="config history")
    return target


def saved_config(ckpt: dict, config_file_body: dict) -> dict:
    """The config the checkpoint's state was trained under: its own copy, else config.yaml's."""
    inside = ckpt.get("config") if isinstance(ckpt, dict) else None
    return inside if isinstance(inside, dict) else (config_file_body or {})


"""Every range check and every check of a name (model, dataset, loss) in one place, so a bad value
fails before anything starts. (Settings with fixed choices are checked against their `Literal[...]`
type while they are read: launch.config.parse.)"""

from __future__ import annotations

from launch.data import NEEDS_PATH, SOURCES as BUILTIN_DATA
from launch.errors import UserError
from launch.observe.trackers import TRACKERS
from launch.user_code import short_name

BUILTIN_LOSSES = ("cross_entropy", "mse", "l1", "bce_with_logits")
BUILTIN_METRICS = ("accuracy", "top5", "f1_macro", "auroc", "mse", "mae")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg) -> None:
    """Check a whole Config; raise UserError naming the first bad key."""
    _model(cfg.model)
    _data(cfg.data, cfg.model)
    _train(cfg.train)
    _rest(cfg.dist, cfg.ckpt, cfg.log)


def _model(m) -> None:
    if m.name != "mlp" and ":" not in m.name:
        raise UserError(f"model.name: must be 'mlp' or an import path 'pkg.module:Class', got '{m.name}'")
    if m.tp_plan and ":" not in m.tp_plan:
        raise UserError(f"model.tp_plan: must be empty (the model's own plan) or an import path 'pkg.module:fn', got '{m.tp_plan}'")
    for i, w in enumerate(m.hidden):
        _positive(f"model.hidden[{i}]", w)
    for key in ("in_features", "out_features"):
        if getattr(m, key) is not None:
            _positive(f"model.{key}", getattr(m, key))
    if m.pretrained and m.name == "mlp":
        raise UserError("model.pretrained: needs model.name, a class with from_pretrained (e.g. transformers:AutoModelForCausalLM)")
    lora = m.lora
    _positive("model.lora.r", lora.r, allow_zero=True)
    _positive("model.lora.alpha", lora.alpha)
    if not 0.0 <= lora.dropout < 1.0:
        raise UserError(f"model.lora.dropout: must be >= 0 and < 1, got {lora.dropout}")
    if lora.r and not [t for t in lora.targets if t]:
        raise UserError("model.lora.targets: empty; name the modules that get adapters (e.g. [q_proj, v_proj]) or [all-linear]")


def _data(d, model) -> None:
    if d.name not in BUILTIN_DATA and ":" not in d.name:
        raise UserError(f"data.name: must be one of {', '.join(BUILTIN_DATA)} or an import path 'pkg.module:Class', got '{d.name}'")
    for key in ("batch_size", "eval_batch_size", "n_train", "n_eval", "features"):
        _positive(f"data.{key}", getattr(d, key))
    if d.classes < 2:
        raise UserError(f"data.classes: must be >= 2, got {d.classes}")
    _positive("data.num_workers", d.num_workers, allow_zero=True)
    _positive("data.eval_max_samples", d.eval_max_samples, allow_zero=True)
    if d.collate and ":" not in d.collate:
        raise UserError(f"data.collate: must be an import path 'pkg.module:fn', got '{d.collate}'")
    _positive("data.seq_len", d.seq_len, allow_zero=True)
    _positive("data.stride", d.stride, allow_zero=True)
    if d.name == "tokens" and not d.seq_len:
        raise UserError("data.seq_len: required for data.name=tokens (tokens per window, the model's context length)")
    _corpus(d)
    _positive("data.max_length", d.max_length, allow_zero=True)
    if d.name in NEEDS_PATH and not d.path:
        raise UserError(f"data.path: required for data.name={d.name} ({'a directory with the MNIST IDX files' if d.name == 'mnist' else 'the data file'})")
    if d.name == "sft" and not (d.tokenizer or model.pretrained):
        raise UserError("data.tokenizer: data.name=sft needs a tokenizer directory (data.tokenizer, or model.pretrained, whose tokenizer is the default)")
    if not 0.0 <= d.val_fraction < 1.0:
        raise UserError(f"data.val_fraction: must be >= 0 and < 1, got {d.val_fraction}")
    if d.name in ("csv", "npz") and d.val_fraction == 0 and not d.val_path:
        raise UserError("data.val_fraction: 0 leaves no evaluation set; give data.val_path or a fraction > 0")
    for key in ("x_key", "y_key"):
        if not getattr(d, key):
            raise UserError(f"data.{key}: must not be empty")


CORPORA = ("parquet", "jsonl", "hf")


def _corpus(d) -> None:
    """parquet, jsonl, hf: their own settings, and none of theirs elsewhere."""
    for key in ("unit_rows", "shuffle_window", "cache_mb"):
        _positive(f"data.{key}", getattr(d, key), allow_zero=key != "cache_mb")
    if d.name not in CORPORA:
        for key in ("text", "unit_rows", "shuffle_window", "index_dir", "feature_columns"):
            if getattr(d, key):
                raise UserError(f"data.{key}: applies to data.name=parquet, jsonl or hf (the data is '{d.name}')")
        return
    if d.text:
        if not d.seq_len:
            raise UserError("data.seq_len: required with data.text (tokens per window, the model's context length)")
        if not d.tokenizer:
            raise UserError("data.tokenizer: required with data.text (a Hugging Face tokenizer directory with an EOS token)")
        if d.feature_columns:
            raise UserError("data.feature_columns: a text corpus (data.text) has no feature columns")
    if not d.val_path and d.val_fraction == 0:
        raise UserError("data.val_fraction: 0 leaves no evaluation set; give data.val_path or a fraction > 0")


def _train(t) -> None:
    _positive("train.epochs", t.epochs)
    _positive("train.max_steps", t.max_steps, allow_zero=True)
    _positive("train.lr", t.lr)
    _positive("train.momentum", t.momentum, allow_zero=True)
    _positive("train.weight_decay", t.weight_decay, allow_zero=True)
    _positive("train.accum_steps", t.accum_steps)
    _positive("train.global_batch", t.global_batch, allow_zero=True)
    _positive("train.grad_clip", t.grad_clip, allow_zero=True)
    if not 0.0 <= t.ema_decay < 1.0:
        raise UserError(f"train.ema_decay: must be >= 0 and < 1 (0 turns the EMA off), got {t.ema_decay}")
    _positive("train.ema_warmup_steps", t.ema_warmup_steps, allow_zero=True)
    _positive("train.warmup_steps", t.warmup_steps, allow_zero=True)
    _positive("train.step_every", t.step_every)
    _positive("train.gamma", t.gamma)
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise UserError(f"train.min_lr_ratio: must be between 0 and 1, got {t.min_lr_ratio}")
    _positive("train.check_every_steps", t.check_every_steps)
    if t.loss not in BUILTIN_LOSSES and ":" not in t.loss:
        raise UserError(f"train.loss: must be one of {', '.join(BUILTIN_LOSSES)} or an import path 'pkg.module:fn', got '{t.loss}'")
    metrics(t.metrics)


def metrics(names: list[str]) -> None:
    """Known names or import paths, and no two that would write the same eval_<name> record."""
    taken = set()
    for name in names:
        if ":" not in name:
            if name != "auto" and name not in BUILTIN_METRICS:
                raise UserError(f"train.metrics: unknown metric '{name}'; choose from auto, {', '.join(BUILTIN_METRICS)} or an import path 'pkg.module:fn'")
            continue
        key = short_name(name)
        if not all(part.isidentifier() for part in name.rpartition(":")[2].split(".")):
            raise UserError(f"train.metrics: expected an import path 'pkg.module:fn' (or 'pkg.module:Class.method'), got '{name}'")
        if key in taken or key in BUILTIN_METRICS or key in ("loss", "samples"):
            raise UserError(f"train.metrics: '{name}' would be recorded as eval_{key}, which another metric writes; give the function another name")
        taken.add(key)


def _rest(di, c, lg) -> None:
    _positive("dist.timeout_s", di.timeout_s)
    if di.strategy != "fsdp":
        for key, default in (("param_dtype", "fp32"), ("reduce_dtype", "fp32"), ("cpu_offload", False)):
            if getattr(di, key) != default:
                raise UserError(f"dist.{key}: applies to dist.strategy=fsdp only (the strategy is {di.strategy})")
        if c.async_save and di.tp < 2:
            raise UserError("ckpt.async_save: applies to sharded checkpoints (dist.strategy=fsdp or dist.tp > 1) only")
    _positive("dist.bucket_cap_mb", di.bucket_cap_mb)
    _mesh(di)
    _positive("ckpt.every_steps", c.every_steps, allow_zero=True)
    _positive("ckpt.every_epochs", c.every_epochs, allow_zero=True)
    if c.keep_last < 1:
        raise UserError(f"ckpt.keep_last: must be >= 1, got {c.keep_last}")
    if not c.resume:
        raise UserError("ckpt.resume: must be 'auto', 'never' or a checkpoint path, got ''")
    _positive("ckpt.barrier_timeout_s", c.barrier_timeout_s)
    _positive("log.every_steps", lg.every_steps, allow_zero=True)
    for name in lg.tracker:
        if name != "tensorboard" and name not in TRACKERS and ":" not in name:
            raise UserError(f"log.tracker: unknown tracker '{name}': use tensorboard, {', '.join(TRACKERS)} or an import path 'pkg.module:Class'")
    if lg.profile_steps:
        profile_range(lg.profile_steps)


def _mesh(di) -> None:
    """dist.replicate, dist.tp, dist.sequence_parallel (the world-size checks come at start: launch.parallel.mesh)."""
    _positive("dist.tp", di.tp)
    r = di.replicate
    if r != "auto" and not (r.isdigit() and int(r) >= 1):
        raise UserError(f"dist.replicate: must be 'auto' or a whole number >= 1 (replicas of the sharded model), got '{r}'")
    if r != "1" and di.strategy != "fsdp":
        raise UserError(f"dist.replicate={r}: applies to dist.strategy=fsdp only (HSDP: sharded within a replica, replicated across); the strategy is {di.strategy}")
    if di.sequence_parallel and di.tp < 2:
        raise UserError("dist.sequence_parallel: applies with tensor parallelism only (set dist.tp to 2 or more)")


def profile_range(text: str) -> tuple[int, int]:
    """log.profile_steps 'START:END' -> (start, end), 1-based optimizer steps, END inclusive."""
    start, sep, end = text.partition(":")
    try:
        first, last = int(start), int(end)
    except ValueError:
        first = last = 0
    if not sep or first < 1 or last < first:
        raise UserError(f"log.profile_steps: expected START:END with 1 <= START <= END (optimizer steps), got '{text}'")
    return first, last

"""Configuration: dataclasses with one docstring per field, validated in one place.

Precedence is CLI > YAML file > defaults. A YAML file and the command line use
the same dotted names (`train.lr=0.05`). Unknown keys, wrong types and
impossible values raise `UserError` naming the key, before any process group
or file exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from launch.errors import UserError


@dataclass
class RunConfig:
    dir: str = ""
    """Run directory (config.yaml, metrics.jsonl, checkpoints/, model.pt). Empty: runs/<name>."""
    name: str = ""
    """Run name, used for the default run directory. Empty: the config file's stem, else 'default'."""


@dataclass
class ModelConfig:
    name: str = "mlp"
    """'mlp' (the seeds' NeuralNetwork: Linear-ReLU-...-Linear, logits out) or an import path 'pkg.module:Class'."""
    hidden: list[int] = field(default_factory=lambda: [300, 200])
    """Hidden layer widths of the MLP (the seeds use 300*scale, 200*scale)."""
    in_features: Optional[int] = None
    """Input width. Empty: taken from the dataset."""
    out_features: Optional[int] = None
    """Number of logits. Empty: the dataset's number of classes; if set it must match it."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments for an import-path model class."""


@dataclass
class DataConfig:
    name: str = "synthetic"
    """'toy' (the seeds' 5+2 points), 'synthetic', 'csv', 'npz', 'mnist', or an import path 'pkg.module:Class'."""
    batch_size: int = 32
    """Training batch size PER PROCESS. The global batch is batch_size x world_size (x train.accum_steps)."""
    eval_batch_size: int = 256
    """Evaluation batch size per process (does not change results)."""
    n_train: int = 4096
    """synthetic: number of training samples."""
    n_eval: int = 1024
    """synthetic: number of evaluation samples."""
    features: int = 100
    """synthetic: input features (the seeds use 100*scale)."""
    classes: int = 2
    """synthetic: number of classes."""
    learnable: bool = True
    """synthetic: labels from a fixed random teacher network (True) or uniformly random labels as in the seeds' benchmark (False)."""
    seed: int = 1234
    """Seed for generating or splitting the data (independent of train.seed, identical on every rank)."""
    path: str = ""
    """File or directory for file-based datasets (csv, npz, mnist)."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments for an import-path Dataset class (it must also accept split='train'|'eval')."""
    num_workers: int = 0
    """DataLoader workers for datasets that are not in-memory tensors (in-memory data is sliced on the device)."""
    pin_memory: str = "auto"
    """'auto' (on with CUDA), 'true' or 'false'; DataLoader path only."""
    target: str = ""
    """csv: the label column, by name (with data.header) or 0-based index (without); empty: the last column. Integer or string labels; their names are saved with the run."""
    header: bool = True
    """csv: the first line names the columns. false: no header, columns are addressed by index."""
    ignore: list[str] = field(default_factory=list)
    """csv: columns to leave out of the features (e.g. an id column), by name or index like data.target."""
    val_fraction: float = 0.2
    """csv, npz: fraction of the rows held out for evaluation (a seeded split by data.seed) when data.val_path is empty."""
    val_path: str = ""
    """csv, npz: a separate evaluation file (same columns/keys as data.path); then all of data.path trains."""
    x_key: str = "x"
    """npz: name of the feature array (first axis = samples)."""
    y_key: str = "y"
    """npz: name of the label array (integers or strings, one per sample)."""
    standardize: bool = True
    """csv, npz: standardise each feature with the training split's mean and std (saved with the run; predict applies the same)."""


@dataclass
class TrainConfig:
    epochs: int = 5
    """Number of passes over the training data."""
    lr: float = 0.1
    """Peak learning rate."""
    optimizer: str = "sgd"
    """'sgd' or 'adamw'."""
    momentum: float = 0.0
    """SGD momentum."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for AdamW)."""
    seed: int = 0
    """Seed for model initialisation and the per-epoch shuffle (the permutation is a pure function of seed and epoch)."""
    device: str = "auto"
    """'auto' (CUDA, then MPS for a single process, then CPU), 'cpu', 'cuda' or 'mps'."""
    precision: str = "fp32"
    """'fp32', 'bf16' or 'fp16' (autocast; fp16 uses a GradScaler)."""
    accum_steps: int = 1
    """Gradient accumulation: micro-batches per optimizer step (DDP syncs only on the last)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    schedule: str = "constant"
    """LR schedule per optimizer step: 'constant', 'step' or 'cosine' (all with train.warmup_steps of linear warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to train.lr."""
    step_every: int = 1000
    """'step' schedule: multiply the LR by train.gamma every this many optimizer steps."""
    gamma: float = 0.1
    """'step' schedule: decay factor."""
    min_lr_ratio: float = 0.0
    """'cosine' schedule: final LR as a fraction of train.lr."""
    compile: bool = False
    """Wrap the model in torch.compile (checkpoints stay prefix-free)."""
    compile_mode: str = "default"
    """torch.compile mode when train.compile is on: 'default', 'reduce-overhead' (CUDA graphs: for small models where kernel-launch overhead dominates; single process) or 'max-autotune'."""
    check_every_steps: int = 10
    """Every this many optimizer steps the ranks agree on stop requests and non-finite losses (one tiny all-reduce)."""


@dataclass
class DistConfig:
    backend: str = "auto"
    """'auto' (nccl with CUDA, gloo otherwise), 'nccl' or 'gloo'."""
    timeout_s: float = 30.0
    """Seconds before a collective (and init_process_group) gives up, so a dead peer ends the job fast."""
    bucket_cap_mb: float = 25.0
    """DDP gradient bucket size."""
    gradient_as_bucket_view: bool = True
    """DDP: gradients alias the all-reduce buckets (saves a copy)."""
    static_graph: bool = False
    """DDP static_graph optimisation."""
    find_unused_parameters: bool = False
    """DDP: search for parameters without gradients each step (slow; only for models that need it)."""


@dataclass
class CkptConfig:
    every_steps: int = 0
    """Save every this many optimizer steps (0: off)."""
    every_epochs: int = 1
    """Save at the end of every this many epochs (0: off). A final checkpoint is always written."""
    keep_last: int = 3
    """Keep this many newest checkpoints (>= 1)."""
    resume: str = "auto"
    """'auto' (latest valid checkpoint in the run directory, if any), 'never' (start fresh; old checkpoints are moved aside, never deleted) or a checkpoint path to start from (used only while the run directory has no checkpoint of its own, so restarts continue)."""
    barrier_timeout_s: float = 600.0
    """How long other ranks wait for rank 0 to write a checkpoint."""


@dataclass
class LogConfig:
    progress: str = "auto"
    """tqdm progress bar on rank 0: 'auto' (when stderr is a terminal), 'true' or 'false'."""
    every_steps: int = 0
    """Also write a metrics.jsonl record every this many optimizer steps (0: per epoch only)."""
    tensorboard: bool = False
    """Write TensorBoard scalars to <run dir>/tb (needs the 'tensorboard' extra)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir)


# --------------------------------------------------------------------------- docs


def field_docs(cls) -> dict[str, str]:
    """Map field name -> docstring, read from the class source (the string after each field)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def reference_markdown() -> str:
    """The config reference as a Markdown table (README's "Configuration reference": `python -m launch.config`)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            lines.append(f"| `{section.name}.{f.name}` | `{default!r}` | {docs.get(f.name, '')} |")
    return "\n".join(lines)


def reference() -> str:
    """The config reference as Markdown-ish text (used by --help and the README)."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        docs = field_docs(cls)
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            lines.append(f"  {section.name}.{f.name} = {default!r}  # {docs.get(f.name, '')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- parsing


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp) -> Any:
    """Check `value` against annotation `tp`; return it (ints widen to float). Raise UserError otherwise."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list of {_type_name(inner)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            return "true" if value else "false"  # YAML reads `log.progress=false` as a bool
        if isinstance(value, (int, float)):
            return str(value)  # e.g. run.name=2024 parsed as a number
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported annotation {tp} for {key}")


def _apply(cfg: Config, dotted: dict[str, Any]) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for key, value in dotted.items():
        parts = key.split(".")
        if len(parts) != 2 or parts[0] not in sections:
            valid = [f"{s}.{f.name}" for s in sections for f in dataclasses.fields(sections[s].default_factory)]
            hint = difflib.get_close_matches(key, valid, n=1)
            raise UserError(f"unknown config key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        section = getattr(cfg, parts[0])
        hints = typing.get_type_hints(type(section))
        if parts[1] not in hints:
            valid = [f"{parts[0]}.{n}" for n in hints]
            hint = difflib.get_close_matches(key, valid, n=1)
            raise UserError(f"unknown config key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        setattr(section, parts[1], _coerce(key, value, hints[parts[1]]))


def _flatten(tree: Any, where: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        raise UserError(f"{where}: expected a mapping of sections (run, model, data, train, dist, ckpt, log)")
    flat = {}
    for section, body in tree.items():
        if not isinstance(body, dict):
            raise UserError(f"{where}: section '{section}' must be a mapping, got {body!r}")
        for key, value in body.items():
            flat[f"{section}.{key}"] = value
    return flat


def read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        text = p.read_text()
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"invalid YAML in {path}{where}: {problem}") from None
    return tree or {}


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"expected key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load(config_path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Build the config: defaults, then the YAML file, then `key=value` overrides; validate it."""
    cfg = Config()
    if config_path:
        _apply(cfg, _flatten(read_yaml(config_path), config_path))
    _apply(cfg, dict(parse_override(o) for o in overrides or []))
    if not cfg.run.name:
        cfg.run.name = Path(config_path).stem if config_path else "default"
    if not cfg.run.dir:
        cfg.run.dir = os.path.join("runs", cfg.run.name)
    validate(cfg)
    return cfg


def from_dict(tree: dict) -> Config:
    """Rebuild a config saved in a run directory or checkpoint."""
    cfg = Config()
    _apply(cfg, _flatten(tree, "saved config"))
    validate(cfg)
    return cfg


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{key}: must be one of {', '.join(choices)}, got '{value}'")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: Config) -> None:
    """Every range and choice check lives here, so a bad value fails before anything starts."""
    m, d, t, di, c, lg = cfg.model, cfg.data, cfg.train, cfg.dist, cfg.ckpt, cfg.log
    if m.name != "mlp" and ":" not in m.name:
        raise UserError(f"model.name: must be 'mlp' or an import path 'pkg.module:Class', got '{m.name}'")
    for i, w in enumerate(m.hidden):
        _positive(f"model.hidden[{i}]", w)
    for key in ("in_features", "out_features"):
        if getattr(m, key) is not None:
            _positive(f"model.{key}", getattr(m, key))
    builtin = ("toy", "synthetic", "csv", "npz", "mnist")
    if d.name not in builtin and ":" not in d.name:
        raise UserError(f"data.name: must be one of {', '.join(builtin)} or an import path 'pkg.module:Class', got '{d.name}'")
    for key in ("batch_size", "eval_batch_size", "n_train", "n_eval", "features"):
        _positive(f"data.{key}", getattr(d, key))
    if d.classes < 2:
        raise UserError(f"data.classes: must be >= 2, got {d.classes}")
    _positive("data.num_workers", d.num_workers, allow_zero=True)
    _choice("data.pin_memory", d.pin_memory, ("auto", "true", "false"))
    if d.name in ("csv", "npz", "mnist") and not d.path:
        raise UserError(f"data.path: required for data.name={d.name} ({'a directory with the MNIST IDX files' if d.name == 'mnist' else 'the data file'})")
    if not 0.0 <= d.val_fraction < 1.0:
        raise UserError(f"data.val_fraction: must be >= 0 and < 1, got {d.val_fraction}")
    if d.name in ("csv", "npz") and d.val_fraction == 0 and not d.val_path:
        raise UserError("data.val_fraction: 0 leaves no evaluation set; give data.val_path or a fraction > 0")
    for key in ("x_key", "y_key"):
        if not getattr(d, key):
            raise UserError(f"data.{key}: must not be empty")
    _positive("train.epochs", t.epochs)
    _positive("train.lr", t.lr)
    _choice("train.optimizer", t.optimizer, ("sgd", "adamw"))
    _positive("train.momentum", t.momentum, allow_zero=True)
    _positive("train.weight_decay", t.weight_decay, allow_zero=True)
    _choice("train.device", t.device, ("auto", "cpu", "cuda", "mps"))
    _choice("train.precision", t.precision, ("fp32", "bf16", "fp16"))
    _positive("train.accum_steps", t.accum_steps)
    _choice("train.compile_mode", t.compile_mode, ("default", "reduce-overhead", "max-autotune"))
    _positive("train.grad_clip", t.grad_clip, allow_zero=True)
    _choice("train.schedule", t.schedule, ("constant", "step", "cosine"))
    _positive("train.warmup_steps", t.warmup_steps, allow_zero=True)
    _positive("train.step_every", t.step_every)
    _positive("train.gamma", t.gamma)
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise UserError(f"train.min_lr_ratio: must be between 0 and 1, got {t.min_lr_ratio}")
    _positive("train.check_every_steps", t.check_every_steps)
    _choice("dist.backend", di.backend, ("auto", "nccl", "gloo"))
    _positive("dist.timeout_s", di.timeout_s)
    _positive("dist.bucket_cap_mb", di.bucket_cap_mb)
    _positive("ckpt.every_steps", c.every_steps, allow_zero=True)
    _positive("ckpt.every_epochs", c.every_epochs, allow_zero=True)
    if c.keep_last < 1:
        raise UserError(f"ckpt.keep_last: must be >= 1, got {c.keep_last}")
    if not c.resume:
        raise UserError("ckpt.resume: must be 'auto', 'never' or a checkpoint path, got ''")
    _positive("ckpt.barrier_timeout_s", c.barrier_timeout_s)
    _choice("log.progress", lg.progress, ("auto", "true", "false"))
    _positive("log.every_steps", lg.every_steps, allow_zero=True)


def save(cfg: Config, path: Path) -> None:
    """Write the resolved config (atomically, so a kill never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)


# Keys that may change between a run and its resumption without making it a different run.
RESUMABLE_CHANGES = ("run.", "ckpt.", "log.", "dist.", "train.epochs", "train.device", "train.check_every_steps", "data.num_workers", "data.pin_memory", "data.eval_batch_size", "data.path")


def differences(old: dict, new: dict) -> list[str]:
    """Settings that differ between two config dicts, ignoring those a resume may change."""
    out = []
    for section, body in new.items():
        for key, value in body.items():
            name = f"{section}.{key}"
            if any(name == k or (k.endswith(".") and name.startswith(k)) for k in RESUMABLE_CHANGES):
                continue
            before = old.get(section, {}).get(key, value)
            if before != value:
                out.append(f"{name}: {before!r} -> {value!r}")
    return out


if __name__ == "__main__":
    print(reference_markdown())

"""`launch predict`: batched inference, or eval-only, from a checkpoint or final weights.

SOURCE is a run directory (its newest committed checkpoint, else model.pt + config.yaml), a
checkpoint file, or a bare model.pt (its run's config.yaml, or --config). Inputs are the run's
own dataset (--split) or a CSV/NPZ file of raw features (--input): the transform and class names
saved in the checkpoint's data_state turn raw features into model inputs and indices back into
the original labels. Evaluation reuses launch.train.evaluate on a launch.data.feeder.Feeder, the same
code that produced the training run's eval metrics. Classifiers write labels and probabilities (class
names from the run's data state or the dataset's own, else class indices), regressions their predicted
values, models with their own loss their outputs; sequence models support --eval.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import torch

from launch import config as config_mod
from launch.checkpoint import store
from launch.commands import export
from launch.config.validate import metrics as validate_metrics
from launch.data.build import build_data
from launch.data.feeder import Feeder, make_feeder
from launch.data.labels import REGRESSION_LOSSES, encode, regression_targets
from launch.data.tabular import apply_transform, csv_features, npz_arrays
from launch.data.types import Split, call_model, model_output
from launch.errors import UserError
from launch.models.build import build_model, clean_state_dict
from launch.processes.dist import DistEnv, Runtime, resolve_device
from launch.train.evaluate import evaluate
from launch.train.optim import autocast_context
from launch.train.task import Task


def add_arguments(p) -> None:
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT", help="a run directory, a checkpoint file, or model.pt")
    p.add_argument("--input", "-i", help="CSV or NPZ file of raw features (a label column/array, if present, enables --eval)")
    p.add_argument("--split", choices=("eval", "train"), default="eval", help="without --input: which split of the run's dataset (default eval)")
    p.add_argument("--output", "-o", help="predictions CSV to write (default predictions.csv; with --eval only if given)")
    p.add_argument("--eval", action="store_true", help="eval-only: print loss and the run's train.metrics as JSON instead of writing predictions")
    p.add_argument("--metrics", help="with --eval: train.metrics to compute instead of the run's, comma-separated (e.g. accuracy,f1_macro,auroc)")
    p.add_argument("--config", help="config.yaml for bare weights outside their run directory")
    p.add_argument("--data-path", help="override data.path of the saved config (the dataset moved)")
    p.add_argument("--batch-size", type=int, default=0, help="inference batch size (default: the run's data.eval_batch_size)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps", "auto"), help="default cpu")


def load_source(source: str, config_path=None):
    """(state_dict, config, data_state or None, the file the weights came from)."""
    p = Path(source)
    if p.is_dir() and p.suffix != ".dcp":
        latest = store.read_latest(store.checkpoint_dir(p))
        if latest and (store.checkpoint_dir(p) / latest).exists():
            p = store.checkpoint_dir(p) / latest
        elif (p / "model.pt").is_file():
            p = p / "model.pt"
        else:
            raise UserError(f"{source}: no checkpoints/latest and no model.pt (not a finished run directory?)")
    elif not p.exists():
        raise UserError(f"{source}: no such file or run directory")
    try:
        # a sharded checkpoint (a .dcp directory) is read whole here, as `launch export` does
        weights, ckpt = (export.weights(p), store.load(p)) if p.is_dir() else store.load_weights(p)
    except store.CheckpointError:
        raise
    except Exception as e:  # torch.load's unpickler can fail in other ways on arbitrary bytes (e.g. IndexError)
        raise store.CheckpointError(f"checkpoint {p}: unreadable (not a torch file: {type(e).__name__})") from None
    if ckpt is not None and config_path is None:
        if not isinstance(ckpt.get("config"), dict):
            raise store.CheckpointError(f"checkpoint {p}: holds no saved config")
        return weights, config_mod.from_dict(ckpt["config"]), ckpt.get("data_state"), p
    cfg_file = Path(config_path) if config_path else (p.parent.parent if p.parent.name == "checkpoints" else p.parent) / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{p}: bare weights need their run's config.yaml (not found at {cfg_file}; pass --config)")
    return weights, config_mod.from_dict(config_mod.read_yaml(str(cfg_file))), (ckpt or {}).get("data_state"), p


def read_input(path: str, state: dict, in_features: int, regression: bool = False, strict: bool = True):
    """Raw features (and labels, if the file has them) -> (model inputs, labels or None). strict=False:
    labels that are missing (an empty cell, nan) are kept as they are, for rows that are to be predicted."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        x, labels = npz_arrays(path, state.get("x_key", "x"), state.get("y_key", "y"), need_y=False, regression=regression, strict=strict)
    elif suffix == ".csv":
        if state.get("kind") == "csv":
            x, labels, _, _ = csv_features(path, state["header"], state["target"], state.get("ignore", ()), state["feature_columns"], regression, strict)
        else:  # other datasets have no column names: a header-less file of the features, optionally + a last label column
            x, labels, _, _ = csv_features(path, False, "", (), [str(i) for i in range(in_features)], regression, strict)
    else:
        raise UserError(f"--input {path}: expected a .csv or .npz file")
    x = apply_transform(x, state)
    if x[0].numel() != in_features:
        raise UserError(f"--input {path}: {x[0].numel()} features per sample, the model expects {in_features}")
    return x, labels


@torch.no_grad()
def outputs(model, feeder: Feeder, cfg, device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The model's outputs and the split's targets (None if their shapes vary) for every sample, in input order
    (one rank evaluates 0, 1, 2, ...)."""
    model.eval()
    out, targets = [], []
    for inputs, target in feeder.eval_batches():
        with autocast_context(cfg, device):
            out.append(model_output(call_model(model, inputs))[0].float().cpu())
        targets.append(torch.as_tensor(target).cpu())
    shapes = sorted({tuple(o.shape[1:]) for o in out})
    if len(shapes) > 1:  # padded batches of different lengths
        raise UserError(f"predictions CSV: the outputs differ in shape between batches ({shapes[0]} and {shapes[-1]} per sample), as a sequence model's do: use --eval")
    same = len({tuple(t.shape[1:]) for t in targets}) == 1
    return torch.cat(out), torch.cat(targets) if same else None


def output_kind(cfg, model, out: torch.Tensor) -> str:
    """How the outputs read: 'class' (softmax over C logits), 'binary' (one logit), 'multilabel'
    (a logit per label), 'values' (a regression), 'raw' (an own loss: the outputs as they are), as
    launch.train.task.Task decides which loss applies."""
    own = cfg.model.loss_arg or callable(getattr(model, "loss", None))
    loss = "own" if own else cfg.train.loss
    kind = {"cross_entropy": "class", "mse": "values", "l1": "values"}.get(loss, "raw")
    if loss == "bce_with_logits":
        kind = "binary" if out[0].numel() == 1 else "multilabel"
    if kind == "class" and out.dim() != 2 or kind in ("multilabel", "raw") and out.dim() > 2:
        raise UserError(f"predictions CSV: one row per sample needs outputs [N] or [N, C]; this model outputs "
                        f"[N, {', '.join(map(str, out.shape[1:]))}] (a sequence model): use --eval")
    return kind


def class_names(state: dict, dataset, width: int) -> list[str]:
    """Names for `width` classes: the run's saved class names (csv, npz), else the dataset's own
    (`classes`, as torchvision's ImageFolder has; a Hugging Face ClassLabel feature), else 0..width-1."""
    features = getattr(dataset, "features", None)
    label = next((features[k] for k in ("target", "label") if isinstance(features, dict) and k in features), None)
    for names in (state.get("class_names"), getattr(dataset, "classes", None), getattr(label, "names", None)):
        if isinstance(names, (list, tuple)) and len(names) == width:
            return [str(n) for n in names]
    return [str(i) for i in range(width)]


def _row_values(t: torch.Tensor) -> list[list[float]]:
    return t.reshape(len(t), -1).double().tolist()


def write_predictions(path: str, out: torch.Tensor, kind: str, names, labels) -> None:
    """Classifiers: the predicted label and one probability per class (multi-label: the labels over 0.5,
    joined by '|'). Regressions: the predicted values; own losses: the outputs. Plus the known label."""
    if kind in ("values", "raw"):
        values = _row_values(out)
        word = "prediction" if kind == "values" else "output"
        header = [word] if len(values[0]) == 1 else [f"{word}_{j}" for j in range(len(values[0]))]
        rows = [[f"{v:.6g}" for v in row] for row in values]
    else:
        if kind == "class":
            probs = torch.softmax(out, dim=1)
        else:
            p = torch.sigmoid(out.reshape(len(out), -1))
            probs = torch.cat([1 - p, p], dim=1) if kind == "binary" else p
        chosen = probs > 0.5 if kind == "multilabel" else torch.nn.functional.one_hot(probs.argmax(dim=1), probs.shape[1]).bool()
        header = ["prediction", *[f"prob_{n}" for n in names]]
        rows = [["|".join(n for n, c in zip(names, pick) if c), *[f"{v:.6g}" for v in row]] for row, pick in zip(probs.tolist(), chosen.tolist())]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", *header, *(["label"] if labels is not None else [])])
        for i, row in enumerate(rows):
            w.writerow([i, *row, *([labels[i]] if labels is not None else [])])


def known_labels(targets: torch.Tensor, kind: str, names: list[str]) -> list[str]:
    """The split's targets written as predictions are: class names, or values."""
    if kind in ("class", "binary") and targets[0].numel() == 1:
        index = targets.reshape(-1).long().tolist()
        return [names[k] if 0 <= k < len(names) else str(k) for k in index]
    if kind == "multilabel":
        return ["|".join(n for n, t in zip(names, row) if t > 0.5) for row in _row_values(targets)]
    return [" ".join(f"{v:.6g}" for v in row) for row in _row_values(targets)]


def run(args) -> int:
    weights, cfg, state, origin = load_source(args.source, args.config)
    if args.data_path:
        cfg.data.path = args.data_path
    device = resolve_device(args.device, DistEnv("plain"))
    regression = cfg.train.loss in REGRESSION_LOSSES
    bundle = None
    if not args.input or state is None:  # the run's own data: also rebuilds the state bare weights lack
        bundle = build_data(cfg)
        state = state if state is not None else bundle.state
    mats = [v for v in weights.values() if v.ndim == 2]
    in_features = bundle.in_features if bundle else (cfg.model.in_features or (mats[0].shape[1] if mats else 0))
    outputs_for_names = len(state.get("class_names") or [])
    if cfg.train.loss == "bce_with_logits" and outputs_for_names == 2:
        outputs_for_names = 1  # two classes, one logit
    num_classes = bundle.num_classes if bundle else outputs_for_names or cfg.model.out_features or mats[-1].shape[0]
    names = list(state.get("class_names") or [str(i) for i in range(num_classes or 0)])
    model = build_model(cfg, in_features, num_classes).to(device)
    try:
        model.load_state_dict(clean_state_dict(weights))
    except RuntimeError as e:
        raise store.CheckpointError(f"checkpoint {origin}: does not fit the model of its config ({' '.join(str(e).split())[:200]})") from None
    split, where, raw_labels = _split(args, cfg, bundle, state, in_features, names, regression)
    feeder = make_feeder(split, cfg, device, 0, 1, args.batch_size or cfg.data.eval_batch_size)
    if args.eval:
        if args.input and raw_labels is None:
            raise UserError(f"--eval: {args.input} has no label column/array to compare with")
        if args.metrics:
            cfg.train.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
            validate_metrics(cfg.train.metrics)
        task = Task(cfg, model)
        result = evaluate(model, task, feeder, Runtime(DistEnv("plain"), device, None), cfg)
        scores = {k[len("eval_"):]: v for k, v in result.items() if k not in ("eval_loss", "eval_samples")}
        print(json.dumps({"loss": result["eval_loss"], **scores, "samples": result["eval_samples"], "data": where, "weights": str(origin)}))
        if not args.output:
            return 0
    out, targets = outputs(model, feeder, cfg, device)
    kind = output_kind(cfg, model, out)
    names = class_names(state, split.dataset, 2 if kind == "binary" else out.shape[1]) if kind in ("class", "binary", "multilabel") else []
    labels = raw_labels if args.input or targets is None else known_labels(targets, kind, names)
    path = args.output or "predictions.csv"
    write_predictions(path, out, kind, names, labels)
    print(f"wrote {len(out)} predictions ({where}) to {path}")
    return 0


def _split(args, cfg, bundle, state, in_features, names, regression):
    """(the Split to run, a description, the raw labels of an --input file or None)."""
    if not args.input:
        return (bundle.eval if args.split == "eval" else bundle.train), f"{args.split} split of data.name={cfg.data.name}", None
    x, raw_labels = read_input(args.input, state, in_features, regression, strict=args.eval)
    if raw_labels is None or not args.eval:  # only --eval compares: predictions pass the labels through as they are
        y = torch.zeros(len(x), 1) if regression else torch.zeros(len(x), dtype=torch.long)
    else:
        y = regression_targets(raw_labels, args.input) if regression else encode(raw_labels, names, args.input)
    if cfg.train.loss == "bce_with_logits":  # one logit per sample: float 0/1 targets, as the run trained on
        y = y.float().reshape(len(y), -1)
    return Split(x, y), args.input, raw_labels

"""`launch plot RUN_DIR [RUN_DIR ...]`: loss and accuracy curves, several runs overlaid.

`line_plot` is the reusable part (launch bench draws with it too): series in, PNG out.
matplotlib is an optional extra, imported lazily with the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from launch.errors import UserError
from launch.observe.logger import read_metrics

# series: label -> (xs, ys) or (xs, ys, matplotlib line kwargs)
Series = dict


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib (or the [plot] extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(
    series: Series, path, *, title: str = "", xlabel: str = "", ylabel: str = "",
    logx: bool = False, logy: bool = False, panels: Optional[Sequence[dict]] = None,
) -> Path:
    """Draw labelled lines and save a PNG. With `panels` (a list of dicts with keys series, title,
    xlabel, ylabel, logx, logy, integer_x) draw those side by side instead of the single panel."""
    plt = _pyplot()
    panels = list(panels) if panels else [dict(series=series, title=title, xlabel=xlabel, ylabel=ylabel, logx=logx, logy=logy)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, p in zip(axes[0], panels):
        for label, line in p["series"].items():
            xs, ys, style = (*line, {}) if len(line) == 2 else line
            ax.plot(xs, ys, label=label, **{"marker": "o", "markersize": 3, **style})
        ax.set_title(p.get("title", ""))
        ax.set_xlabel(p.get("xlabel", ""))
        ax.set_ylabel(p.get("ylabel", ""))
        if p.get("logx"):
            ax.set_xscale("log")
        if p.get("logy"):
            ax.set_yscale("log")
        if p.get("integer_x"):
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if p["series"]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def epoch_records(run_dir) -> list[dict]:
    """The per-epoch records of a run (step-level records from log.every_steps are left out)."""
    if not (Path(run_dir) / "metrics.jsonl").is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (not a run directory, or the run has not finished an epoch)")
    records = [r for r in read_metrics(Path(run_dir)) if "eval_loss" in r]
    if not records:
        raise UserError(f"{run_dir}/metrics.jsonl: no epoch records yet")
    return records


def plot_runs(run_dirs: Sequence[str], path, labels: Optional[Sequence[str]] = None) -> Path:
    """Train (solid) and eval (dashed) loss, and eval accuracy where runs report one (classification
    losses), against epoch; one colour per run. The loss axis names the runs' train.loss."""
    labels = list(labels) if labels else [Path(r).name or str(r) for r in run_dirs]
    if len(labels) != len(run_dirs):
        raise UserError(f"--labels: {len(labels)} labels for {len(run_dirs)} runs")
    if len(set(labels)) < len(labels):
        labels = [str(r) for r in run_dirs]  # same directory names: tell them apart by path
    loss, acc, losses = {}, {}, set()
    for i, (run, label) in enumerate(zip(run_dirs, labels)):
        losses.add(_loss_name(run))
        recs = epoch_records(run)
        epochs = [r["epoch"] + 1 for r in recs]  # epochs completed
        colour = {"color": f"C{i}"}
        loss[f"{label} train"] = (epochs, [r["train_loss"] for r in recs], colour)
        loss[f"{label} eval"] = (epochs, [r["eval_loss"] for r in recs], {**colour, "linestyle": "--"})
        if all("eval_accuracy" in r for r in recs):
            acc[label] = (epochs, [r["eval_accuracy"] for r in recs], colour)
    panels = [dict(series=loss, title="loss", xlabel="epoch", ylabel=" / ".join(sorted(losses)), integer_x=True)]
    if acc:
        panels.append(dict(series=acc, title="eval accuracy", xlabel="epoch", ylabel="accuracy", integer_x=True))
    return line_plot({}, path, panels=panels)


def _loss_name(run_dir) -> str:
    """train.loss from the run's config.yaml (cross_entropy when it predates the setting)."""
    import yaml

    try:
        saved = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        saved = {}
    return str(saved.get("train", {}).get("loss", "cross_entropy")).rpartition(":")[2]


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with metrics.jsonl)")
    p.add_argument("-o", "--output", help="PNG to write (default: RUN_DIR/curves.png for one run, curves.png for several)")
    p.add_argument("--labels", nargs="+", help="legend labels, one per run (default: the directory names)")


def run(args) -> int:
    out = args.output or (str(Path(args.runs[0]) / "curves.png") if len(args.runs) == 1 else "curves.png")
    path = plot_runs(args.runs, out, args.labels)
    print(f"wrote {path}")
    return 0

"""MNIST from the four standard IDX files in a local directory (raw or .gz); nothing is downloaded.

As in the seeds' MNIST example: pixels scaled to [0, 1], normalised with mean 0.1307 and std
0.3081, images flattened to 784 features (for SimpleNet, i.e. model.hidden=[128]). The transform
is recorded in DataBundle.state, so predict applies it to raw 0-255 pixels the same way.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from launch.data.tabular import apply_transform
from launch.data.types import DataBundle, Split
from launch.errors import UserError

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "eval": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MEAN, STD = 0.1307, 0.3081
STATE = {"kind": "mnist", "scale": 1 / 255, "mean": MEAN, "std": STD, "class_names": [str(i) for i in range(10)]}


def find(directory: Path, name: str):
    """NAME or NAME.gz in the directory itself or in torchvision's layout (MNIST/raw)."""
    for folder in (directory, directory / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array: magic 0x0000 0x08 <ndim>, big-endian int32 sizes, then the data."""
    try:
        with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read MNIST file {path}: {e}") from None
    if len(raw) < 4 + 4 * ndim or raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise UserError(f"{path}: not an unsigned-byte IDX file with {ndim} dimension(s) (bad magic number)")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise UserError(f"{path}: header says {'x'.join(map(str, dims))} bytes of data but the file holds {len(body)} (truncated?)")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_split(directory: Path, split: str) -> Split:
    images_name, labels_name = FILES[split]
    images, labels = read_idx(find(directory, images_name), 3), read_idx(find(directory, labels_name), 1)
    if len(images) != len(labels):
        raise UserError(f"{directory}: {images_name} holds {len(images)} images but {labels_name} {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise UserError(f"{directory}/{labels_name}: labels must be 0-9, found {labels.max()}")
    x = apply_transform(torch.from_numpy(images.copy()).reshape(len(images), -1), STATE)
    return Split(x, torch.from_numpy(labels.astype(np.int64)))


def build(cfg) -> DataBundle:
    directory = Path(cfg.data.path)
    missing = [n for pair in FILES.values() for n in pair if find(directory, n) is None]
    if missing:
        expected = ", ".join(n for pair in FILES.values() for n in pair)
        raise UserError(
            f"data.path={directory}: MNIST files missing ({', '.join(missing)}); expected {expected} "
            "(each raw or .gz) in that directory; nothing is downloaded"
        )
    train, ev = load_split(directory, "train"), load_split(directory, "eval")
    return DataBundle(train, ev, int(train.x.shape[1]), 10, dict(STATE))

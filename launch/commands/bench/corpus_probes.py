"""The corpus section's per-rank programs: each runs as its own process (k of them at once for k ranks,
as DDP ranks would), reads one epoch of its share and prints one JSON line: rows, seconds, bytes read
(/proc/self/io rchar: what the process read from files, page cache or disk) and peak RSS. Ours also
reports the bytes it decoded (compressed column chunks) and how long its index took."""

from __future__ import annotations

_COMMON = r"""
import json, os, resource, sys, time
def rchar():
    try:
        return int(next(l for l in open("/proc/self/io") if l.startswith("rchar")).split()[1])
    except (OSError, StopIteration):
        return 0
def report(**kw):
    # VmHWM, not ru_maxrss: a process started by fork and exec keeps its parent's ru_maxrss
    try:
        kw["peak_rss_mb"] = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
    except (OSError, StopIteration):
        kw["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(kw), flush=True)
args = json.loads(sys.argv[1])
rank, k, batch = args["rank"], args["k"], args["batch"]
"""

OURS = _COMMON + r"""
import contextlib, io, torch
from launch import config
from launch.data.build import build_data
from launch.data.feeder import make_feeder
cfg = config.load(None, ["data.name=parquet", f"data.path={args['path']}", f"data.val_path={args['val']}", "data.target=label",
                         f"data.batch_size={batch}", f"data.shuffle_window={args['window']}", "data.standardize=false",
                         f"data.num_workers={args.get('workers', 0)}", "train.device=cpu"])
t0 = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    data = build_data(cfg)
index_s = time.perf_counter() - t0
feeder = make_feeder(data.train, cfg, torch.device("cpu"), rank, k, batch)
io0, t0, rows = rchar(), time.perf_counter(), 0
for step in feeder.epoch_steps(0, 0, 0, 1):
    for x, y, n in step.batches:
        rows += n
report(rows=rows, seconds=time.perf_counter() - t0, read_bytes=rchar() - io0, decoded_bytes=feeder.decoded_bytes, index_s=index_s)
"""

HF = _COMMON + r"""
import contextlib, io, glob
from datasets import load_dataset
from datasets.distributed import split_dataset_by_node
import datasets
datasets.disable_progress_bars()
files = sorted(glob.glob(os.path.join(args["path"], "*.parquet")))
io0, t0, rows = rchar(), time.perf_counter(), 0
with contextlib.redirect_stderr(io.StringIO()):
    ds = load_dataset("parquet", data_files=files, split="train", streaming=True)
    ds = split_dataset_by_node(ds, rank=rank, world_size=k).with_format("torch")
    for b in ds.iter(batch_size=batch):
        rows += len(b["label"])
report(rows=rows, seconds=time.perf_counter() - t0, read_bytes=rchar() - io0)
"""

# mosaicml-streaming imports torchvision for its vision datasets; PyPI's torchvision does not load next to
# the CPU torch. transformers is imported first (it then takes torchvision as absent), then a stand-in.
_STREAMING = r"""
import types
import transformers.feature_extraction_utils, transformers.tokenization_utils_base
tv, ds_, tr, fn = (types.ModuleType(n) for n in ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional"))
ds_.VisionDataset, ds_.CIFAR10, fn.to_tensor = type("VisionDataset", (), {}), None, (lambda x: x)
tv.datasets, tv.transforms, tr.functional = ds_, tr, fn
sys.modules.update({"torchvision": tv, "torchvision.datasets": ds_, "torchvision.transforms": tr, "torchvision.transforms.functional": fn})
"""

MOSAIC_WRITE = _COMMON + _STREAMING + r"""
import glob, numpy as np, pyarrow.parquet as pq
from streaming import MDSWriter
t0 = time.perf_counter()
width = None
with MDSWriter(out=args["mds"], columns={"x": "ndarray:float32", "label": "int64"}, size_limit=1 << 26) as out:
    for f in sorted(glob.glob(os.path.join(args["path"], "*.parquet"))):
        for b in pq.ParquetFile(f).iter_batches(batch_size=65536):
            x = np.asarray(b.column("x").flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(b.num_rows, -1)
            for xi, yi in zip(x, b.column("label").to_numpy()):
                out.write({"x": xi, "label": int(yi)})
report(rows=0, seconds=time.perf_counter() - t0, read_bytes=0)
"""

MOSAIC = _COMMON + _STREAMING + r"""
os.environ.update(RANK=str(rank), WORLD_SIZE=str(k), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(k), NODE_RANK="0",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args["port"]))  # it starts a process group of its own
import torch
from streaming import StreamingDataset
ds = StreamingDataset(local=args["mds"], shuffle=True, shuffle_seed=0, batch_size=batch)
io0, t0, rows = rchar(), time.perf_counter(), 0
for b in torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=0):
    rows += len(b["label"])
report(rows=rows, seconds=time.perf_counter() - t0, read_bytes=rchar() - io0)
"""

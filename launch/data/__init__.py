"""Data: what a dataset hands the loop (`types`), the order every rank sees it in (`order`),
feeding batches to the device (`feeder`), and the datasets (`synthetic`, `tabular`, `mnist`,
`custom`, and the on-disk corpora of `corpus`), chosen by `build`."""

# data.name -> 'module:function(cfg) -> DataBundle' (launch.data.build). Plain strings: the settings
# check the names without importing torch.
SOURCES = {
    "toy": "launch.data.synthetic:build_toy",  # the seeds' 5+2 points
    "synthetic": "launch.data.synthetic:build",  # a learnable task generated in memory
    "csv": "launch.data.tabular:build_csv",
    "npz": "launch.data.tabular:build_npz",
    "mnist": "launch.data.mnist:build",  # the IDX files
    "tokens": "launch.data.tokens:build",  # a token file as nanoGPT writes it (memory-mapped)
    "parquet": "launch.data.corpus:build_parquet",  # corpora: rows or text, read by row group (launch.data.corpus)
    "jsonl": "launch.data.corpus:build_jsonl",
    "hf": "launch.data.corpus:build_hf",  # a datasets.save_to_disk directory or Arrow files
    "sft": "launch.data.sft:build",  # prompt/response or chat rows, tokenized with a chat template (fine-tuning)
}

NEEDS_PATH = {"csv", "npz", "mnist", "tokens", "parquet", "jsonl", "hf", "sft"}  # sources that read data.path

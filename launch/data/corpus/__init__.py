"""Corpora on disk: Parquet, JSONL and Hugging Face `datasets` directories (Arrow), larger than memory.

The corpus is never loaded whole and never read k times. `files` and `index` address every row
through metadata only (Parquet footers, Arrow batch headers, JSONL line offsets built once and
cached); `order` defines one epoch order per (seed, epoch, corpus, global micro-batch) that deals a
rank a contiguous run of each block, so a rank decodes (`read`) only the units its samples come from;
`rows` and `text` make rows into features and targets or documents into token windows; `split` and
`feeder` fit it all to the loop's Feeder interface. See docs/data.md, "Corpora".
"""


def build_parquet(cfg):
    from launch.data.corpus.build import build

    return build(cfg, "parquet")


def build_jsonl(cfg):
    from launch.data.corpus.build import build

    return build(cfg, "jsonl")


def build_hf(cfg):
    from launch.data.corpus.build import build

    return build(cfg, "hf")

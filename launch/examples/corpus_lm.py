"""A text corpus in Parquet shards and its tokenizer, generated here (nothing is downloaded), for the
corpus recipe: configs/parquet_lm.yaml trains TinyGPT (launch.examples.sums_lm) on it.

    python -m launch.examples.corpus_lm data/corpus      # train/ (6 shards), val/, tokenizer/
    python train_single.py --config configs/parquet_lm.yaml

Each document is a few sums, one token per character: "4 7 + 8 5 = 1 3 2 ; 3 + 9 = 1 2 ;". The
tokenizer is a word-level one over those 13 symbols plus <eos> (documents are joined with it) and
<unk>, saved with transformers' save_pretrained as any Hugging Face tokenizer is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SYMBOLS = list("0123456789+=;")
SHARD_DOCS = (173, 0, 311, 97, 240, 151)  # uneven, one shard empty: none divides a batch
VAL_DOCS = 120


def document(rng: np.random.Generator) -> str:
    sums = []
    for _ in range(int(rng.integers(1, 6))):
        a, b = (int(v) for v in rng.integers(0, 100, size=2))
        sums.append(" ".join(f"{a}+{b}={a + b};"))
    return " ".join(sums)


def save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate([*SYMBOLS, "<eos>", "<unk>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(str(directory))


def write_corpus(directory: str, seed: int = 0, row_group_docs: int = 32) -> Path:
    """directory/train/part-*.parquet, directory/val/part-0.parquet and directory/tokenizer/."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(directory)
    rng = np.random.default_rng(seed)
    for split, counts in (("train", SHARD_DOCS), ("val", (VAL_DOCS,))):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i, n in enumerate(counts):
            docs = [document(rng) for _ in range(n)]
            table = pa.table({"id": pa.array(range(n), pa.int64()), "text": pa.array(docs, pa.string())})
            pq.write_table(table, root / split / f"part-{i:03d}.parquet", row_group_size=row_group_docs)
    save_tokenizer(root / "tokenizer")
    return root


if __name__ == "__main__":
    print(f"wrote {write_corpus(sys.argv[1] if len(sys.argv) > 1 else 'data/corpus')}")

"""A tiny pretrained-style base model and chat data, made offline, for configs/lora_sft.yaml and the tests.

Nothing may be downloaded here, so this writes what a user already has on disk: a Hugging Face
checkpoint directory (a Llama-architecture model from `LlamaConfig`, random weights, `save_pretrained`
as safetensors) with its tokenizer beside it (a word-level `tokenizers` vocabulary wrapped in
PreTrainedTokenizerFast, with a chat template whose assistant turns carry {% generation %} marks),
and prompt/response rows as JSONL (questions about capitals and opposites).

    python -m launch.examples.finetune_base data/finetune     # -> base/, train.jsonl, val.jsonl (8 of its rows), chat.jsonl
    python train_single.py --config configs/lora_sft.yaml
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CAPITALS = {"france": "paris", "spain": "madrid", "italy": "rome", "germany": "berlin", "japan": "tokyo", "egypt": "cairo",
            "peru": "lima", "chile": "santiago", "kenya": "nairobi", "norway": "oslo", "greece": "athens", "cuba": "havana",
            "canada": "ottawa", "china": "beijing", "india": "delhi", "russia": "moscow", "poland": "warsaw", "ireland": "dublin",
            "austria": "vienna", "portugal": "lisbon", "sweden": "stockholm", "finland": "helsinki", "turkey": "ankara", "iran": "tehran"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark", "old": "new", "early": "late",
             "open": "closed", "full": "empty", "high": "low", "hard": "soft", "rich": "poor", "loud": "quiet", "wet": "dry"}
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
MARKED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {% generation %}{{ m['content'] }} </s>{% endgeneration %} "
          "{% else %}<|{{ m['role'] }}|> {{ m['content'] }} {% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def rows(seed: int = 0) -> list[dict]:
    """Every question once: 'what is the capital of france ?' -> 'paris .', 'what is the opposite of hot ?' -> 'cold .'."""
    out = [{"prompt": f"what is the capital of {k} ?", "response": f"{v} ."} for k, v in CAPITALS.items()]
    out += [{"prompt": f"what is the opposite of {k} ?", "response": f"{v} ."} for k, v in OPPOSITES.items()]
    random.Random(seed).shuffle(out)
    return out


def chat_rows() -> list[dict]:
    """Multi-turn rows ('messages'), two questions a conversation."""
    qa = [(f"what is the capital of {k} ?", f"{v} .") for k, v in CAPITALS.items()]
    return [{"messages": [{"role": "system", "content": "answer in one word"}, {"role": "user", "content": a[0]}, {"role": "assistant", "content": a[1]},
                          {"role": "user", "content": b[0]}, {"role": "assistant", "content": b[1]}]} for a, b in zip(qa[::2], qa[1::2])]


def vocabulary() -> list[str]:
    words = set("what is the capital of opposite answer in one word ? .".split()) | set(CAPITALS) | set(CAPITALS.values()) | set(OPPOSITES) | set(OPPOSITES.values())
    return SPECIAL + sorted(words)


def tokenizer(template: str = "marked"):
    """A word-level tokenizer of the rows' words; template 'marked' ({% generation %}), 'plain' (the
    same template without the marks) or 'none'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if template != "none":
        fast.chat_template = MARKED if template == "marked" else MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    return fast


def make_base(out: str | Path, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 0,
              dtype: str = "float32", tie: bool = False, template: str = "marked", seed: int = 0, init: float = 0.02) -> Path:
    """Write a Llama-architecture checkpoint directory with its tokenizer; `vocab` > the tokenizer's pads the
    embedding; `init` is the weights' standard deviation (transformers' initializer_range)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tok = tokenizer(template)
    config = LlamaConfig(vocab_size=max(vocab, len(tok)), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128, tie_word_embeddings=tie,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=init)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="directory to write base/, train.jsonl, val.jsonl and chat.jsonl into")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging

    logging.disable_progress_bar()
    # weights of std 0.3, not transformers' 0.02: a random base with a frozen output layer that small caps the
    # logits near uniform (about +-1.3), and the demo's adapters could not make it answer
    make_base(out / "base", hidden=args.hidden, layers=args.layers, init=0.3)
    everything = rows()
    write_jsonl(out / "train.jsonl", everything)
    write_jsonl(out / "val.jsonl", everything[:8])
    write_jsonl(out / "chat.jsonl", chat_rows())
    print(f"wrote {out / 'base'} (a tiny Llama and its tokenizer), {out / 'train.jsonl'} ({len(everything)} rows), {out / 'val.jsonl'}, {out / 'chat.jsonl'}")


if __name__ == "__main__":
    main()

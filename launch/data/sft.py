"""data.name=sft: prompt/response or chat rows for supervised fine-tuning, scored on the assistant's tokens.

A row is `{"prompt": ..., "response": ...}` (an optional "system" too) or `{"messages": [{"role",
"content"}, ...]}`, read from JSONL, JSON (a list of rows) or Parquet files, `data.path` a glob
(launch.data.rows). Rows are tokenized once, at start-up, with the tokenizer in `data.tokenizer`
(default: model.pretrained's):
- with a chat template: prompt/response become a user and an assistant message; the assistant's
  tokens are the template's generation mask (`apply_chat_template(..., return_assistant_tokens_mask=True)`)
  when the template marks them with {% generation %}, else the characters each assistant turn adds
  to the rendered conversation (rendered up to the turn with the generation prompt, and with it);
  a template that renders earlier turns differently once later ones follow is one line;
- without one: the prompt's tokens, then the response's and the end-of-sequence token, which are
  the ones scored; `messages` rows need a template (one line otherwise).
A row longer than data.max_length is cut at its end (counted at start-up); a row left without a
scored token is left out (counted too). An item is {"input_ids", "target"}: the tokens but the last,
and the next token wherever it is the assistant's (-100 elsewhere), so the launcher's cross_entropy
on the model's logits is the assistant-token loss, token-weighted over the global batch as for any
sequence. Batches are padded to their longest row (`collate`: pad tokens, attention_mask 0,
targets -100), so padding never counts. Rows are not packed: one row per sequence.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from launch.data.rows import read_rows
from launch.data.types import DataBundle, Split
from launch.errors import UserError

IGNORE = -100
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")


class SFTRows(Dataset):
    """Tokenized rows, stored flat (int32 tokens, a bool mask of scored tokens, row offsets)."""

    needs_sample_seeds = False  # loading a row draws no random numbers (launch.data.seeding)

    def __init__(self, rows: list[tuple[list[int], list[bool]]], pad_id: int):
        lengths = np.array([len(ids) for ids, _ in rows], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.tokens = np.fromiter((t for ids, _ in rows for t in ids), dtype=np.int32, count=int(lengths.sum()))  # 4 bytes a token
        self.scored = np.fromiter((m for _, mask in rows for m in mask), dtype=bool, count=int(lengths.sum()))
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        a, b = self.offsets[i], self.offsets[i + 1]
        ids = torch.from_numpy(self.tokens[a:b]).long()
        target = torch.where(torch.from_numpy(self.scored[a + 1 : b]), ids[1:], IGNORE)
        return {"input_ids": ids[:-1], "target": target}

    def target_tokens(self) -> int:
        starts = self.offsets[:-1]
        return int(self.scored.sum() - self.scored[starts].sum())  # a row's first token is never a target

    def collate(self, items: list[dict]) -> dict:
        """Pad to the batch's longest row: pad tokens the model does not attend to, targets that do not count."""
        n = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        target = torch.full((len(items), n), IGNORE, dtype=torch.long)
        for r, it in enumerate(items):
            k = len(it["input_ids"])
            ids[r, :k], mask[r, :k], target[r, :k] = it["input_ids"], 1, it["target"]
        return {"input_ids": ids, "attention_mask": mask, "target": target}


def load_tokenizer(path: str, where: str):
    if not Path(path).is_dir():
        what = "a local Hugging Face checkpoint directory" if where == "model.pretrained" else "a directory with a Hugging Face tokenizer: tokenizer.json, tokenizer_config.json"
        raise UserError(f"{where}={path}: no such directory ({what})")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError("data.name=sft needs transformers: pip install -e '.[hf]'") from None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # OSError, ValueError: a directory without a tokenizer in it
        raise UserError(f"{where}={path}: no tokenizer could be loaded from it ({' '.join(str(e).split())[:160]})") from None


class Encoder:
    """A row -> (token ids, scored mask), the assistant's tokens scored."""

    def __init__(self, tokenizer, where: str):
        self.tok, self.where = tokenizer, where
        self.template = getattr(tokenizer, "chat_template", None)
        self.marked = bool(self.template and _GENERATION.search(self.template if isinstance(self.template, str) else json.dumps(self.template)))
        self.how = ("its chat template's {% generation %} marks" if self.marked else "its chat template, turn by turn") if self.template else "no chat template: prompt, then response + end of sequence"

    def __call__(self, row: dict, at: str) -> tuple[list[int], list[bool]]:
        return self.many([(row, at)])[0]

    def many(self, rows: list[tuple[dict, str]], chunk: int = 512) -> list[tuple[list[int], list[bool]]]:
        """Rows -> (token ids, scored mask), the tokenizer called once per chunk of rows (its Python
        overhead per call is most of a short row's cost)."""
        out: list = []
        for i in range(0, len(rows), chunk):
            part = rows[i : i + chunk]
            try:
                out += self._chunk(part)
            except UserError:
                raise
            except Exception as e:  # the template's own checks (roles that must alternate...): find the row
                if len(part) > 1:
                    for one in part:
                        self._chunk([one])
                raise UserError(f"{part[-1][1]}: the tokenizer's chat template fails on this row ({' '.join(str(e).split())[:160]})") from None
        return out

    def _chunk(self, part: list) -> list:
        if not self.template:
            return self._plain(part)
        if self.marked:
            enc = self.tok.apply_chat_template([self._messages(r, at) for r, at in part], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            return [(list(ids), [bool(m) for m in mask]) for ids, mask in zip(enc["input_ids"], enc["assistant_masks"])]
        texts, spans = zip(*(self._turns(self._messages(r, at), at) for r, at in part))
        enc = self.tok(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        return [(list(ids), [any(a <= s < b for a, b in sp) for s, _ in offsets]) for ids, offsets, sp in zip(enc["input_ids"], enc["offset_mapping"], spans)]

    def _messages(self, row: dict, at: str) -> list[dict]:
        if "messages" in row:
            return row["messages"]
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return [*system, {"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]

    def _plain(self, part: list) -> list:
        """No template: the prompt's tokens, then the response's and the end of sequence, scored."""
        for row, at in part:
            if "messages" in row:
                raise UserError(f"{at}: a 'messages' row needs a tokenizer with a chat template; {self.where} has none (use prompt/response rows, or a tokenizer with one)")
        prompts = self.tok([r["prompt"] for r, _ in part])["input_ids"]
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        responses = [[*r, *eos] for r in self.tok([r["response"] for r, _ in part], add_special_tokens=False)["input_ids"]]
        return [([*p, *r], [False] * len(p) + [True] * len(r)) for p, r in zip(prompts, responses)]

    def _turns(self, messages: list[dict], at: str) -> tuple[str, list]:
        """The rendered conversation and the character span each assistant turn adds to it."""
        render = lambda msgs, gen=False: self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) if msgs else ""  # noqa: E731
        text, spans = render(messages), []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                before, upto = render(messages[:i], True), render(messages[: i + 1])
                if not (upto.startswith(before) and text.startswith(upto)):
                    raise UserError(f"{at}: the tokenizer's chat template renders a turn differently once later turns follow, so the assistant's tokens cannot be told apart; give it {{% generation %}} marks")
                spans.append((len(before), len(upto)))
        return text, spans


def _max_length(cfg, tokenizer) -> int:
    if cfg.data.max_length:
        return cfg.data.max_length
    config = Path(cfg.model.pretrained) / "config.json" if cfg.model.pretrained else None
    if config is not None and config.is_file():
        found = json.loads(config.read_text()).get("max_position_embeddings")
        if isinstance(found, int) and found > 0:
            return found
    limit = getattr(tokenizer, "model_max_length", 0) or 0
    return int(limit) if 0 < limit < 10**7 else 0


def encode(encoder: Encoder, rows: list[tuple[dict, str]], max_length: int) -> tuple[list, int, int]:
    """(the rows that keep a scored token, how many were cut to max_length, how many were left out)."""
    kept, cut, dropped = [], 0, 0
    for ids, mask in encoder.many(rows):
        if max_length and len(ids) > max_length:
            ids, mask, cut = ids[:max_length], mask[:max_length], cut + 1
        if not any(mask[1:]):
            dropped += 1
            continue
        kept.append((ids, mask))
    return kept, cut, dropped


def build(cfg) -> DataBundle:
    d = cfg.data
    where = "data.tokenizer" if d.tokenizer else "model.pretrained"
    tokenizer = load_tokenizer(d.tokenizer or cfg.model.pretrained, where)
    encoder = Encoder(tokenizer, f"{where}={d.tokenizer or cfg.model.pretrained}")
    rows = read_rows(d.path, "data.path")
    if d.val_path:
        train_rows, eval_rows = rows, read_rows(d.val_path, "data.val_path")
    else:
        if d.val_fraction == 0:
            raise UserError("data.val_fraction: 0 leaves no evaluation set; give data.val_path or a fraction > 0")
        order = np.random.default_rng(d.seed).permutation(len(rows))
        n_eval = max(1, int(round(len(rows) * d.val_fraction)))
        eval_rows, train_rows = [rows[i] for i in sorted(order[:n_eval])], [rows[i] for i in sorted(order[n_eval:])]
    max_length = _max_length(cfg, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    splits, notes = [], []
    for name, part in (("training", train_rows), ("evaluation", eval_rows)):
        kept, cut, dropped = encode(encoder, part, max_length)
        if not kept:
            raise UserError(f"data.name=sft: no {name} row keeps a response token within data.max_length={max_length}")
        splits.append(SFTRows(kept, pad))
        if cut or dropped:
            notes.append(f"data.name=sft: {cut} of the {len(part)} {name} rows were cut to data.max_length={max_length} tokens (the end of their response), "
                         f"{dropped} left out (no response token within it)")
    train, ev = splits
    notes.insert(0, f"data.name=sft: {len(train):,} training rows ({train.target_tokens():,} target tokens) and {len(ev):,} evaluation rows, "
                    f"tokenized with {encoder.how}, at most {max_length or 'any number of'} tokens a row")
    state = {"kind": "sft", "tokenizer": d.tokenizer or cfg.model.pretrained, "max_length": max_length, "template": bool(encoder.template)}
    return DataBundle(Split(dataset=train), Split(dataset=ev), 0, None, state, notes)

"""Issue 23 (and issue 22 #8, #13): what goes into fine-tuning, checked in this process. The assistant's
tokens (a template's generation marks, each turn's characters, no template), padding that never counts,
rows cut to data.max_length, init_from, LoRA targets, Hugging Face labels, labels shifted twice, a
parameter replaced behind the optimizer's back, and bad input: one line each, nothing written."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

pytest.importorskip("transformers")
pytest.importorskip("peft")

from launch import config  # noqa: E402
from launch.data import sft  # noqa: E402
from launch.errors import UserError  # noqa: E402
from launch.examples import finetune_base as fb  # noqa: E402
from tests.jobs import one_thread  # noqa: E402
from tests.helpers import PY, output, run  # noqa: E402
from tests.user_code import Tokens  # noqa: E402
from tests.user_models import HFLabels  # noqa: E402

ROW = {"prompt": "what is the capital of france ?", "response": "paris ."}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftin")
    from transformers.utils import logging

    logging.disable_progress_bar()
    fb.make_base(root / "base")
    fb.write_jsonl(root / "train.jsonl", fb.rows()[:10])
    return root


def sft_args(root, *extra) -> list[str]:
    return ["model.name=transformers:AutoModelForCausalLM", f"model.pretrained={root / 'base'}", "data.name=sft", f"data.path={root / 'train.jsonl'}",
            "data.val_fraction=0.3", "data.batch_size=4", "train.epochs=1", "log.progress=false", "train.device=cpu", *extra]


def train_here(run_dir, *overrides):
    """(the UserError's line or None, what was printed) of a one-process run in this process."""
    from launch.processes.dist import DistEnv, setup
    from launch.train.loop import train

    out = io.StringIO()
    try:
        cfg = config.load(None, [f"run.dir={run_dir}", *overrides])
        with contextlib.redirect_stdout(out), one_thread():
            train(cfg, setup(cfg, DistEnv("plain")))
    except UserError as e:
        assert "\n" not in str(e), str(e)
        return str(e), out.getvalue()
    return None, out.getvalue()


def encoded(template: str, row: dict):
    enc = sft.Encoder(fb.tokenizer(template), "data.tokenizer=t")
    ids, mask = enc(row, "rows.jsonl:1")
    tok = fb.tokenizer(template)
    return tok.convert_ids_to_tokens(ids), [t for t, m in zip(tok.convert_ids_to_tokens(ids), mask) if m]


def test_the_assistant_tokens_are_scored_with_and_without_generation_marks_and_without_a_template():
    tokens, scored = encoded("marked", ROW)
    assert tokens == ["<|user|>", *ROW["prompt"].split(), "<|assistant|>", "paris", ".", "</s>"] and scored == ["paris", ".", "</s>"]
    assert encoded("plain", ROW) == (tokens, scored), "each turn's characters give what the {% generation %} marks give"
    chat = fb.chat_rows()[0]
    marked, plain = encoded("marked", chat), encoded("plain", chat)
    assert marked == plain and marked[1] == [*chat["messages"][2]["content"].split(), "</s>", *chat["messages"][4]["content"].split(), "</s>"]
    tokens, scored = encoded("none", ROW)
    assert tokens == [*ROW["prompt"].split(), "paris", ".", "</s>"] and scored == ["paris", ".", "</s>"]
    with pytest.raises(UserError, match=r"rows.jsonl:1: a 'messages' row needs a tokenizer with a chat template; data.tokenizer=t has none"):
        encoded("none", chat)


def test_batches_pad_to_their_longest_row_and_padding_never_counts(base):
    """A row's loss is the same alone and in a padded batch; targets are the next token where it is the assistant's."""
    from transformers import AutoModelForCausalLM

    from launch.train.task import Task

    enc = sft.Encoder(fb.tokenizer("marked"), "t")
    rows = sft.SFTRows([enc(r, "x") for r in [ROW, fb.chat_rows()[0], {"prompt": "what is the opposite of hot ?", "response": "cold ."}]], pad_id=0)
    item = rows[0]
    assert item["target"].tolist()[-3:] == fb.tokenizer().convert_tokens_to_ids(["paris", ".", "</s>"]) and (item["target"][:-3] == -100).all()
    batch = rows.collate([rows[i] for i in range(3)])
    assert batch["input_ids"].shape[1] == max(len(rows[i]["input_ids"]) for i in range(3)) and (batch["attention_mask"].sum(1) < batch["input_ids"].shape[1]).any()
    cfg = config.load(None, sft_args(base))
    model = AutoModelForCausalLM.from_pretrained(base / "base").eval()
    task = Task(cfg, model)
    with torch.no_grad():
        together = task.eval_sums(model, {k: v for k, v in batch.items() if k != "target"}, batch["target"])[0]
        alone = [task.eval_sums(model, {"input_ids": rows[i]["input_ids"][None]}, rows[i]["target"][None])[0] for i in range(3)]
    assert float(together[1]) == sum(float(a[1]) for a in alone) == rows.target_tokens()
    assert float(together[0]) == pytest.approx(sum(float(a[0]) for a in alone), abs=1e-5)


def test_rows_longer_than_max_length_are_cut_and_counted(base, tmp_path):
    long = {"prompt": "what is the capital of " + "france " * 30 + "?", "response": "paris ."}
    fb.write_jsonl(tmp_path / "rows.jsonl", [*fb.rows()[:6], long, {"prompt": ROW["prompt"], "response": "paris . " * 8}])
    cfg = config.load(None, sft_args(base, f"data.path={tmp_path / 'rows.jsonl'}", f"data.val_path={base / 'train.jsonl'}", "data.max_length=16"))
    bundle = sft.build(cfg)
    assert "2 of the 8 training rows were cut to data.max_length=16 tokens (the end of their response), 1 left out (no response token within it)" in " ".join(bundle.notes)
    assert len(bundle.train.dataset) == 7 and max(len(bundle.train.dataset[i]["input_ids"]) for i in range(7)) == 15


def test_rows_come_from_jsonl_json_and_parquet_through_a_glob(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    from launch.data.rows import read_rows

    fb.write_jsonl(tmp_path / "a.jsonl", fb.rows()[:2])
    (tmp_path / "b.json").write_text(json.dumps(fb.chat_rows()[:2]))
    pq.write_table(pa.Table.from_pylist(fb.rows()[2:5]), tmp_path / "c.parquet")
    rows = read_rows(str(tmp_path / "*"), "data.path")
    assert [at.rpartition("/")[2] for _, at in rows] == ["a.jsonl:1", "a.jsonl:2", "b.json row 1", "b.json row 2", "c.parquet row 1", "c.parquet row 2", "c.parquet row 3"]
    assert rows[2][0] == fb.chat_rows()[0] and rows[4][0] == fb.rows()[2]


class Shifted(Dataset):
    """Token sequences whose targets are already the inputs shifted by one."""

    def __init__(self, split: str):
        self.data = Tokens(split, n=12)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {"input_ids": x, "target": y}


class HFDicts(HFLabels):
    """Hugging Face's style: {"input_ids", "labels"}, the labels unshifted, no 'target' key."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return {"input_ids": x, "labels": y}


def test_hugging_face_labels_need_no_target_key_and_labels_shifted_twice_are_refused(base, tmp_path):
    hf = ["model.name=tests.user_models:MappingLM", "model.kwargs={config: {_target_: tests.user_models:LMConfig}}", "train.epochs=1",
          "log.progress=false", "train.device=cpu", "data.batch_size=8"]
    own = ["model.loss_arg=labels", "model.loss_reduction=mean_shifted"]
    assert train_here(tmp_path / "a", *hf, *own, "data.name=tests.test_finetune_input:HFDicts")[0] is None  # issue 22 #13
    error, _ = train_here(tmp_path / "b", *hf, "data.name=tests.test_finetune_input:HFDicts")
    assert "the targets equal the inputs at every counted position (unshifted labels?)" in error and "model.loss_arg=labels" in error
    error, _ = train_here(tmp_path / "c", *hf, *own, "data.name=tests.test_finetune_input:Shifted")  # issue 22 #8
    assert "the targets are already the inputs shifted by one" in error and "predict two tokens ahead" in error
    error, _ = train_here(tmp_path / "d", *sft_args(base), *own)  # the sft source's targets are shifted: for the launcher's loss
    assert "the targets are already the inputs shifted by one" in error
    assert not any((tmp_path / d).exists() for d in "bcd")


class Replacer(nn.Module):
    """Replaces its head's weight at its first training forward (as some transformers models do)."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(16, 16), nn.Linear(16, 2)
        self.replaced = False

    def forward(self, x):
        if self.training and not self.replaced:
            self.head.weight = nn.Parameter(self.head.weight.detach().clone())
            self.replaced = True
        return self.head(torch.relu(self.body(x)))


def test_a_parameter_replaced_after_the_optimizer_was_built_is_named(tmp_path):
    error, _ = train_here(tmp_path, "model.name=tests.test_finetune_input:Replacer", "data.features=16", "data.n_train=64", "data.n_eval=16",
                          "train.epochs=1", "log.progress=false", "train.device=cpu")
    assert error and "1 trainable parameter(s) are not the optimizer's (head.weight)" in error and "never trained" in error


def test_init_from_and_lora_targets(base, tmp_path):
    from launch.checkpoint import store
    from launch.models.build import build_model

    state = {k: v + 1 for k, v in torch.load(_base_state(base), weights_only=True).items()}
    store.save_weights(tmp_path / "model.pt", state)
    cfg = config.load(None, sft_args(base, f"model.init_from={tmp_path / 'model.pt'}", "model.lora.r=2", "model.lora.targets=[q_proj, v_proj]"))
    said = []
    model = build_model(cfg, 0, None, say=said.append)
    inner = model.get_base_model()
    assert torch.equal(inner.model.embed_tokens.weight, state["model.embed_tokens.weight"]), "init_from loaded into the base before LoRA"
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(("q_proj.lora" in n or "v_proj.lora" in n) for n in trained) and any("on 4 modules (q_proj, v_proj)" in line for line in said)
    adapters = {k: v + 0.5 for k, v in model.state_dict().items()}
    store.save_weights(tmp_path / "adapters.pt", adapters)  # a LoRA run's model.pt: adapters only
    again = build_model(config.load(None, sft_args(base, "model.lora.r=2", "model.lora.targets=[q_proj, v_proj]", f"model.init_from={tmp_path / 'adapters.pt'}")), 0, None)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in adapters.items())
    store.save_weights(tmp_path / "other.pt", {"linear.weight": torch.zeros(2, 2), "model.norm.weight": torch.zeros(7)})
    with pytest.raises(UserError) as e:
        build_model(config.load(None, sft_args(base, f"model.init_from={tmp_path / 'other.pt'}")), 0, None)
    assert "does not fit LlamaForCausalLM (missing: model.embed_tokens.weight" in str(e.value) and "unexpected: linear.weight" in str(e.value)
    assert "shapes differ: model.norm.weight [7] in the file, [32] in the model" in str(e.value)


def _base_state(base):
    from transformers import AutoModelForCausalLM

    path = base / "state.pt"
    if not path.exists():
        torch.save(AutoModelForCausalLM.from_pretrained(base / "base").state_dict(), path)
    return path


class GRUModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(16, 16, batch_first=True), nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.rnn(x[:, None])[0][:, 0])


def bad_cases(root):
    """(overrides, the line's needle) for each mistake."""
    (root / "noconfig").mkdir(exist_ok=True)
    (root / "noweights").mkdir(exist_ok=True)
    (root / "noweights" / "config.json").write_text((root / "base" / "config.json").read_text())
    fb.write_jsonl(root / "fields.jsonl", [ROW, {"question": "x", "answer": "y"}])
    fb.write_jsonl(root / "empty.jsonl", [ROW, ROW, {"prompt": "x", "response": "  "}])
    fb.tokenizer("none").save_pretrained(root / "notemplate")
    fb.write_jsonl(root / "chat.jsonl", fb.chat_rows()[:4])
    return {
        "base without config": (sft_args(root, f"model.pretrained={root / 'noconfig'}", f"data.tokenizer={root / 'base'}"), "no config.json in it"),
        "base without weights": (sft_args(root, f"model.pretrained={root / 'noweights'}", f"data.tokenizer={root / 'base'}"), "config.json but no weight files"),
        "targets match nothing": (sft_args(root, "model.lora.r=4", "model.lora.targets=[qkv]"), "'qkv' matches no module of LlamaForCausalLM (its linear layers: q_proj, k_proj, v_proj, o_proj, gate_proj"),
        "row without fields": (sft_args(root, f"data.path={root / 'fields.jsonl'}"), f"{root / 'fields.jsonl'}:2: a row needs 'prompt' and 'response', or 'messages' (it has question, answer)"),
        "empty response": (sft_args(root, f"data.path={root / 'empty.jsonl'}"), f"{root / 'empty.jsonl'}:3: empty response"),
        "messages without a template": (sft_args(root, f"data.path={root / 'chat.jsonl'}", f"data.tokenizer={root / 'notemplate'}"), "a 'messages' row needs a tokenizer with a chat template"),
        "peft cannot wrap it": (["model.name=tests.test_finetune_input:GRUModel", "data.features=16", "model.lora.r=4", "model.lora.targets=[rnn]", "train.device=cpu"],
                                "model.lora: peft cannot put LoRA on rnn (GRU)"),
    }


@pytest.mark.parametrize("case", ["base without config", "base without weights", "targets match nothing", "row without fields", "empty response",
                                  "messages without a template", "peft cannot wrap it"])
def test_bad_input_is_one_line_and_nothing_is_written(base, tmp_path, case):
    overrides, needle = bad_cases(base)[case]
    error, _ = train_here(tmp_path / "run", *overrides)
    assert error and needle in error, error
    assert not (tmp_path / "run").exists()


def test_without_peft_lora_is_one_line_naming_the_extra(base, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    error, _ = train_here(tmp_path / "run", *sft_args(base, "model.lora.r=4"))
    assert error == "model.lora.r > 0 needs peft: pip install -e '.[peft]'"


def test_a_bad_base_from_the_command_line_is_one_line_and_exit_2(base, tmp_path):
    (tmp_path / "empty").mkdir()
    p = run([PY, "train_single.py", *sft_args(base, f"model.pretrained={tmp_path / 'empty'}", f"data.tokenizer={base / 'base'}"), f"run.dir={tmp_path / 'run'}"])
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "no config.json in it" in lines[0], output(p)
    assert not (tmp_path / "run").exists()


def test_the_recipe_runs_as_written_on_the_helpers_base(tmp_path, capsys):
    """configs/lora_sft.yaml with the base and rows launch.examples.finetune_base writes (only the paths
    moved, and fewer epochs): it trains the adapters, and the model learns its rows."""
    from launch.observe.logger import read_metrics

    fb.main([str(tmp_path)])
    assert {p.name for p in tmp_path.iterdir()} == {"base", "train.jsonl", "val.jsonl", "chat.jsonl"}
    moved = [f"model.pretrained={tmp_path / 'base'}", f"data.path={tmp_path / 'train.jsonl'}", f"data.val_path={tmp_path / 'val.jsonl'}"]
    from launch.processes.dist import DistEnv, setup
    from launch.train.loop import train

    cfg = config.load("configs/lora_sft.yaml", [*moved, f"run.dir={tmp_path / 'run'}", "train.device=cpu", "train.epochs=8"])
    with one_thread():
        train(cfg, setup(cfg, DistEnv("plain")))
    said = capsys.readouterr().out
    assert "LoRA r=16 alpha=32 on 14 modules (all-linear, not the output layer lm_head)" in said
    losses = [r["eval_loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0], losses

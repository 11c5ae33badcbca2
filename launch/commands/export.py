"""`launch export RUN_DIR|CHECKPOINT [STEP] [-o OUT | --adapter OUT | --hf OUT]`: one plain state dict
from any checkpoint, or a fine-tuned model for Hugging Face tools.

A sharded checkpoint (dist.strategy=fsdp: `checkpoints/step_XXXXXXXX.dcp/`, one file per rank) becomes
the model's whole state dict, in this process alone and without building the model: the shapes come
from the checkpoint's metadata (read by the launcher's safe reader: nothing pickled runs). A full
checkpoint gives its `model` entry. The output is what `model.pt` is: `torch.load(OUT, weights_only=True)`
and `model.load_state_dict(...)`, `launch predict OUT --config RUN/config.yaml`. The file is verified
against its manifest first, and the output gets a manifest of its own.

A run fine-tuned from model.pretrained (launch.models.finetune) is rebuilt from its config (the base
directory must still be there, with the fingerprint the checkpoint recorded) and its trained weights:
`--adapter OUT` writes a PEFT adapter directory (adapter_config.json, adapter_model.safetensors) that
`PeftModel.from_pretrained(base, OUT)` loads; `--hf OUT` a `save_pretrained` directory, LoRA merged
into the base, the tokenizer beside it, that `AutoModelForCausalLM.from_pretrained(OUT)` loads. Both are
written under a temporary name and renamed into place: an error leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

from launch.checkpoint import store
from launch.errors import UserError


def add_arguments(p) -> None:
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT", help="a run directory (its newest committed checkpoint) or a checkpoint (file or .dcp directory)")
    p.add_argument("step", nargs="?", type=int, help="with a run directory: the checkpoint of this optimizer step instead of the newest")
    p.add_argument("--output", "-o", help="the state dict to write (default: <run dir>/model.step_XXXXXXXX.pt, beside the checkpoint's run)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--adapter", metavar="OUT", help="a LoRA run: write a PEFT adapter directory (PeftModel.from_pretrained(base, OUT))")
    out.add_argument("--hf", metavar="OUT", help="a run from model.pretrained: write a save_pretrained directory, LoRA merged, the tokenizer beside it")


def resolve(source: str, step=None) -> Path:
    p = Path(source)
    if p.is_dir() and p.suffix != ".dcp":
        ckdir = store.checkpoint_dir(p)
        found = [c for c in store.committed(ckdir) if step is None or int(c.stem[5:]) == step]
        latest = store.read_latest(ckdir)
        if step is None and latest and (ckdir / latest).exists():
            return ckdir / latest
        if not found:
            raise UserError(f"{source}: no checkpoint" + (f" of step {step}" if step is not None else "") + f" in {ckdir}")
        return found[-1]
    if not p.exists():
        raise UserError(f"{source}: no such checkpoint or run directory")
    return p


def weights(path: Path) -> dict:
    """The model's plain state dict of a checkpoint: sharded (verified, read whole here) or full."""
    if path.is_dir():
        from launch.parallel import dcp

        store.verify_here(path)
        return dcp.export(path)
    return store.load(path)["model"]


def trained_model(path: Path):
    """(the run's model rebuilt on the CPU with its trained weights, its config, the checkpoint)."""
    from launch import config as config_mod
    from launch.models import finetune
    from launch.models.build import build_model, clean_state_dict

    ckpt = store.load(path)  # a .dcp directory: its state.pt
    state = weights(path) if path.is_dir() else ckpt["model"]
    if not isinstance(ckpt.get("config"), dict):
        raise store.CheckpointError(f"checkpoint {path}: holds no saved config")
    cfg = config_mod.from_dict(ckpt["config"])
    if not cfg.model.pretrained:
        raise UserError(f"{path}: not a run fine-tuned from model.pretrained (--adapter and --hf rebuild such a model; -o writes any run's state dict)")
    model = build_model(cfg, 0, None)
    finetune.check_base(ckpt, model, path)
    try:
        model.load_state_dict(clean_state_dict(state))
    except RuntimeError as e:
        raise store.CheckpointError(f"checkpoint {path}: does not fit the model of its config ({' '.join(str(e).split())[:200]})") from None
    return model.eval(), cfg, ckpt


def _write_dir(out: Path, write) -> None:
    """write(tmp) into a fresh temporary directory beside OUT, then rename it to OUT."""
    import shutil

    if out.exists():
        raise UserError(f"{out}: exists already; choose a new directory")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such directory")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_hf(path: Path, out: Path, adapter: bool) -> str:
    from launch.data.sft import load_tokenizer

    model, cfg, _ = trained_model(path)
    lora = hasattr(model, "peft_config")
    if adapter and not lora:
        raise UserError(f"--adapter: {path} is not a LoRA run (model.lora.r=0); use --hf for a full fine-tune")
    if adapter:
        _write_dir(out, lambda tmp: model.save_pretrained(tmp))
        return f"wrote {out}: a PEFT adapter (r={cfg.model.lora.r}) for {cfg.model.pretrained}, from {path}"
    tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.model.pretrained, "data.tokenizer") if (cfg.data.tokenizer or cfg.data.name == "sft" or _has_tokenizer(cfg.model.pretrained)) else None
    whole = model.merge_and_unload() if lora else model

    def write(tmp: Path) -> None:
        whole.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    _write_dir(out, write)
    return f"wrote {out}: {type(whole).__name__}{' with its LoRA merged' if lora else ''}{' and its tokenizer' if tokenizer is not None else ''}, from {path}"


def _has_tokenizer(path: str) -> bool:
    return any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))


def run(args) -> int:
    path = resolve(args.source, args.step)
    if args.adapter or args.hf:
        print(export_hf(path, Path(args.adapter or args.hf), adapter=bool(args.adapter)))
        return 0
    state = weights(path)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    out = Path(args.output) if args.output else run_dir / f"model.{path.name.split('.')[0]}.pt"
    store.save_weights(out, state)
    print(f"wrote {out} ({len(state)} tensors, {sum(t.numel() for t in state.values()):,} values) from {path}")
    return 0

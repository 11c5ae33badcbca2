"""`launch generate RUN_DIR|CHECKPOINT "prompt"`: try a fine-tuned model on a prompt.

The run's model is rebuilt with its trained weights (launch.commands.export.trained_model: the base
from model.pretrained, the checkpoint's adapters or weights), the prompt becomes a user message in
the tokenizer's chat template (with the generation prompt; plain text without a template), and the
model continues it: greedy by default, sampled with --temperature > 0 (seeded by --seed). Prints the
new text only.
"""

from __future__ import annotations

import torch

from launch.errors import UserError


def add_arguments(p) -> None:
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT", help="a run fine-tuned from model.pretrained (its newest checkpoint) or one of its checkpoints")
    p.add_argument("prompt", help="the user's message")
    p.add_argument("--step", type=int, help="the checkpoint of this optimizer step instead of the newest")
    p.add_argument("--max-new-tokens", type=int, default=64, help="at most this many tokens (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample at this temperature")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed (with --temperature > 0)")
    p.add_argument("--system", help="a system message before the prompt (chat templates only)")


def run(args) -> int:
    from launch.commands.export import resolve, trained_model
    from launch.data.sft import load_tokenizer

    if args.max_new_tokens < 1 or args.temperature < 0:
        raise UserError("--max-new-tokens must be >= 1 and --temperature >= 0")
    model, cfg, _ = trained_model(resolve(args.source, args.step))
    tok = load_tokenizer(cfg.data.tokenizer or cfg.model.pretrained, "data.tokenizer" if cfg.data.tokenizer else "model.pretrained")
    if getattr(tok, "chat_template", None):
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt)["input_ids"]
    inputs = torch.tensor([list(ids)])
    if not callable(getattr(model, "generate", None)):
        raise UserError(f"{type(model).__name__} has no generate(): launch generate is for causal language models")
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    with torch.no_grad():
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=args.max_new_tokens, do_sample=sample,
                             **({"temperature": args.temperature} if sample else {"temperature": None, "top_p": None, "top_k": None}),
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    print(tok.decode(out[0, inputs.shape[1]:], skip_special_tokens=True).strip())
    return 0

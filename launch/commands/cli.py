"""The `launch` command: tools around the two training scripts (which stay train_single.py and train_ddp.py).

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`,
imported only when used so `launch --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from launch.errors import UserError, fail

SUBCOMMANDS = {
    "doctor": ("launch.commands.doctor", "print a pasteable environment report and check it for launch problems"),
    "predict": ("launch.commands.predict", "batched inference or eval-only from a checkpoint"),
    "export": ("launch.commands.export", "one plain state dict (model.pt's format) from any checkpoint, sharded ones included; --adapter / --hf for fine-tuned models"),
    "generate": ("launch.commands.generate", "continue a prompt with a fine-tuned model (its chat template applied)"),
    "plot": ("launch.commands.plot", "plot loss and accuracy curves of one or more run directories"),
    "bench": ("launch.commands.bench", "benchmark the seeds' MLP sweep, loop overhead, peers (Lightning, Accelerate) and DDP overhead"),
    "slurm": ("launch.commands.slurm", "write or validate SLURM batch scripts"),
    "k8s": ("launch.commands.k8s", "write a Kubeflow Trainer TrainJob (Kubernetes) for torchrun pods"),
}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="launch", description="Tools for the PyTorch training launcher.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            fail(f"unknown command '{argv[0]}' (one of {', '.join(SUBCOMMANDS)})")
        parser.print_help()
        sys.exit(0 if argv else 2)
    module_name, help_text = SUBCOMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    sp = argparse.ArgumentParser(prog=f"launch {argv[0]}", description=help_text)
    module.add_arguments(sp)
    args = sp.parse_args(argv[1:])
    try:
        code = module.run(args)
    except UserError as e:
        fail(str(e), e.code)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()

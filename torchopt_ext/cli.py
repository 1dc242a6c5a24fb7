"""Command line: ``python -m torchopt_ext <command>``.

Each command lives in its own module exposing ``add_parser(subparsers)``, which registers the
sub-command and sets ``func`` on it; this file only collects them.
"""
import argparse
import importlib

# module path of each command; a command whose optional dependencies are missing is still listed
COMMANDS = {
    "bench": "torchopt_ext.bench.cli",
    "compare": "torchopt_ext.compare.cli",
    "condense": "torchopt_ext.condense.cli",
    "distill": "torchopt_ext.distill.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m torchopt_ext",
        description="torchopt_ext: implicit backprop, five-probe adaptive learning rates and dataset "
        "distillation. Run `python -m torchopt_ext COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)

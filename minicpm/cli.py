"""The ``minicpm`` command line.

Contract: each subcommand parses its flags, calls the library, prints its result to stdout and
exits 0; any error the library raises for bad input (config, checkpoint, conversion, prompt) is
printed to stderr as one ``minicpm: error: ...`` message with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, OSError)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint, convert_gguf

    src = Path(args.src)
    if src.is_file() and src.suffix == ".gguf":
        out = convert_gguf(src, args.dst, dtype=args.dtype)
    elif src.is_dir():
        shard = int(args.max_shard_size * 1024**3) if args.max_shard_size else None
        out = convert_checkpoint(src, args.dst, dtype=args.dtype, max_shard_bytes=shard)
    else:
        raise ValueError(f"{src} is neither a .gguf file nor a checkpoint directory")
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minicpm", description="Run MiniCPM-2B-128k and Llama-family checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="a .bin checkpoint to safetensors, or a GGUF file to a checkpoint directory")
    p.add_argument("src", help="checkpoint directory (pytorch_model.bin, ...) or a .gguf file")
    p.add_argument("dst", help="output directory (must not exist or be empty)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="weight dtype to write (default: the source's; float32 for GGUF)",
    )
    p.add_argument(
        "--max-shard-size",
        type=float,
        default=None,
        metavar="GiB",
        help="split safetensors into shards of at most this many GiB (default 4)",
    )
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as exc:
        print(f"minicpm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

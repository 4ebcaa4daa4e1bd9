"""The ``minicpm`` command line.

Contract: each subcommand parses its flags, calls the library, prints its result to stdout and
exits 0; any error the library raises for bad input (config, checkpoint, conversion, prompt) is
printed to stderr as one ``minicpm: error: ...`` message with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .llm import CHAT_DEFAULTS

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


def _load(args: argparse.Namespace):
    from .llm import LLM

    return LLM.from_pretrained(
        args.model,
        dtype=args.dtype,
        device=args.device,
        chat_format=args.chat_format,
        engine_config=_engine_config(args),
    )


def _engine_config(args: argparse.Namespace):
    import torch

    from .engine import EngineConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return EngineConfig.for_device(
        device,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=int(args.kv_cache_gib * 2**30) if args.kv_cache_gib is not None else None,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager or None,
        enable_prefix_caching=False if args.no_prefix_caching else None,
    )


def _sampling(args: argparse.Namespace, **extra: object):
    from .sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop or ()),
        **extra,
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    llm = _load(args)
    params = _sampling(args, ignore_eos=args.ignore_eos)
    for delta in llm.stream(args.prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    llm = _load(args)
    params = _sampling(args)
    if args.prompt is not None:
        for _ in llm.chat_stream(args.prompt, system=args.system, params=params):
            pass
        print(llm.last_completion.text)
        return 0
    history: list[dict] = []
    system = args.system
    print("minicpm chat: type a message; /reset clears the history, /exit quits.", file=sys.stderr)
    while True:
        try:
            query = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if query.strip() == "/exit":
            return 0
        if query.strip() == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        if not query.strip():
            continue
        try:
            for delta in llm.chat_stream(query, history, system, params):
                sys.stdout.write(delta)
                sys.stdout.flush()
        except ValueError as exc:  # e.g. the conversation outgrew the context: keep the session
            print(f"\nminicpm: error: {exc}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history = llm.last_history


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    import torch

    from .config import MiniCPMConfig
    from .plan import available_memory, format_plan, plan_memory
    from .weights import CheckpointError, weight_files

    if args.context <= 0:
        raise ValueError(f"--context must be a positive number of tokens, got {args.context}")
    if args.memory is not None and not (math.isfinite(args.memory) and args.memory > 0):
        raise ValueError(f"--memory must be a positive number of GiB, got {args.memory}")
    model = Path(args.model)
    if not model.exists():
        raise ValueError(f"checkpoint directory {model} does not exist")
    config = MiniCPMConfig.from_pretrained(model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")  # the loader's default
    if args.memory is not None:
        memory, source = int(args.memory * 1024**3), "given"
    else:
        memory, source = available_memory(device)
    try:
        disk = sum(f.stat().st_size for f in weight_files(model)) if model.is_dir() else None
    except CheckpointError:
        disk = None  # planning needs only config.json
    plan = plan_memory(config, args.context, memory, dtype, memory_source=source, checkpoint_bytes=disk)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="compute dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--chat-format",
        default="auto",
        choices=["auto", "chatml", "minicpm"],
        help="chat template: the checkpoint's (auto), ChatML, or MiniCPM's <用户>/<AI>",
    )
    g = p.add_argument_group("engine")
    g.add_argument(
        "--kv-cache-gib",
        type=float,
        default=None,
        help="KV cache size (default: on CPU a quarter of available memory, at most 4 GiB; on GPU what "
        "--gpu-memory-utilization leaves)",
    )
    g.add_argument("--gpu-memory-utilization", type=float, default=None, help="share of the GPU to use (default 0.9)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="requests decoded together (default 16 CPU, 64 GPU)")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens per step, i.e. the prefill chunk (default 512 CPU, 8192 GPU)",
    )
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default 64)")
    g.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks across requests")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")


def _add_sampling_flags(p: argparse.ArgumentParser, temperature: float, top_p: float, max_new: int) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 is greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=top_p, help=f"nucleus sampling mass (default {top_p})")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (default 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="HF-style penalty (default 1.0: off)")
    p.add_argument("--max-new-tokens", type=int, default=max_new, help=f"answer length limit (default {max_new})")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


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

    p = sub.add_parser("chat", help="chat with a model (one answer with --prompt, else interactive)")
    _add_model_flags(p)
    p.add_argument("--prompt", default=None, help="answer this message and exit")
    p.add_argument("--system", default=None, help="system message")
    _add_sampling_flags(p, CHAT_DEFAULTS["temperature"], CHAT_DEFAULTS["top_p"], CHAT_DEFAULTS["max_new_tokens"])
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("generate", help="raw completion of a prompt, streamed to stdout")
    _add_model_flags(p)
    p.add_argument("--prompt", required=True, help="text to complete")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating to --max-new-tokens")
    _add_sampling_flags(p, temperature=0.0, top_p=1.0, max_new=256)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("plan", help="will the weights and N tokens of KV cache fit in memory? (loads no weights)")
    p.add_argument("--model", required=True, help="checkpoint directory (only config.json is read) or a config.json")
    p.add_argument("--context", type=int, required=True, help="tokens per context (prompt + answer)")
    p.add_argument(
        "--memory",
        type=float,
        default=None,
        metavar="GiB",
        help="memory budget (default: free GPU memory x 0.9 on cuda, MemAvailable on cpu)",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32", "float16"],
        default=None,
        help="weight and KV dtype (default: bfloat16 on cuda, float32 on cpu, as the loader)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--json", action="store_true", help="print one JSON object with exact byte counts")
    p.set_defaults(func=_cmd_plan)
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

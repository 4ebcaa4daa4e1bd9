"""The ``minicpm`` command line.

Contract:

* Each subcommand parses and validates all its flags before it loads anything (a typo never
  costs a model load), calls the library, prints its result to stdout and exits 0.
* Every user mistake or bad file (a flag, a config field, a checkpoint, a prompt: a
  :class:`~minicpm.errors.UserError`, or an ``OSError`` on a file) is one ``minicpm: error: ...``
  line on stderr naming it, with exit status 2 and no traceback. Any other exception is a bug:
  it propagates, with its traceback (exit 1).
* Ctrl-C and SIGTERM (and SIGHUP) unwind cleanly: a conversion in progress leaves nothing
  behind, and the process exits 130 (SIGINT) or 128 + the signal number, without a traceback.
* ``minicpm --help`` answers at once: torch and the model code are imported only by the
  subcommands that need them.
* ``chat`` with ``--prompt`` streams one answer; without it, an interactive session with readline
  line editing and history, where Ctrl-C stops the answer being written (the part already
  written stays in the conversation) and a second Ctrl-C in a row at the prompt exits. Answers
  cut by a limit (``--max-new-tokens``, the context) end with a notice on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import UserError
from .sampling import CARD_DEFAULTS, CHAT_DEFAULTS, GENERATION_FIELDS, SEED_LIMIT, with_defaults

# Library settings -> the flag that sets them, so a library error names what the user typed.
FLAG_FOR = {
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "repetition_penalty": "--repetition-penalty",
    "seed": "--seed",
    "stop": "--stop",
    "block_size": "--block-size",
    "max_num_seqs": "--max-num-seqs",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "kv_cache_memory": "--kv-cache-gib",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "quantize": "--quantize",
    "group_size": "--group-size",
    "attention_backend": "--attention-backend",
    "kv_cache_dtype": "--kv-cache-dtype",
    "kv_cache_dir": "--kv-cache-dir",
    "kv_cache_dir_bytes": "--kv-cache-dir-gib",
    "enable_prefix_caching": "--no-prefix-caching",
}
HELP = """commands:
  /reset, /clear    forget the conversation
  /history          show the conversation so far
  /exit, /bye       quit (so do Ctrl-D, and Ctrl-C twice at the prompt)
  /help, /?         this list
Ctrl-C while an answer is being written stops it; the conversation is kept."""
log = logging.getLogger("minicpm")


class Terminated(BaseException):
    """SIGTERM or SIGHUP: unwind like Ctrl-C (cleanup runs), then exit 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


# ---------------------------------------------------------------------------------------- flags
class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors as the one-line ``minicpm: error: ...`` every other error uses."""

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)  # "--seed: must be ..."
        self.exit(2, f"minicpm: error: {message} (see '{self.prog} --help')\n")


def _number(text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _checked(kind: type, rule: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = _number(text, kind)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = rule  # argparse names the type in some messages
    return parse


POSITIVE_INT = _checked(int, "a positive integer", lambda v: v >= 1)
NON_NEGATIVE_INT = _checked(int, "an integer >= 0", lambda v: v >= 0)
POSITIVE = _checked(float, "a positive number", lambda v: v > 0)
GIB = _checked(float, "a number of GiB from 1e-6 to 1e6", lambda v: 1e-6 <= v <= 1e6)
NON_NEGATIVE = _checked(float, "a number >= 0", lambda v: v >= 0)
FRACTION = _checked(float, "in (0, 1]", lambda v: 0 < v <= 1)
PENALTY = _checked(float, "in [0.01, 100] (1 is off)", lambda v: 0.01 <= v <= 100)
SEED = _checked(int, "an integer in [0, 2**64)", lambda v: 0 <= v < SEED_LIMIT)
BLOCK_SIZE = _checked(int, "a power of two from 1 to 2048", lambda v: 1 <= v <= 2048 and v & (v - 1) == 0)


def STOP(text: str) -> str:  # noqa: N802
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def DEVICE(text: str) -> str:  # noqa: N802 - an argparse type, named like the others
    if re.fullmatch(r"cpu|cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda or cuda:N")


def _import_torch() -> Any:
    """``import torch`` with Ctrl-C, SIGTERM and SIGHUP held until it is done, then delivered: a
    signal's exception raised inside torch's import can unwind through its C++ frames and abort the
    process (SIGABRT: "terminate called after throwing an instance of 'python_error'")."""
    if "torch" in sys.modules or threading.current_thread() is not threading.main_thread():
        import torch

        return torch
    held: list[int] = []
    signums = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous = {n: signal.signal(n, lambda signum, frame: held.append(signum)) for n in signums}
    try:
        import torch
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum in held[:1]:  # now the usual handlers unwind (KeyboardInterrupt, Terminated)
        signal.raise_signal(signum)
    return torch


def _check_device(device: str | None) -> str:
    """The device to run on; a CUDA device this torch or this machine lacks is a user error."""
    torch = _import_torch()

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise UserError(
                f"--device {device}: no CUDA device is available (torch {torch.__version__}, {build}); use --device cpu"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@contextlib.contextmanager
def _naming_flags() -> Iterator[None]:
    """Re-raise a library :class:`UserError` about a setting with the flag's name in it; any other
    error propagates as it is."""
    try:
        yield
    except UserError as exc:
        raise UserError(_flag_names(str(exc))) from None


def _flag_names(message: str) -> str:
    """A library message with the settings it names as the flags that set them."""
    for field, flag in FLAG_FOR.items():
        message = re.sub(rf"((sampling parameter|engine setting) )?'{field}'", flag, message)
    return message.replace("kv_cache_memory=", "--kv-cache-gib ").replace(
        "give the engine more KV memory", "give the engine more KV memory (--kv-cache-gib)"
    )


def _engine_config(args: argparse.Namespace, device: str) -> Any:
    from .engine import EngineConfig

    with _naming_flags():
        return EngineConfig.for_device(
            device,
            block_size=args.block_size,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_memory=max(1, int(args.kv_cache_gib * 2**30)) if args.kv_cache_gib is not None else None,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enforce_eager=args.enforce_eager or None,
            enable_prefix_caching=False if args.no_prefix_caching else None,
            max_model_len=getattr(args, "max_model_len", None),  # serve's flag
            quantize=args.quantize,
            group_size=args.group_size,
            attention_backend=args.attention_backend,
            kv_cache_dtype=args.kv_cache_dtype,
            kv_cache_dir=args.kv_cache_dir,
            kv_cache_dir_bytes=max(1, int(args.kv_cache_dir_gib * 2**30))
            if args.kv_cache_dir_gib is not None
            else None,
        )


def _sampling(args: argparse.Namespace, **extra: object) -> Any:
    from .sampling import SamplingParams

    with _naming_flags():
        return SamplingParams(  # unset (None) flags: neutral here, the model's defaults after loading
            max_new_tokens=args.max_new_tokens,
            **with_defaults({k: getattr(args, k) for k in GENERATION_FIELDS}, {}),
            seed=args.seed,
            stop=tuple(args.stop or ()),
            **extra,
        )


def _load(args: argparse.Namespace, device: str, engine_config: Any) -> Any:
    from .llm import LLM

    with _naming_flags():  # e.g. a KV budget too small for one block
        return LLM.from_pretrained(
            args.model, dtype=args.dtype, device=device, chat_format=args.chat_format, engine_config=engine_config
        )


# ---------------------------------------------------------------------------------------- output
@contextlib.contextmanager
def _ctrl_c_cancels() -> Iterator[threading.Event]:
    """While generating: Ctrl-C sets the event (the answer stops at the next step, cleanly); a
    second Ctrl-C before that step ends raises KeyboardInterrupt as usual."""
    cancel = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


def _write_stream(deltas: Iterator[str]) -> None:
    wrote = False
    try:
        for delta in deltas:
            sys.stdout.write(delta)
            sys.stdout.flush()
            wrote = True
    finally:
        if wrote:  # end the answer's line, also before an error message
            sys.stdout.write("\n")
            sys.stdout.flush()


def _notice(llm: Any, params: Any, interactive: bool = False) -> None:
    """One line on stderr when the answer did not end by itself."""
    done = llm.last_completion
    if done.finish_reason == "abort":
        if interactive and not done.token_ids:
            print("(interrupted before the answer began; this turn is not kept)", file=sys.stderr)
        else:
            print(f"(interrupted after {len(done.token_ids)} tokens)", file=sys.stderr)
    elif done.finish_reason == "length":
        n = len(done.token_ids)
        if n >= params.max_new_tokens:
            print(f"(the answer was cut at --max-new-tokens {params.max_new_tokens})", file=sys.stderr)
        else:
            limit = llm.engine.max_model_len
            if limit < llm.config.context_length:
                what = f"the {limit} tokens the KV cache holds (--kv-cache-gib)"
            else:
                what = f"the model's context of {limit} tokens"
            hint = "; /reset starts a new conversation" if interactive else ""
            print(f"(the answer was cut at {n} tokens: prompt and answer filled {what}{hint})", file=sys.stderr)


# ---------------------------------------------------------------------------------------- commands
def _cmd_convert(args: argparse.Namespace) -> int:
    _import_torch()
    from .convert import convert_checkpoint, convert_gguf

    src = Path(args.src)
    if src.is_file() and src.suffix.lower() == ".gguf":
        out = convert_gguf(
            src, args.dst, dtype=args.dtype, quantize=args.quantize or "auto", group_size=args.group_size
        )
    elif src.is_dir():
        shard = max(1, int(args.max_shard_size * 1024**3)) if args.max_shard_size else None
        out = convert_checkpoint(
            src, args.dst, args.dtype, shard, quantize=args.quantize or "auto", group_size=args.group_size
        )
    elif not src.exists():
        raise UserError(f"{src} does not exist (expected a .gguf file or a checkpoint directory)")
    else:
        raise UserError(f"{src} is a file but not a .gguf file; give a .gguf file or a checkpoint directory")
    print(f"wrote {out}")
    return 0


def _prepare(args: argparse.Namespace, **extra: object) -> tuple[Any, Any]:
    """Validate every flag, then load: (llm, sampling params). The engine's start-up lines (its
    attention backend) are for servers' logs, not a terminal's answer: warnings only here."""
    device = _check_device(args.device)
    params = _sampling(args, **extra)
    engine_config = _engine_config(args, device)
    engine_log = logging.getLogger("minicpm.engine")
    level = engine_log.level
    engine_log.setLevel(logging.WARNING)
    try:
        return _load(args, device, engine_config), params
    finally:
        engine_log.setLevel(level)


def _cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise UserError("--prompt is empty")
    llm, params = _prepare(args, ignore_eos=args.ignore_eos)
    try:
        with _ctrl_c_cancels() as cancel:
            _write_stream(llm.stream(args.prompt, params, cancel=cancel))
        _notice(llm, params)
    finally:
        llm.close()  # e.g. the persistent prefix cache writes what it has queued
    return 130 if cancel.is_set() else 0


def _cmd_chat(args: argparse.Namespace) -> int:
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty")
    llm, params = _prepare(args)
    import dataclasses

    given = {k: getattr(args, k) for k in GENERATION_FIELDS}
    params = dataclasses.replace(params, **with_defaults(given, llm.sampling_defaults))
    try:
        if args.prompt is not None:
            with _ctrl_c_cancels() as cancel:
                _write_stream(llm.chat_stream(args.prompt, system=args.system, params=params, cancel=cancel))
            _notice(llm, params)
            return 130 if cancel.is_set() else 0
        return _interactive(llm, params, args.system)
    finally:
        llm.close()  # e.g. the persistent prefix cache writes what it has queued


def _setup_readline() -> Callable[[], None]:
    """Line editing and a persistent history (``$MINICPM_CACHE/chat_history``); returns the saver."""
    try:
        import readline
    except ImportError:  # not on every platform: input() still works
        return lambda: None
    from .default_model import cache_root

    path = cache_root() / "chat_history"
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(1000)

    def save() -> None:
        from .fileio import is_disk_full, write_atomic, writing

        try:
            with writing(path.parent):
                path.parent.mkdir(parents=True, exist_ok=True)
            # written here, not by readline.write_history_file: that one takes a short write on a
            # full disk for success and leaves the history cut
            lines = [readline.get_history_item(i) for i in range(1, readline.get_current_history_length() + 1)]
            data = "".join(f"{line}\n" for line in lines if line is not None).encode("utf-8", "surrogateescape")
            write_atomic(path, lambda tmp: tmp.write_bytes(data))  # the bytes typed, as readline read them
        except OSError as exc:
            if is_disk_full(exc):  # one error line naming the path (exit 2)
                raise
            print(f"minicpm: chat history not saved: {_describe_os_error(exc)}", file=sys.stderr)

    return save


def _interactive(llm: Any, params: Any, system: str | None) -> int:
    from .tokenizer import clean_text

    save_history = _setup_readline()
    with contextlib.suppress(AttributeError, ValueError):  # a mis-encoded paste is text, not a crash
        sys.stdin.reconfigure(errors="replace")
    print(f"minicpm chat: {llm.engine.capacity_line()}", file=sys.stderr)
    print("minicpm chat: type a message; /help lists the commands, /exit quits.", file=sys.stderr)
    history: list[dict[str, Any]] = []
    ctrl_c = False  # the last thing at the prompt was a Ctrl-C
    try:
        while True:
            try:
                query = clean_text(input(">>> "))
            except EOFError:
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:
                if ctrl_c:
                    print(file=sys.stderr)
                    return 0
                ctrl_c = True
                print("\n(Ctrl-C again, Ctrl-D or /exit to quit)", file=sys.stderr)
                continue
            ctrl_c = False
            words = query.split()
            if not words:
                _forget_last_line()
                continue
            if words[0].startswith("/") and (len(words) == 1 or words[0] in _COMMANDS):
                command = _COMMANDS.get(words[0])
                if command == "exit":
                    return 0
                if command == "reset":
                    history = []
                    print("(history cleared)", file=sys.stderr)
                elif command == "history":
                    for m in history:
                        print(f"[{m['role']}] {m['content']}")
                    print(f"({len(history)} messages)", file=sys.stderr)
                elif command == "help":
                    print(HELP, file=sys.stderr)
                else:
                    print(f"unknown command {words[0]}; /help lists the commands", file=sys.stderr)
                continue
            try:
                with _ctrl_c_cancels() as cancel:
                    _write_stream(llm.chat_stream(query, history, system, params, cancel=cancel))
            except UserError as exc:  # e.g. the conversation outgrew the context: keep the session
                print(f"minicpm: error: {_flag_names(str(exc))}", file=sys.stderr)
                continue
            except KeyboardInterrupt:  # a second Ctrl-C inside a step: the turn is dropped, the session stays
                print("\n(interrupted; this turn is not kept)", file=sys.stderr)
                continue
            _notice(llm, params, interactive=True)
            if llm.last_completion.token_ids:  # a turn stopped before its first token is not kept
                history = llm.last_history
    finally:
        save_history()


def _forget_last_line() -> None:
    """Keep blank lines out of the readline history."""
    with contextlib.suppress(ImportError, ValueError, AttributeError):
        import readline

        n = readline.get_current_history_length()
        if n and not (readline.get_history_item(n) or "").strip():
            readline.remove_history_item(n - 1)


_COMMANDS = {
    "/exit": "exit",
    "/bye": "exit",
    "/quit": "exit",
    "/reset": "reset",
    "/clear": "reset",
    "/history": "history",
    "/help": "help",
    "/?": "help",
}


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    device = _check_device(args.device)
    engine_config = _engine_config(args, device)
    template = None
    if args.chat_template is not None:
        try:
            template = Path(args.chat_template).read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"--chat-template {args.chat_template}: {exc.strerror}") from None
        from .tokenizer import compile_template

        compile_template(template)  # a template that does not compile fails now
    keys = list(args.api_key or [])
    if not keys and os.environ.get("MINICPM_API_KEY"):
        keys = [os.environ["MINICPM_API_KEY"]]
    llm = _load(args, device, engine_config)
    log.info("%s", llm.engine.capacity_line())
    from .default_model import DEFAULT_NAME
    from .engine.async_engine import BackgroundEngine
    from .server.app import ServerState
    from .server.serve import serve

    names = args.served_model_name or [Path(args.model).name if args.model else DEFAULT_NAME]
    state = ServerState(
        engine=BackgroundEngine(llm.engine),
        tokenizer=llm.tokenizer,
        served_names=names,
        chat_format=args.chat_format,
        chat_template=template,
        api_keys=keys,
        max_queued_requests=args.max_queued_requests,
        sampling_defaults=llm.sampling_defaults,
        max_request_bytes=args.max_request_bytes,
        web=not args.no_web,
    )
    try:
        return serve(state, args.host, args.port, args.shutdown_timeout)
    finally:
        llm.close()  # e.g. the persistent prefix cache writes what it has queued


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    _import_torch()
    from .config import MiniCPMConfig
    from .default_model import default_model_path, resolve_model_path
    from .plan import available_memory, cpu_prefill_reads, format_plan, plan_memory
    from .weights import CheckpointError, open_checkpoint, weight_files

    if args.model is None:
        model = default_model_path()
    else:
        model = Path(args.model)
        if model.suffix.lower() == ".gguf" or not model.exists():
            model = resolve_model_path(model)  # converts a GGUF once; names a missing path
    # planning for a GPU needs none here unless its free memory is to be read
    device = args.device if args.device and args.memory is not None else _check_device(args.device)
    config = MiniCPMConfig.from_pretrained(model)
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")  # the loader's default
    if args.memory is not None:
        memory, source = int(args.memory * 1024**3), "given"
    else:
        memory, source = available_memory(device.partition(":")[0])
    try:
        disk = sum(f.stat().st_size for f in weight_files(model)) if model.is_dir() else None
    except CheckpointError:
        disk = None  # planning needs only config.json
    # a quantized checkpoint runs as stored on CPU: its weights take what its files take, GGUF
    # blocks what they take decoded (minicpm.weights.StoredWeight.loaded_bytes)
    quantized = (model / "config.json").is_file() and "quantization_config" in json.loads(
        (model / "config.json").read_text(encoding="utf-8")
    )
    stored = None
    if quantized and disk is not None and not device.startswith("cuda"):
        try:
            stored = sum(w.loaded_bytes for w in open_checkpoint(model).weights.values())
        except CheckpointError:
            stored = disk
    if args.quantize not in (None, "auto", "none") and stored is not None:
        stored = None  # requantized: counted from the shapes
    plan = plan_memory(
        config,
        args.context,
        memory,
        dtype,
        memory_source=source,
        checkpoint_bytes=disk,
        weight_bytes=stored,
        kv_cache_dtype=args.kv_cache_dtype,
        quantize=None if args.quantize in (None, "auto") else args.quantize,
        group_size=args.group_size,
        device=device.partition(":")[0],
        **(cpu_prefill_reads(dtype, config.head_dim, args.kv_cache_dtype) if device == "cpu" else {}),
    )
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


# ---------------------------------------------------------------------------------------- parser
def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint directory, or a .gguf file (converted once into the cache) "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="compute dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
    p.add_argument("--device", type=DEVICE, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(
        "--chat-format",
        default="auto",
        choices=["auto", "chatml", "minicpm"],
        help="chat template: the checkpoint's (auto), ChatML, or MiniCPM's <用户>/<AI>",
    )
    g = p.add_argument_group("engine")
    g.add_argument(
        "--kv-cache-gib",
        type=GIB,
        default=None,
        help="KV cache size (default: on CPU the available memory, the weights loaded, minus an activation reserve "
        "and a tenth of the machine's memory (at least 1 GiB) left to the system; on GPU what "
        "--gpu-memory-utilization leaves)",
    )
    g.add_argument(
        "--gpu-memory-utilization", type=FRACTION, default=None, help="share of the GPU to use (default 0.9)"
    )
    g.add_argument(
        "--max-num-seqs", type=POSITIVE_INT, default=None, help="requests decoded together (default 16 CPU, 64 GPU)"
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=POSITIVE_INT,
        default=None,
        help="tokens per step, i.e. the prefill chunk (default 512 CPU, 8192 GPU)",
    )
    g.add_argument("--block-size", type=BLOCK_SIZE, default=None, help="tokens per KV block (default 128 CPU, 64 GPU)")
    g.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks across requests")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument(
        "--kv-cache-dir",
        default=None,
        metavar="DIR",
        help="keep the prefix cache on disk in DIR: full blocks of long prompts are reused by later runs and "
        "other processes (default: off)",
    )
    g.add_argument(
        "--kv-cache-dir-gib",
        type=GIB,
        default=None,
        help="bound on --kv-cache-dir, least recently used blocks evicted (default: 20 GiB, or half of what "
        "its filesystem leaves if smaller)",
    )
    g.add_argument(
        "--attention-backend",
        default=None,
        metavar="NAME",
        help="attention path: auto, cpu-native, cpu-torch, triton or torch (default auto: cpu-native where the "
        "C kernels build, else cpu-torch; triton on CUDA, else torch; torch is the plain reference)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "bfloat16", "float32", "int8", "int4", "fp8"],
        default=None,
        help="how the KV cache stores keys and values (default auto: the compute dtype; int8: groups of 32 with a "
        "scale, as llama.cpp's q8_0, 1.9x the tokens of bfloat16; int4: groups of 32 with a scale and a minimum, as "
        "q4_1, 3.2x; fp8: CUDA only)",
    )
    _add_quantize_flags(
        g,
        "weight-only quantization of the linear layers, CPU (default auto: the weights as the "
        "checkpoint stores them, e.g. the embedded model's Q4_1 / Q8_0 as it ships; none: float; int8: one scale per "
        "output channel, a quarter of float32's bytes; int4: groups of 32 with a scale and a minimum, as llama.cpp's "
        "Q4_1)",
    )


def _add_quantize_flags(g: Any, help_text: str) -> None:
    g.add_argument("--quantize", choices=["auto", "none", "int8", "int4"], default=None, help=help_text)
    g.add_argument(
        "--group-size",
        type=int,
        choices=[16, 32, 64, 128],
        default=None,
        help="inputs per quantization group (int4: 32, 64 or 128, default 32; int8: 16-128, default one per channel)",
    )


def _add_sampling_flags(p: argparse.ArgumentParser, max_new: int, model_defaults: bool) -> None:
    """``model_defaults``: unset temperature / top-p / top-k / repetition penalty take the model's
    (its generation_config.json, else the MiniCPM card's); otherwise greedy."""
    if model_defaults:
        from .default_model import SMOLLM2_SAMPLING  # what the embedded model's conversion records

        embedded = ", ".join(f"{k} {v}" for k, v in SMOLLM2_SAMPLING.items())
        where = f"(default: the model's generation_config.json; the embedded model: {embedded}; else "
        where += f"{CARD_DEFAULTS['temperature']})"
        t_help, p_help = f"0 is greedy {where}", "nucleus sampling mass (default: the model's; else 0.8)"
        k_help, r_help = "keep the k likeliest tokens (default: the model's; else off)", "HF-style (default: off)"
        defaults: dict[str, Any] = {"temperature": None, "top_p": None, "top_k": None, "repetition_penalty": None}
    else:
        t_help, p_help = "0 is greedy (default 0)", "nucleus sampling mass (default 1.0)"
        k_help, r_help = "keep the k likeliest tokens (default 0: off)", "HF-style penalty (default 1.0: off)"
        defaults = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    p.add_argument("--temperature", type=NON_NEGATIVE, default=defaults["temperature"], help=t_help)
    p.add_argument("--top-p", type=FRACTION, default=defaults["top_p"], help=p_help)
    p.add_argument("--top-k", type=NON_NEGATIVE_INT, default=defaults["top_k"], help=k_help)
    p.add_argument("--repetition-penalty", type=PENALTY, default=defaults["repetition_penalty"], help=r_help)
    p.add_argument(
        "--max-new-tokens", type=POSITIVE_INT, default=max_new, help=f"answer length limit (default {max_new})"
    )
    p.add_argument("--seed", type=SEED, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", type=STOP, help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="minicpm", description="Run MiniCPM-2B-128k and Llama-family checkpoints.")
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
        type=GIB,
        default=None,
        metavar="GiB",
        help="split safetensors into shards of at most this many GiB (default 4)",
    )
    _add_quantize_flags(
        p,
        "weights to write (default auto: as the source stores them, a GGUF's Q8_0 / Q6_K / Q4_0 / "
        "Q4_1 / Q4_K kept quantized; none: float; int8 / int4: every linear layer quantized, scales beside the codes)",
    )
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("chat", help="chat with a model (one answer with --prompt, else interactive)")
    _add_model_flags(p)
    p.add_argument("--prompt", default=None, help="answer this message and exit")
    p.add_argument("--system", default=None, help="system message")
    _add_sampling_flags(p, CHAT_DEFAULTS["max_new_tokens"], model_defaults=True)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("generate", help="raw completion of a prompt, streamed to stdout")
    _add_model_flags(p)
    p.add_argument("--prompt", required=True, help="text to complete")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating to --max-new-tokens")
    _add_sampling_flags(p, max_new=256, model_defaults=False)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-compatible server (chat, completions, models, metrics)")
    _add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_checked(int, "a port number", lambda v: 0 <= v < 65536), default=8000)
    p.add_argument(
        "--api-key", action="append", help="require this bearer key (repeatable; default: $MINICPM_API_KEY, else none)"
    )
    p.add_argument("--served-model-name", action="append", help="model name(s) clients use (default: the directory's)")
    p.add_argument("--max-model-len", type=POSITIVE_INT, default=None, help="context limit (default: the model's)")
    p.add_argument(
        "--max-queued-requests", type=NON_NEGATIVE_INT, default=256, help="waiting requests before 503 (default 256)"
    )
    p.add_argument(
        "--max-request-bytes",
        type=POSITIVE_INT,
        default=None,
        help="bigger request bodies get 413, unread (default: a full context at 32 bytes a token, at least 1 MiB)",
    )
    p.add_argument(
        "--shutdown-timeout", type=NON_NEGATIVE, default=30.0, help="seconds to let requests finish on SIGTERM (30)"
    )
    p.add_argument(
        "--chat-template", default=None, metavar="FILE", help="a jinja2 chat template instead of the model's"
    )
    p.add_argument("--no-web", action="store_true", help="do not serve the chat page at / (the API only)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("plan", help="will the weights and N tokens of KV cache fit in memory? (loads no weights)")
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint directory (only config.json is read), a config.json or a .gguf file "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--context", type=POSITIVE_INT, required=True, help="tokens per context (prompt + answer)")
    p.add_argument(
        "--memory",
        type=GIB,
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
    p.add_argument("--device", type=DEVICE, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "bfloat16", "float32", "float16", "int8", "int4", "fp8"],
        default="auto",
        help="KV cache format to count (default auto: --dtype; int8 / int4 with their float16 scales; fp8 on cuda)",
    )
    _add_quantize_flags(p, "weights to count as the engine quantizes them (CPU; int4 keeps the head at 8 bits)")
    p.add_argument("--json", action="store_true", help="print one JSON object with exact byte counts")
    p.set_defaults(func=_cmd_plan)

    from .eval.cli import add_parser as add_eval_parser

    add_eval_parser(sub)
    return parser


# ---------------------------------------------------------------------------------------- main
def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def _process_setup() -> Iterator[None]:
    """Signals, logging and stream encodings for one command-line run (restored afterwards, so
    that ``main`` can be called in-process, e.g. by tests)."""
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            signum = getattr(signal, name, None)
            if signum is not None:
                handlers[signum] = signal.signal(signum, _raise_terminated)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("minicpm: %(message)s"))
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    for stream in (sys.stdout, sys.stderr):  # never die printing a character the terminal can't show
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="replace")
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
        for signum, previous in handlers.items():
            signal.signal(signum, previous)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with _process_setup():
            args = build_parser().parse_args(argv)
            func: Callable[[argparse.Namespace], int] = args.func
            return func(args)
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as cat does
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # SIGPIPE
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Terminated as exc:
        return 128 + exc.signum
    except OSError as exc:
        print(f"minicpm: error: {_describe_os_error(exc)}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"minicpm: error: {_flag_names(str(exc))}", file=sys.stderr)
        return 2


def _describe_os_error(exc: OSError) -> str:
    """``PATH: what failed``, and for a full disk or quota what to do about it."""
    if exc.filename is None or exc.strerror is None:
        return str(exc)
    text = f"{exc.filename}: {exc.strerror}"
    from .fileio import is_disk_full

    if is_disk_full(exc):
        text += " (nothing was left half-written; free some space there, or write elsewhere: $MINICPM_CACHE, --output)"
    return text


if __name__ == "__main__":
    sys.exit(main())

"""``minicpm eval ...``: the command-line face of the evaluation harness.

Contract: every suite command (``infinitebench``, ``needle``, ``ruler``) builds its work list with
the evaluated model's tokenizer (``--model``, default the embedded model), answers it with the
in-process engine, with ``--endpoint`` servers or with ``--ray`` replicas, writes a resumable run
directory (``--output``), and when the run is complete writes ``report.json`` and ``report.md``
and prints the table. Flags are checked before anything loads; bad input is one line.
``generate``, ``score``, ``merge`` and ``compare`` work on files only and load no model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .. import cli as base
from ..errors import UserError

log = logging.getLogger("minicpm")

SUITES = ("infinitebench", "needle", "ruler")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    values = [x for x in text.replace(" ", "").split(",") if x]
    if not values:
        raise argparse.ArgumentTypeError("expected comma-separated names")
    return values


def _shard(text: str) -> tuple[int, int]:
    from .harness import parse_shard

    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--shard {text}: ")) from None


def _add_target_flags(p: argparse.ArgumentParser) -> None:
    base._add_model_flags(p)
    g = p.add_argument_group("targets (default: the in-process engine on --model)")
    g.add_argument(
        "--endpoint",
        action="append",
        metavar="URL",
        help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000 (repeatable: work is balanced over them); "
        "--model then only gives the tokenizer",
    )
    g.add_argument("--served-model", action="append", help="the model name at each endpoint (default: its first)")
    g.add_argument("--api-key", action="append", help="bearer key for each endpoint (one for all, or one each)")
    g.add_argument(
        "--concurrency",
        action="append",
        type=base.POSITIVE_INT,
        help="requests in flight per endpoint (default 8; one for all, or one each); in-process: 2 x --max-num-seqs",
    )
    g.add_argument("--ray", type=base.POSITIVE_INT, default=None, metavar="N", help="N engine replicas as Ray actors")
    r = p.add_argument_group("run")
    r.add_argument("--output", default=None, metavar="DIR", help="run directory (default: minicpm-eval/<run name>)")
    r.add_argument("--shard", type=_shard, default=None, metavar="I/N", help="run slice I of N (merge them after)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(sub: Any) -> None:
    """``minicpm eval`` and its subcommands."""
    p = sub.add_parser("eval", help="long-context evaluation: InfiniteBench, needle-in-a-haystack, RULER")
    esub = p.add_subparsers(dest="eval_command", required=True, parser_class=base.ArgumentParser)

    q = esub.add_parser("infinitebench", help="InfiniteBench from the official <task>.jsonl files")
    q.add_argument("--data", required=True, metavar="DIR", help="directory of the official <task>.jsonl files")
    q.add_argument("--tasks", type=_name_list, default=None, help="comma-separated tasks (default: all 12)")
    q.add_argument(
        "--style",
        choices=["chat", "completion"],
        default="chat",
        help="chat: the chat-style templates as one user turn (default); completion: the benchmark's "
        "completion-style templates as raw text",
    )
    q.add_argument(
        "--max-length", type=base.POSITIVE_INT, default=None, help="token budget (default: the model's context)"
    )
    q.add_argument("--limit", type=base.POSITIVE_INT, default=None, help="first N examples of each task")
    _add_target_flags(q)
    q.set_defaults(func=_cmd_suite, suite="infinitebench")

    q = esub.add_parser("needle", help="needle-in-a-haystack sweep (Paul Graham essays) and its heatmap")
    q.add_argument(
        "--lengths",
        type=_int_list,
        default=None,
        help="context lengths, comma-separated (default: --num-lengths evenly from --min-length to --max-length)",
    )
    q.add_argument("--min-length", type=base.POSITIVE_INT, default=1000)
    q.add_argument("--max-length", type=base.POSITIVE_INT, default=None, help="default: the model's context")
    q.add_argument("--num-lengths", type=base.POSITIVE_INT, default=8)
    q.add_argument("--depths", type=base.POSITIVE_INT, default=11, help="number of depths from 0 to 100 (default 11)")
    q.add_argument("--depth-spacing", choices=["linear", "sigmoid"], default="linear")
    _add_target_flags(q)
    q.set_defaults(func=_cmd_suite, suite="needle")

    q = esub.add_parser("ruler", help="RULER's synthetic tasks at several lengths")
    q.add_argument("--tasks", type=_name_list, default=None, help="comma-separated (default: the 11 without data)")
    q.add_argument(
        "--lengths", type=_int_list, default=[4096, 8192], help="comma-separated lengths (default 4096,8192)"
    )
    q.add_argument("--samples", type=base.POSITIVE_INT, default=25, help="samples per task and length (default 25)")
    q.add_argument("--seed", type=base.NON_NEGATIVE_INT, default=42)
    q.add_argument("--qa-file", default=None, metavar="JSON", help="SQuAD v2 (qa_1) or HotpotQA (qa_2) dev file")
    _add_target_flags(q)
    q.set_defaults(func=_cmd_suite, suite="ruler")

    q = esub.add_parser("generate", help="synthetic InfiniteBench files (passkey, kv_retrieval, ...) at any length")
    q.add_argument("task", help="passkey, number_string, kv_retrieval, math_find or code_run")
    q.add_argument("--length", type=base.POSITIVE_INT, required=True, help="prompt length in the model's tokens")
    q.add_argument("--count", type=base.POSITIVE_INT, default=10, help="examples (default 10)")
    q.add_argument("--seed", type=base.NON_NEGATIVE_INT, default=0)
    q.add_argument("--output", required=True, metavar="DIR", help="directory for <task>.jsonl")
    q.add_argument("--model", default=None, help="the model whose tokenizer counts (default: the embedded model)")
    q.add_argument("--chat-format", default="auto", choices=["auto", "chatml", "minicpm"])
    q.set_defaults(func=_cmd_generate)

    q = esub.add_parser("score", help="score a predictions file (ours or the benchmark's own)")
    q.add_argument("file", help="JSONL with prediction (or pred) and ground_truth (or label)")
    q.add_argument("--task", required=True, help="the InfiniteBench task")
    q.add_argument("--model", default="", help="the model's name, for the benchmark's one per-model rule (GPT-4)")
    q.add_argument("--json", action="store_true", help='last line: {"task", "score", "n"}')
    q.set_defaults(func=_cmd_score)

    q = esub.add_parser("merge", help="combine the run directories of --shard runs into one report")
    q.add_argument("runs", nargs="+", metavar="DIR")
    q.add_argument("--output", required=True, metavar="DIR")
    q.set_defaults(func=_cmd_merge)

    q = esub.add_parser("perplexity", help="perplexity of a text file, as llama.cpp's perplexity tool measures it")
    q.add_argument("file", metavar="FILE", help="a UTF-8 text file")
    q.add_argument("--context", type=base.POSITIVE_INT, default=512, help="tokens per window (default 512)")
    q.add_argument(
        "--stride",
        type=base.POSITIVE_INT,
        default=None,
        help="tokens between window starts (default: --context, non-overlapping); each window scores its "
        "last min(stride, context/2) tokens",
    )
    q.add_argument("--json", action="store_true", help="one JSON object instead of the PPL line")
    base._add_model_flags(q)
    q.set_defaults(func=_cmd_perplexity)

    q = esub.add_parser("compare", help="finished runs side by side")
    q.add_argument("runs", nargs="+", metavar="DIR")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_cmd_compare)


# ------------------------------------------------------------------------------------ helpers
def _per_endpoint(values: list | None, n: int, flag: str, default: Any) -> list:
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UserError(f"{flag}: give one value for all endpoints or one per --endpoint ({n}), not {len(values)}")
    return values


def _check_targets(args: argparse.Namespace) -> None:
    endpoints = args.endpoint or []
    if args.ray and endpoints:
        raise UserError("--ray and --endpoint: choose one kind of target")
    if not endpoints:
        for flag in ("served_model", "api_key"):
            if getattr(args, flag):
                raise UserError(f"--{flag.replace('_', '-')} needs --endpoint")
    for url in endpoints:
        if not url.startswith(("http://", "https://")):
            raise UserError(f"--endpoint {url}: expected an http:// or https:// URL")


def _model_name(args: argparse.Namespace) -> str:
    if args.model is None:
        from ..default_model import DEFAULT_NAME

        return DEFAULT_NAME
    return Path(args.model).name.removesuffix(".gguf")


def _load_tokenizer(args: argparse.Namespace) -> tuple[Any, int]:
    """The evaluated model's tokenizer and context length."""
    from ..config import MiniCPMConfig
    from ..default_model import resolve_model_path
    from ..tokenizer import Tokenizer

    path = resolve_model_path(args.model)
    tokenizer = Tokenizer.from_pretrained(path)
    tokenizer.resolve_chat_template(args.chat_format)
    return tokenizer, MiniCPMConfig.from_pretrained(path).context_length


def _targets(args: argparse.Namespace, llm_factory: Any) -> list[Any]:
    from .harness import EndpointTarget, EngineTarget, ray_targets

    endpoints = args.endpoint or []
    if endpoints:
        n = len(endpoints)
        names = _per_endpoint(args.served_model, n, "--served-model", None)
        keys = _per_endpoint(args.api_key, n, "--api-key", None)
        conc = _per_endpoint(args.concurrency, n, "--concurrency", 8)
        return [EndpointTarget(u, m, k, c) for u, m, k, c in zip(endpoints, names, keys, conc, strict=True)]
    if args.ray:
        device = base._check_device(args.device) if args.device else None
        cfg = _engine_kwargs(args)
        return ray_targets(args.ray, args.model, args.dtype, device, cfg)
    return [EngineTarget(llm_factory(), (args.concurrency or [None])[0])]


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        k: v
        for k, v in {
            "block_size": args.block_size,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "kv_cache_memory": int(args.kv_cache_gib * 2**30) if args.kv_cache_gib is not None else None,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "enforce_eager": args.enforce_eager or None,
            "kv_cache_dtype": args.kv_cache_dtype,
            "kv_cache_dir": args.kv_cache_dir,
            "kv_cache_dir_bytes": int(args.kv_cache_dir_gib * 2**30) if args.kv_cache_dir_gib is not None else None,
        }.items()
        if v is not None
    }


def _describe_targets(args: argparse.Namespace) -> list[str]:
    if args.endpoint:
        return list(args.endpoint)
    if args.ray:
        return [f"ray x{args.ray}"]
    return [f"minicpm engine ({args.device or 'auto'}, {args.dtype or 'default dtype'})"]


# ------------------------------------------------------------------------------------- suites
def _cmd_suite(args: argparse.Namespace) -> int:
    from . import harness

    _check_targets(args)
    device = base._check_device(args.device) if not args.endpoint else None
    engine_config = base._engine_config(args, device) if device else None
    tokenizer, context = _load_tokenizer(args)
    items, settings, score, make_report = _suite_module(args.suite).build(args, tokenizer, context)
    settings = {
        "suite": args.suite,
        "model": str(args.model) if args.model else "embedded default",
        "model_name": _model_name(args),
        "chat_format": args.chat_format,
        "dtype": args.dtype,
        **settings,
        "num_items": len(items),
        "shard": list(args.shard) if args.shard else None,
        "targets": _describe_targets(args),
    }
    mine = harness.select_shard(items, args.shard)
    out = args.output or _default_output(args, settings)
    run_dir = harness.RunDir(out)
    previous = 0.0
    if run_dir.settings_file.exists():
        previous = float(run_dir.settings().get("wall_time_s") or 0.0)
    settings["wall_time_s"] = previous
    run_dir.begin(settings)
    timer = harness.Timer(previous)

    def llm_factory() -> Any:
        llm = base._load(args, device, engine_config)
        if context > llm.engine.max_model_len:
            log.info("the engine holds %d tokens per sequence (of the model's %d)", llm.engine.max_model_len, context)
        return llm

    targets = _targets(args, llm_factory)
    done_before = len(run_dir.records())
    print(f"minicpm: {args.suite}: {len(mine)} prompts ({done_before} done before) -> {run_dir.path}", file=sys.stderr)
    try:
        records, errors = harness.run(
            mine, targets, run_dir, score, progress=not args.no_progress, description=args.suite
        )
    except KeyboardInterrupt:
        _save_time(run_dir, timer)
        print(
            f"minicpm: interrupted; {len(run_dir.records())} of {len(mine)} prompts are saved in {run_dir.path}: "
            "run the same command again to resume",
            file=sys.stderr,
        )
        raise
    except harness.AllTargetsFailedError as exc:
        _save_time(run_dir, timer)
        print(f"minicpm: error: {exc}; rerun to resume", file=sys.stderr)
        return 1
    settings["wall_time_s"] = _save_time(run_dir, timer)
    for item, message in errors[:5]:
        print(f"minicpm: error: {item.group} #{item.id}: {message}", file=sys.stderr)
    if errors:
        print(f"minicpm: {len(errors)} prompt(s) failed and stay undone: rerun to retry them", file=sys.stderr)
        return 1
    if len(records) < len(mine):
        return 1
    return _finish(run_dir, settings, [records[i.index] for i in mine], make_report)


def _save_time(run_dir: Any, timer: Any) -> float:
    settings = run_dir.settings()
    settings["wall_time_s"] = round(timer.total, 1)
    run_dir.begin(settings)
    return settings["wall_time_s"]


def _finish(run_dir: Any, settings: dict[str, Any], records: list[dict[str, Any]], make_report: Any) -> int:
    report, markdown = make_report(records, settings)
    run_dir.write_report(report, markdown)
    write_artifacts = getattr(_suite_module(settings["suite"]), "write_artifacts", None)
    if write_artifacts is not None:
        write_artifacts(records, settings, run_dir.path)
    print(markdown)
    print(f"minicpm: report: {run_dir.path / 'report.md'}", file=sys.stderr)
    return 0


def _default_output(args: argparse.Namespace, settings: dict[str, Any]) -> Path:
    name = f"{args.suite}-{settings['model_name']}"
    if args.suite == "infinitebench":
        name += f"-{settings['style']}-{settings['max_length']}"
    if args.endpoint:
        name += "-endpoint"
    if args.shard:
        name += f"-shard{args.shard[0]}of{args.shard[1]}"
    return Path("minicpm-eval") / name


# each suite's module: build(args, tokenizer, context) -> (items, settings, score, report), report(records,
# settings) -> (json, markdown), and optionally write_artifacts(records, settings, run_dir)
_SUITE_MODULES = {"infinitebench": "infinitebench", "needle": "needle_suite", "ruler": "ruler_suite"}


def _suite_module(suite: str) -> Any:
    import importlib

    if suite not in _SUITE_MODULES:
        raise UserError(f"unknown suite {suite!r} in run.json")
    return importlib.import_module(f".{_SUITE_MODULES[suite]}", __package__)


# --------------------------------------------------------------------------------- file tools
def _cmd_generate(args: argparse.Namespace) -> int:
    from . import infinitebench as ib
    from . import synthetic

    if args.task not in synthetic.SYNTHETIC_TASKS:
        raise UserError(f"no generator for {args.task!r}; these are synthetic: {', '.join(synthetic.SYNTHETIC_TASKS)}")
    tokenizer, _ = _load_tokenizer(args)

    def count_tokens(task: str, example: dict[str, Any]) -> int:
        messages = [{"role": "user", "content": ib.fill(task, example, "chat")}]
        return len(tokenizer.encode_chat(messages, chat_format=args.chat_format))

    examples = synthetic.generate(args.task, args.length, args.count, args.seed, count_tokens)
    path = Path(args.output) / f"{args.task}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic.write_jsonl(examples, path)
    lengths = [count_tokens(args.task, e) for e in examples]
    print(f"{path}: {len(examples)} examples, {min(lengths)}-{max(lengths)} prompt tokens (chat style)")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from .scoring import INFINITEBENCH_TASKS, score_infinitebench

    if args.task not in INFINITEBENCH_TASKS:
        raise UserError(f"--task {args.task}: unknown; known: {', '.join(INFINITEBENCH_TASKS)}")
    path = Path(args.file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    scores = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not JSON ({exc.msg})") from None
        pred = row.get("prediction", row.get("pred"))
        label = row.get("ground_truth", row.get("label"))
        if pred is None or label is None:
            raise UserError(f"{path}:{number}: needs prediction (or pred) and ground_truth (or label)")
        scores.append(score_infinitebench(args.task, str(pred), label, args.model))
    if not scores:
        raise UserError(f"{path}: no predictions")
    score = 100 * sum(scores) / len(scores)
    print(f"{args.task}: {score:.2f} ({len(scores)} predictions)")
    if args.json:
        print(json.dumps({"task": args.task, "score": score, "n": len(scores)}))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from . import harness

    settings, records = harness.merge(args.runs, args.output)
    return _finish(harness.RunDir(args.output), settings, records, _suite_module(settings["suite"]).report)


def _cmd_perplexity(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from .perplexity import perplexity

    text = Path(args.file).read_text(encoding="utf-8")
    if not text.strip():
        raise UserError(f"{args.file} is empty")
    device = base._check_device(args.device)
    llm = base._load(args, device, base._engine_config(args, device))
    ids = llm.tokenizer.encode(text)
    runner = llm.engine.runner
    result = perplexity(runner.model, ids, args.context, args.stride, runner.kv_format, runner.cache.rotation)
    print(json.dumps(dataclasses.asdict(result)) if args.json else result.line())
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .harness import RunDir

    reports = [RunDir(r).report() for r in args.runs]
    names = [Path(r).name for r in args.runs]
    rows: dict[str, list[Any]] = {}
    for i, report in enumerate(reports):
        for key, value in report.get("scores", {}).items():
            rows.setdefault(key, [None] * len(reports))[i] = value
    if args.json:
        print(json.dumps({"runs": names, "scores": rows}))
        return 0
    settings = [r.get("settings", {}) for r in reports]
    print("| | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for label, key in (("suite", "suite"), ("model", "model_name"), ("style", "style"), ("budget", "max_length")):
        if any(key in s for s in settings):
            print(f"| {label} | " + " | ".join(str(s.get(key, "")) for s in settings) + " |")
    print("| targets | " + " | ".join(", ".join(s.get("targets") or []) for s in settings) + " |")
    for key, values in rows.items():
        print(f"| {key} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in values) + " |")
    return 0

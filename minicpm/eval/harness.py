"""The evaluation harness: work items, targets that answer them, and run directories that survive
interruptions, shards and merges.

Contract:

* An :class:`Item` is one prompt of a suite, already tokenized with the evaluated model's tokenizer
  (``prompt_ids``: the exact prompt, chat wrapper included) and, for chat prompts, the
  ``messages`` a chat endpoint gets instead. ``index`` is its place in the suite's work order,
  which is deterministic; ``group`` names its predictions file.
* A :class:`Target` answers items greedily: the in-process engine (:class:`EngineTarget`), an
  OpenAI-compatible endpoint (:class:`EndpointTarget`: chat prompts to ``/v1/chat/completions``,
  raw prompts as token ids to ``/v1/completions``), or a Ray actor replica (:func:`ray_targets`).
* :func:`run` sends the items not yet done to every target at once, each up to its
  ``concurrency``; faster targets take more. An endpoint whose request still fails after
  retries is dropped and its items go to the others; a request the endpoint refuses as a client
  error (4xx) is an item error, reported, and left undone so that a rerun tries it again.
* A :class:`RunDir` holds ``run.json`` (the settings) and ``preds_<group>.jsonl``: one line per
  finished item, appended (and flushed) as it finishes, in the benchmark's own shape (``id``,
  ``prediction``, ``ground_truth``) plus ``index``, ``prompt_tokens``, ``output_tokens``,
  ``finish_reason`` and ``score``. A rerun with the same settings skips what is done; a line cut
  short by a kill is dropped. When every item is done the files are rewritten in index order, so
  an interrupted and resumed run ends with the same files as an uninterrupted one.
* ``--shard I/N`` keeps the items whose index is I mod N; :func:`merge` combines the shards' run
  directories into one, refusing shards of different settings, missing shards or missing items.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fileio import write_text_atomic, writing

log = logging.getLogger("minicpm")

# settings that may change between a run and its resumption (they don't change the answers)
VOLATILE_SETTINGS = ("targets", "shard", "wall_time_s")


@dataclasses.dataclass
class Item:
    index: int
    group: str
    id: Any
    prompt_ids: list[int]
    messages: list[dict[str, str]] | None  # the chat turns (chat endpoints); None: a raw prompt
    max_new_tokens: int
    ground_truth: Any
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Generation:
    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str | None


class ItemError(Exception):
    """The target refused this item (a client error): it stays undone."""


class AllTargetsFailedError(RuntimeError):
    """Every target failed; what was done is saved."""


class TargetDownError(Exception):
    """The target failed (after retries): its items go to the others."""


class Target:
    """Something that answers items greedily, ``concurrency`` at a time."""

    name = "target"
    concurrency = 1

    async def generate(self, item: Item) -> Generation:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


# ------------------------------------------------------------------------------------- targets
class EngineTarget(Target):
    """The in-process engine (an :class:`~minicpm.llm.LLM`), through a background engine thread."""

    def __init__(self, llm: Any, concurrency: int | None = None, name: str = "engine") -> None:
        from ..engine.async_engine import BackgroundEngine

        self.llm = llm
        self.name = name
        self.engine = BackgroundEngine(llm.engine)
        # keep the scheduler fed: a full batch running and as many waiting
        self.concurrency = concurrency or 2 * llm.engine.config.max_num_seqs

    async def generate(self, item: Item) -> Generation:
        from ..engine.async_engine import EngineError
        from ..sampling import SamplingParams

        params = SamplingParams(max_new_tokens=item.max_new_tokens, temperature=0.0)
        parts, last = [], None
        try:
            async for out in self.engine.generate(item.prompt_ids, params):
                parts.append(out.text)
                last = out
        except ValueError as exc:  # e.g. a prompt longer than the engine's context
            raise ItemError(str(exc)) from None
        except EngineError as exc:  # the engine failed (it aborted everything in flight)
            raise TargetDownError(str(exc)) from None
        assert last is not None
        return Generation("".join(parts), last.prompt_tokens, last.output_tokens, last.finish_reason)

    async def aclose(self) -> None:
        self.engine.close()


RETRYABLE = {408, 429, 500, 502, 503, 504}


class EndpointTarget(Target):
    """An OpenAI-compatible server: chat items to ``/v1/chat/completions``, raw ones to
    ``/v1/completions`` (as token ids, so the server sees exactly the prompt we measured)."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        retries: int = 3,
        backoff: float = 1.0,
        timeout: float = 3600.0,
        transport: Any = None,
    ) -> None:
        import httpx

        self.url = url.rstrip("/")
        for suffix in ("/v1/chat/completions", "/v1/completions", "/v1"):
            self.url = self.url.removesuffix(suffix)
        self.name = self.url
        self.model = model
        self.concurrency = concurrency
        self.retries, self.backoff = retries, backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=30.0),
            limits=httpx.Limits(max_connections=concurrency),
            transport=transport,
        )

    async def _model(self) -> str:
        if self.model is None:
            r = await self._post_or_get("GET", "/v1/models", None)
            try:
                self.model = r["data"][0]["id"]
            except (KeyError, IndexError, TypeError):
                raise TargetDownError(f"{self.url}/v1/models lists no model: give --served-model") from None
        return self.model

    async def _post_or_get(self, method: str, path: str, body: dict | None) -> dict:
        import httpx

        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = await self.client.request(method, path, json=body)
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
                continue
            if r.status_code == 200:
                try:
                    return r.json()
                except ValueError:
                    error = "the answer is not JSON"
                    continue
            message = _error_message(r)
            if r.status_code not in RETRYABLE:
                if r.status_code in (401, 403, 404):  # a wrong key, model or URL fails every item alike
                    raise TargetDownError(f"{self.url}{path}: HTTP {r.status_code}: {message}")
                raise ItemError(f"{self.url}{path}: HTTP {r.status_code}: {message}")
            error = f"HTTP {r.status_code}: {message}"
        raise TargetDownError(f"{self.url}{path}: {error} (after {self.retries + 1} attempts)")

    async def generate(self, item: Item) -> Generation:
        body: dict[str, Any] = {
            "model": await self._model(),
            "max_tokens": item.max_new_tokens,
            "temperature": 0.0,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
        }
        if item.messages is not None:
            path = "/v1/chat/completions"
            body["messages"] = item.messages
        else:
            path = "/v1/completions"
            body["prompt"] = item.prompt_ids
        r = await self._post_or_get("POST", path, body)
        try:
            choice = r["choices"][0]
            text = choice["message"]["content"] if item.messages is not None else choice["text"]
            usage = r.get("usage") or {}
            return Generation(
                text or "",
                usage.get("prompt_tokens", 0),
                usage.get("completion_tokens", 0),
                choice.get("finish_reason"),
            )
        except (KeyError, IndexError, TypeError):
            raise TargetDownError(f"{self.url}{path}: the answer is not an OpenAI completion: {str(r)[:200]}") from None

    async def aclose(self) -> None:
        await self.client.aclose()


def _error_message(response: Any) -> str:
    try:
        body = response.json()
        error = body.get("error", body)
        return str(error.get("message", error) if isinstance(error, dict) else error)[:300]
    except (ValueError, AttributeError):
        return response.text[:300]


class _Replica:
    """One engine in a Ray actor (:func:`ray_targets`)."""

    def __init__(self, model: str | None, dtype: str | None, device: str | None, engine: dict[str, Any]) -> None:
        from ..engine import EngineConfig
        from ..llm import LLM

        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        config = EngineConfig.for_device(device, **engine)
        self.target = EngineTarget(LLM.from_pretrained(model, dtype=dtype, device=device, engine_config=config))

    def concurrency(self) -> int:
        return self.target.concurrency

    async def generate(self, item: Item) -> Generation:
        return await self.target.generate(item)


class RayTarget(Target):
    def __init__(self, actor: Any, name: str, concurrency: int) -> None:
        self.actor, self.name, self.concurrency = actor, name, concurrency

    async def generate(self, item: Item) -> Generation:
        import ray

        try:
            return await self.actor.generate.remote(item)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, Exception) else exc
            if isinstance(cause, ItemError):
                raise cause from None
            raise TargetDownError(f"{type(cause).__name__}: {cause}") from None
        except ray.exceptions.RayActorError as exc:
            raise TargetDownError(f"the actor died: {exc}") from None

    async def aclose(self) -> None:
        import ray

        ray.kill(self.actor)


def ray_targets(
    n: int, model: str | None, dtype: str | None, device: str | None, engine: dict[str, Any]
) -> list[RayTarget]:
    """``n`` engine replicas as Ray actors on the cluster at ``$RAY_ADDRESS``, else a local one;
    one GPU each where the cluster has GPUs."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'minicpm[ray]'") from None
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, ignore_reinit_error=True, log_to_driver=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus and n > gpus:
        raise UserError(f"--ray {n}: the Ray cluster has {gpus:.0f} GPU(s)")
    actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)(_Replica)
    replicas = [actor.remote(model, dtype, device, engine) for _ in range(n)]
    sizes = ray.get([r.concurrency.remote() for r in replicas])
    return [RayTarget(r, f"ray:{i}", c) for i, (r, c) in enumerate(zip(replicas, sizes, strict=True))]


# ----------------------------------------------------------------------------------- run dirs
def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=False)


class RunDir:
    """A run's directory: ``run.json`` and the ``preds_<group>.jsonl`` files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def settings_file(self) -> Path:
        return self.path / "run.json"

    def settings(self) -> dict[str, Any]:
        try:
            return json.loads(self.settings_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{self.path}: not a run directory (no run.json)") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{self.settings_file}: not valid JSON ({exc})") from None

    def begin(self, settings: dict[str, Any]) -> None:
        """Start or resume: a directory holding a run of other settings is refused."""
        if self.settings_file.exists():
            old = self.settings()
            diff = [
                k
                for k in sorted(set(old) | set(settings))
                if k not in VOLATILE_SETTINGS and old.get(k) != settings.get(k)
            ]
            if diff:
                shown = "; ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in diff[:4])
                raise UserError(f"{self.path} holds a run with other settings ({shown}): give another --output")
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.settings_file, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")

    def pred_files(self) -> list[Path]:
        return sorted(self.path.glob("preds_*.jsonl"))

    def records(self) -> dict[int, dict[str, Any]]:
        """Finished items by index; a last line cut short (a kill mid-write) is removed."""
        done: dict[int, dict[str, Any]] = {}
        for path in self.pred_files():
            data = path.read_bytes()
            good = data.rfind(b"\n") + 1
            if good < len(data):  # an unterminated last line
                with path.open("r+b") as f:
                    f.truncate(good)
            for number, line in enumerate(data[:good].decode("utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    done[int(record["index"])] = record
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"{path}:{number}: not a prediction line of this harness") from None
        return done

    def finalize(self, records: Iterable[dict[str, Any]]) -> None:
        """Rewrite every predictions file in index order."""
        groups: dict[str, list[dict[str, Any]]] = {}
        for record in sorted(records, key=lambda r: r["index"]):
            groups.setdefault(record["group"], []).append(record)
        for group, rows in groups.items():
            write_text_atomic(self.path / f"preds_{group}.jsonl", "".join(_dumps(r) + "\n" for r in rows))

    def write_report(self, report: dict[str, Any], markdown: str) -> None:
        write_text_atomic(self.path / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        write_text_atomic(self.path / "report.md", markdown)

    def report(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "report.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{self.path}: no report.json (the run is not finished, or not merged)") from None


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text}: expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard {text}: I must be in [0, N)")
    return i, n


def select_shard(items: Sequence[Item], shard: tuple[int, int] | None) -> list[Item]:
    if shard is None:
        return list(items)
    i, n = shard
    return [item for item in items if item.index % n == i]


# ------------------------------------------------------------------------------------- running
def make_record(item: Item, gen: Generation, score: float) -> dict[str, Any]:
    return {
        "index": item.index,
        "group": item.group,
        "id": item.id,
        "prediction": gen.text,
        "ground_truth": item.ground_truth,
        "prompt_tokens": gen.prompt_tokens or len(item.prompt_ids),
        "output_tokens": gen.output_tokens,
        "finish_reason": gen.finish_reason,
        "score": score,
        **item.meta,
    }


async def _dispatch(
    items: Sequence[Item], targets: Sequence[Target], done: Callable[[Item, Generation], None]
) -> list[tuple[Item, str]]:
    """Every item to some target; returns the item errors. Raises RuntimeError if every target failed."""
    queue: deque[Item] = deque(items)
    alive = {id(t) for t in targets}
    failures: list[str] = []
    errors: list[tuple[Item, str]] = []
    in_flight = 0
    changed = asyncio.Condition()

    async def worker(target: Target) -> None:
        nonlocal in_flight
        while id(target) in alive:
            async with changed:
                while not queue and in_flight:
                    await changed.wait()
                if not queue:
                    return
                item = queue.popleft()
                in_flight += 1
            try:
                gen = await target.generate(item)
            except ItemError as exc:
                errors.append((item, str(exc)))
            except TargetDownError as exc:
                queue.appendleft(item)
                if id(target) in alive:
                    alive.discard(id(target))
                    failures.append(f"{target.name}: {exc}")
                    log.warning("eval: %s failed (%s); its work goes to the others", target.name, exc)
            else:
                done(item, gen)
            async with changed:
                in_flight -= 1
                changed.notify_all()

    await asyncio.gather(*(worker(t) for t in targets for _ in range(max(1, t.concurrency))))
    if queue:
        raise AllTargetsFailedError(f"every target failed, {len(queue)} item(s) left undone: " + "; ".join(failures))
    return errors


def run(
    items: Sequence[Item],
    targets: Sequence[Target],
    run_dir: RunDir,
    score: Callable[[Item, str], float],
    progress: bool = True,
    description: str = "eval",
) -> tuple[dict[int, dict[str, Any]], list[tuple[Item, str]]]:
    """Answer the items not yet in ``run_dir``, appending each as it finishes; returns all the
    records (old and new) and the item errors. Finalizes the files when nothing is left."""
    run_dir.path.mkdir(parents=True, exist_ok=True)
    records = run_dir.records()
    todo = [item for item in items if item.index not in records]
    errors: list[tuple[Item, str]] = []
    if todo:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=description, unit="prompt", smoothing=0.1)
        files: dict[str, Any] = {}
        mine = {item.index for item in items}
        scores = [r["score"] for r in records.values() if r["index"] in mine]

        def done(item: Item, gen: Generation) -> None:
            record = make_record(item, gen, float(score(item, gen.text)))
            path = run_dir.path / f"preds_{item.group}.jsonl"
            f = files.get(item.group)
            with writing(path):
                if f is None:
                    f = files[item.group] = path.open("ab", buffering=0)
                end = f.tell()
                line = memoryview((_dumps(record) + "\n").encode("utf-8"))
                try:  # unbuffered, one line at a time: a kill leaves whole lines (or a cut last one, dropped on resume)
                    while line:
                        line = line[f.write(line) :]
                except OSError:  # e.g. a full disk: take the cut line back before the error goes up
                    f.truncate(end)
                    raise
            records[item.index] = record
            scores.append(record["score"])
            if bar is not None:
                bar.set_postfix(score=f"{100 * sum(scores) / len(scores):.1f}", refresh=False)
                bar.update(1)

        async def main() -> list[tuple[Item, str]]:
            try:
                return await _dispatch(todo, targets, done)
            finally:
                for t in targets:
                    with contextlib.suppress(Exception):
                        await t.aclose()

        try:
            errors = asyncio.run(main())
        finally:
            for f in files.values():
                f.close()
            if bar is not None:
                bar.close()
    else:
        for t in targets:
            with contextlib.suppress(Exception):
                asyncio.run(t.aclose())
    if all(item.index in records for item in items):
        run_dir.finalize(records.values())
    return records, errors


def merge(dirs: Sequence[str | Path], out: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Combine shard run directories; returns the merged settings and records (in index order)."""
    if not dirs:
        raise UserError("give the run directories to merge")
    runs = [RunDir(d) for d in dirs]
    settings = [r.settings() for r in runs]
    base = {k: v for k, v in settings[0].items() if k not in VOLATILE_SETTINGS}
    for r, s in zip(runs[1:], settings[1:], strict=True):
        other = {k: v for k, v in s.items() if k not in VOLATILE_SETTINGS}
        if other != base:
            diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
            raise UserError(f"{r.path} was run with other settings than {runs[0].path}: {', '.join(diff)}")
    shards = [tuple(s["shard"]) if s.get("shard") else (0, 1) for s in settings]
    n = shards[0][1]
    if any(s[1] != n for s in shards):
        raise UserError(
            "the runs were split into different numbers of shards: " + ", ".join(f"{i}/{k}" for i, k in shards)
        )
    missing = sorted(set(range(n)) - {i for i, _ in shards})
    if missing:
        raise UserError(f"shard(s) {', '.join(f'{i}/{n}' for i in missing)} missing")
    records: dict[int, dict[str, Any]] = {}
    for r in runs:
        for index, record in r.records().items():
            if index in records and records[index]["prediction"] != record["prediction"]:
                raise UserError(f"item {index} has different predictions in two of the runs")
            records[index] = record
    total = base.get("num_items")
    if total is not None and len(records) < total:
        raise UserError(f"the shards hold {len(records)} of {total} items: finish (rerun) the unfinished shards")
    merged = RunDir(out)
    if merged.path.resolve() in {r.path.resolve() for r in runs}:
        raise UserError("--output must be a new directory, not one of the shards")
    settings_out = dict(base, shard=None, merged_from=[str(r.path) for r in runs])
    settings_out["wall_time_s"] = sum(s.get("wall_time_s") or 0 for s in settings)
    merged.begin(settings_out)
    ordered = [records[i] for i in sorted(records)]
    merged.finalize(ordered)
    return settings_out, ordered


class Timer:
    """Wall time of a run, added across resumptions."""

    def __init__(self, previous: float = 0.0) -> None:
        self.start, self.previous = time.monotonic(), previous

    @property
    def total(self) -> float:
        return self.previous + time.monotonic() - self.start

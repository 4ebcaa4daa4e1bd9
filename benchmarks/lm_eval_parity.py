"""lm-evaluation-harness through ``minicpm serve`` against lm-eval on transformers, item by item.

A local multiple-choice task (no hub: the items are generated here) is run twice with lm-eval:
``--model local-completions`` against a ``minicpm serve`` started here, and ``--model hf`` on the
same float32 weights (the embedded SmolLM2-135M-Instruct dequantized, or ``--model DIR``). Both
write their samples (``--log_samples``); every item's every choice's loglikelihood is compared.

The items are chat-formatted questions (the model's chat template, one user turn) whose choices
are short sentences: "What is the capital of Japan?" / "The capital of Japan is Tokyo.", additions,
the day or month after another, the largest of four numbers, opposites. After such a sentence the
model's greedy next token is its end of sequence (``<|im_end|>``), the case lm-eval's scoring
(``echo``, ``logprobs: 1``, ``max_tokens: 1``, then ``token_logprobs[ctxlen:-1]``) depends on: the
server must return exactly one generated entry after the prompt's, end of sequence or not.

Prints the items, the loglikelihoods compared, how many differ by more than ``--tolerance``, the
largest difference, acc and acc_norm from each run, each run's wall time, and one JSON object as
the last line; exits 1 if a loglikelihood differs beyond the tolerance. ``--peer-commit REV`` also
runs the server of git revision REV (its files from ``git archive``) on the same task, e.g. the
revision before end of sequence became a generated token:

    python benchmarks/lm_eval_parity.py --items 100 --peer-commit 2f146cc

Needs ``lm-eval[api,hf]`` (the test extra installs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = "minicpm_mc"
HF = "transformers (lm_eval --model hf)"

# ------------------------------------------------------------------------------------ the items
CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Germany": "Berlin",
    "Spain": "Madrid",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Russia": "Moscow",
    "China": "Beijing",
    "India": "New Delhi",
    "Mexico": "Mexico City",
    "Kenya": "Nairobi",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Ireland": "Dublin",
    "Poland": "Warsaw",
    "Argentina": "Buenos Aires",
    "Turkey": "Ankara",
    "Thailand": "Bangkok",
    "Peru": "Lima",
    "Austria": "Vienna",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "day": "night",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "open": "closed",
    "full": "empty",
    "hard": "soft",
    "high": "low",
    "early": "late",
    "wet": "dry",
    "loud": "quiet",
    "rich": "poor",
    "strong": "weak",
    "thick": "thin",
    "long": "short",
    "left": "right",
    "inside": "outside",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def _capitals(rng: random.Random) -> Iterator[tuple[str, str, list[str]]]:
    countries = list(CAPITALS)
    rng.shuffle(countries)
    for country in countries:
        others = rng.sample([c for k, c in CAPITALS.items() if k != country], 3)
        say = f"The capital of {country} is {{}}."
        yield f"What is the capital of {country}?", say.format(CAPITALS[country]), [say.format(o) for o in others]


def _additions(rng: random.Random) -> Iterator[tuple[str, str, list[str]]]:
    while True:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        c = a + b
        wrong = rng.sample([c - 10, c - 2, c - 1, c + 1, c + 2, c + 10], 3)
        yield f"What is {a} + {b}?", f"{a} + {b} = {c}.", [f"{a} + {b} = {w}." for w in wrong]


def _next_in(names: list[str], kind: str, rng: random.Random) -> Iterator[tuple[str, str, list[str]]]:
    order = list(range(len(names)))
    rng.shuffle(order)
    for i in order:
        name, right = names[i], names[(i + 1) % len(names)]
        others = rng.sample([n for n in names if n not in (name, right)], 3)
        say = f"The {kind} after {name} is {{}}."
        yield f"Which {kind} comes after {name}?", say.format(right), [say.format(o) for o in others]


def _largest(rng: random.Random) -> Iterator[tuple[str, str, list[str]]]:
    while True:
        numbers = rng.sample(range(10, 100), 4)
        listed = f"{numbers[0]}, {numbers[1]}, {numbers[2]} or {numbers[3]}"
        top = max(numbers)
        say = "The largest number is {}."
        wrong = [say.format(n) for n in numbers if n != top]
        yield f"Which number is the largest: {listed}?", say.format(top), wrong


def _opposites(rng: random.Random) -> Iterator[tuple[str, str, list[str]]]:
    words = list(OPPOSITES)
    rng.shuffle(words)
    for word in words:
        others = rng.sample([o for w, o in OPPOSITES.items() if w != word], 3)
        say = f"The opposite of {word} is {{}}."
        yield f"What is the opposite of {word}?", say.format(OPPOSITES[word]), [say.format(o) for o in others]


def make_items(n: int, seed: int = 0) -> list[dict]:
    """``n`` questions with four one-sentence choices (the right one at a random place), taken in
    turn from the kinds above; each kind's questions in a seeded order."""
    rng = random.Random(seed)
    kinds = [
        _capitals(rng),
        _additions(rng),
        _next_in(DAYS, "day", rng),
        _largest(rng),
        _opposites(rng),
        _next_in(MONTHS, "month", rng),
    ]
    items: list[dict] = []
    while len(items) < n and kinds:
        for kind in list(kinds):
            if len(items) == n:
                break
            try:
                question, right, wrong = next(kind)
            except StopIteration:
                kinds.remove(kind)
                continue
            choices = [right, *wrong]
            rng.shuffle(choices)
            items.append({"question": question, "choices": choices, "label": choices.index(right)})
    if len(items) < n:
        raise ValueError(f"at most {len(items)} distinct items can be made")
    return items


def write_task(folder: Path, items: list[dict], tokenizer_dir: str | Path) -> Path:
    """The items as a jsonl file (each question in the model's chat template, as lm-eval's
    context) and a task YAML over it, in ``folder`` (give it to lm-eval as ``--include_path``)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for item in items:
            chat = [{"role": "user", "content": item["question"]}]
            context = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            f.write(json.dumps({"context": context, **item}) + "\n")
    # the context ends with "assistant\n" and a choice follows it directly (no " " between them)
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    return folder


def eos_is_next(model_dir: str | Path, task_dir: Path, right_only: bool = False, batch: int = 32) -> list[bool]:
    """For every item and choice of the task (``right_only``: its right choice): is the end of
    sequence the greedy next token after the context and the choice, in transformers (float32)?"""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    docs = [json.loads(line) for line in (task_dir / f"{TASK}.jsonl").read_text(encoding="utf-8").splitlines()]
    texts = [
        doc["context"] + choice
        for doc in docs
        for i, choice in enumerate(doc["choices"])
        if not right_only or i == doc["label"]
    ]
    out = []
    for start in range(0, len(texts), batch):
        rows = [tok(t, add_special_tokens=False).input_ids for t in texts[start : start + batch]]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # right-padded: causal, so no effect
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.no_grad():
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            last = model.lm_head(hidden[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])])
        out += (last.argmax(-1) == tok.eos_token_id).tolist()
    return out


# ------------------------------------------------------------------------------ running lm-eval
def lm_eval_env(work: Path) -> dict[str, str]:
    """No hub, and the datasets cache under ``work``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(work / "datasets-cache"),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


class LmEval:
    """``python -m lm_eval`` on the task in the background, its samples logged under ``out``;
    :meth:`result` waits for it."""

    def __init__(self, model: str, model_args: dict, task_dir: Path, out: Path, extra: Sequence[str] = ()) -> None:
        args = ",".join(f"{k}={v}" for k, v in model_args.items())
        cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", args, "--tasks", TASK]
        cmd += ["--include_path", str(task_dir), "--log_samples", "--output_path", str(out), *extra]
        self.model, self.out = model, out
        out.mkdir(parents=True, exist_ok=True)
        self.log = out / "lm_eval.log"
        self.start = time.perf_counter()
        with self.log.open("wb") as log:  # a file, not a pipe nobody reads while it runs
            self.proc = subprocess.Popen(cmd, cwd=out, env=lm_eval_env(out), stdout=log, stderr=subprocess.STDOUT)

    def __enter__(self) -> LmEval:
        return self

    def __exit__(self, *exc: object) -> None:
        """Stops it if it is still running (the caller failed before :meth:`result`)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def result(self) -> dict:
        """{"lls": {doc_id: [(loglikelihood, is_greedy) per choice]}, "acc", "acc_norm", "seconds"};
        raises with lm-eval's output if it failed."""
        rc = self.proc.wait()
        seconds = time.perf_counter() - self.start
        if rc != 0:
            tail = self.log.read_text(encoding="utf-8", errors="replace")[-4000:]
            raise RuntimeError(f"lm_eval --model {self.model} exited {rc}:\n{tail}")
        samples = sorted(self.out.rglob(f"samples_{TASK}_*.jsonl"))
        results = sorted(self.out.rglob("results_*.json"))
        if len(samples) != 1 or len(results) != 1:
            raise RuntimeError(f"expected one samples and one results file under {self.out}: {samples + results}")
        lls = {}
        for line in samples[0].read_text(encoding="utf-8").splitlines():
            s = json.loads(line)
            lls[s["doc_id"]] = [(float(ll), greedy in (True, "True")) for ll, greedy in s["filtered_resps"]]
        metrics = json.loads(results[0].read_text(encoding="utf-8"))["results"][TASK]
        return {"lls": lls, "acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"], "seconds": seconds}


def run_lm_eval(model: str, model_args: dict, task_dir: Path, out: Path, extra: Sequence[str] = ()) -> dict:
    """:class:`LmEval` to the end."""
    return LmEval(model, model_args, task_dir, out, extra).result()


def compare(run: dict, reference: dict, tolerance: float) -> dict:
    """Per item and choice: how many loglikelihoods differ by more than ``tolerance``, the largest
    difference, how many is_greedy flags differ, and on how many items the best choice differs."""
    if run["lls"].keys() != reference["lls"].keys():
        raise ValueError("the two runs scored different items")
    diffs, greedy, answers = [], 0, 0
    for doc, ref in reference["lls"].items():
        got = run["lls"][doc]
        if len(got) != len(ref):
            raise ValueError(f"item {doc}: {len(got)} choices scored against {len(ref)}")
        diffs += [abs(a - b) for (a, _), (b, _) in zip(got, ref, strict=True)]
        greedy += sum(ga != gb for (_, ga), (_, gb) in zip(got, ref, strict=True))
        answers += _argmax([ll for ll, _ in got]) != _argmax([ll for ll, _ in ref])
    return {
        "compared": len(diffs),
        "over_tolerance": sum(d > tolerance for d in diffs),
        "max_abs_diff": max(diffs),
        "is_greedy_differs": greedy,
        "answers_differ": answers,
    }


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


@contextlib.contextmanager
def minicpm_server(model_dir: str | Path, name: str, source: Path = ROOT, log: Path | None = None) -> Iterator[str]:
    """``minicpm serve`` of the package in ``source`` (this checkout, or an older revision's files)
    on a free port, float32; yields the base URL and stops it afterwards."""
    from serve_bench import _free_port, _wait_healthy

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(source), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "minicpm.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--served-model-name", name, "--dtype", "float32", "--quantize", "none"]
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(log, "wb")) if log else stack.enter_context(tempfile.TemporaryFile())
        # run from ``source``: ``python -m`` puts the working directory first on sys.path
        proc = subprocess.Popen(cmd, cwd=source, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            try:
                _wait_healthy(url, proc, timeout=180)
            except RuntimeError as exc:
                out.flush()
                text = Path(log).read_text(errors="replace") if log else ""
                raise RuntimeError(f"minicpm serve from {source}: {exc}\n{text[-3000:]}") from None
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def server_model_args(url: str, name: str, tokenizer: str | Path, concurrent: int) -> dict:
    return {
        "model": name,
        "base_url": f"{url}/v1/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": str(tokenizer),
        "num_concurrent": concurrent,
        "max_retries": 1,
    }


def hf_model_args(model_dir: str | Path) -> dict:
    return {"pretrained": str(model_dir), "dtype": "float32"}


# ------------------------------------------------------------------------------------------ main
def _revision_files(rev: str, into: Path) -> Path:
    """The files of git revision ``rev`` of this repository (``git archive``: no worktree made)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=100, help="questions, four choices each (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="float checkpoint directory (default: the embedded model in float32)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest absolute difference allowed")
    p.add_argument("--num-concurrent", type=int, default=4, help="lm-eval's concurrent requests to the server")
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size for the hf model")
    p.add_argument("--peer-commit", default=None, metavar="REV", help="also run the server of git revision REV")
    p.add_argument("--keep", default=None, metavar="DIR", help="write the task, samples and logs here (kept)")
    args = p.parse_args(argv)

    if args.model is None:
        from gguf_peer import float_checkpoint

        model_dir = float_checkpoint()
    else:
        model_dir = Path(args.model)
    name = "minicpm-parity"
    items = make_items(args.items, args.seed)
    with contextlib.ExitStack() as stack:
        work = Path(args.keep) if args.keep else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        task = write_task(work / "task", items, model_dir)
        eos = eos_is_next(model_dir, task)
        runs: dict[str, dict] = {}
        servers = [("minicpm serve", ROOT)]
        if args.peer_commit:
            servers.append((f"minicpm serve @ {args.peer_commit}", _revision_files(args.peer_commit, work / "peer")))
        for i, (label, source) in enumerate(servers):
            started = time.perf_counter()
            with minicpm_server(model_dir, name, source, log=work / f"server{i}.log") as url:
                ready = time.perf_counter() - started
                margs = server_model_args(url, name, model_dir, args.num_concurrent)
                runs[label] = run_lm_eval("local-completions", margs, task, work / f"out-server{i}")
                runs[label]["server_start_s"] = ready
        runs[HF] = run_lm_eval(
            "hf",
            hf_model_args(model_dir),
            task,
            work / "out-hf",
            ["--device", "cpu", "--batch_size", str(args.batch_size)],
        )

    reference = runs[HF]
    rows = []
    for label, run in runs.items():
        row = {"run": label, "acc": run["acc"], "acc_norm": run["acc_norm"], "lm_eval_s": round(run["seconds"], 1)}
        if "server_start_s" in run:
            row["server_start_s"] = round(run["server_start_s"], 1)
        if run is not reference:
            row.update(compare(run, reference, args.tolerance))
        rows.append(row)
    print(
        f"task: {len(items)} questions x 4 choices = {4 * len(items)} loglikelihoods; model {model_dir} (float32); "
        f"end of sequence is transformers' greedy next token after {sum(eos)} of the {len(eos)} continuations"
    )
    head = f"{'run':<34} {'acc':>6} {'acc_norm':>8} {'> tol':>8} {'max |diff|':>10} {'answers differ':>14}"
    print(head + f" {'lm_eval s':>9} {'server start s':>14}")
    for r in rows:
        if "compared" in r:
            diff = f"{r['over_tolerance']:>4}/{r['compared']:<3} {r['max_abs_diff']:>10.2e} {r['answers_differ']:>14}"
        else:
            diff = f"{'(reference)':>34}"
        start = f"{r['server_start_s']:>14.1f}" if "server_start_s" in r else f"{'-':>14}"
        print(f"{r['run']:<34} {r['acc']:>6.3f} {r['acc_norm']:>8.3f} {diff} {r['lm_eval_s']:>9.1f} {start}")
    ours = rows[0]
    ok = ours["over_tolerance"] == 0
    print(
        f"minicpm serve vs transformers: {ours['over_tolerance']} of {ours['compared']} loglikelihoods differ by more "
        f"than {args.tolerance:g} (max {ours['max_abs_diff']:.2e}): {'PASS' if ok else 'FAIL'}"
    )
    summary = {
        "benchmark": "lm_eval_parity",
        "items": len(items),
        "choices": 4,
        "tolerance": args.tolerance,
        "model": str(model_dir),
        "dtype": "float32",
        "num_concurrent": args.num_concurrent,
        "hf_batch_size": args.batch_size,
        "eos_greedy_after": sum(eos),
        "runs": rows,
        "pass": ok,
    }
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The persistent prefix cache (``--kv-cache-dir``, minicpm.engine.kv_store) on a tiny random
model: a block's round trip, keys that separate models, KV formats, NTK bases and earlier tokens,
the same greedy tokens cold, warm and without it, files that fail a check (skipped, counted,
removed, never loaded), the size bound, two processes in turn and at once, write errors, a writer
that never holds a step up, and the command line."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
import torch
from helpers import random_model, tiny_config

from minicpm import MiniCPMForCausalLM, SamplingParams
from minicpm.engine import kv_store
from minicpm.engine.config import EngineConfig
from minicpm.engine.kv_store import DiskKVStore, first_key, model_fingerprint, next_key
from minicpm.engine.llm_engine import LLMEngine
from minicpm.errors import UserError

BLOCK = 8
TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 1) -> MiniCPMForCausalLM:
    config = tiny_config(
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, max_length=160
    )  # heads of 32: quantized KV formats run too
    return random_model(config, seed=seed)


@pytest.fixture(scope="module")
def model() -> MiniCPMForCausalLM:
    return tiny()


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def make_engine(model: MiniCPMForCausalLM, directory: Path | None, blocks: int = 40, **overrides) -> LLMEngine:
    fields = dict(
        block_size=BLOCK,
        max_num_seqs=4,
        max_num_batched_tokens=16,
        kv_cache_memory=blocks * BLOCK * model.config.kv_bytes_per_token(4),
        kv_cache_dir=str(directory) if directory is not None else None,
    )
    fields.update(overrides)
    return LLMEngine(model, None, EngineConfig(**fields))


def run(engine: LLMEngine, prompts: list[list[int]], new: int = 6) -> list[list[int]]:
    done = engine.generate(prompts, SamplingParams(max_new_tokens=new, ignore_eos=True))
    return [c.token_ids for c in done]


def block_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*/*/*{kv_store.SUFFIX}"))


def chain(engine: LLMEngine, prompt: list[int], n: int) -> list[bytes]:
    """The store keys of ``prompt``'s first ``n`` blocks, as the engine computes them."""
    seed = engine.make_request(prompt).seq.hash_seed
    keys = [first_key(engine.prefix_store.store.identity, seed, prompt[:BLOCK])]
    for i in range(1, n):
        keys.append(next_key(keys[-1], prompt[i * BLOCK : (i + 1) * BLOCK]))
    return keys


def check_file(path: Path) -> dict:
    """The header of a block file whose length and payload checksum are right (else AssertionError)."""
    data = path.read_bytes()
    magic, length = kv_store.PREFIX.unpack_from(data)
    assert magic == kv_store.MAGIC
    start = kv_store.PREFIX.size + length
    header = json.loads(data[kv_store.PREFIX.size : start])
    assert len(data) == start + header["payload"], path
    assert zlib.crc32(data[start:]) == header["crc32"], path
    assert path.stem == header["key"] and path.parent.parent.name == header["identity"][:16]
    return header


# ---------------------------------------------------------------------------------------- store
def test_a_block_round_trips_in_its_own_dtypes(tmp_path: Path) -> None:
    store = DiskKVStore(tmp_path, "ab" * 32, max_bytes=2**20)
    g = torch.Generator().manual_seed(0)
    data = {
        "k": torch.randint(-128, 127, (2, 8, 2, 7), generator=g, dtype=torch.int8),  # odd widths: offsets align
        "v": torch.randn(2, 8, 2, 16, generator=g).to(torch.bfloat16),
        "k_scale": torch.randn(2, 8, 2, 3, generator=g).to(torch.float16),
    }
    layout = {n: (t.dtype, tuple(t.shape)) for n, t in data.items()}
    key, ids = first_key(store.identity, ("seed", 1.5), list(range(8))), list(range(8))
    assert store.save(key, ids, {n: t.clone() for n, t in data.items()})
    store.flush()
    back = store.load(key, ids, layout)
    assert back is not None and all(torch.equal(back[n], data[n]) and back[n].dtype == data[n].dtype for n in data)
    assert store.load(next_key(key, ids), ids, layout) is None  # a miss is no error
    header = check_file(store.path(key))
    assert header["ids"] == ids and header["identity"] == store.identity
    store.close()
    assert store.stats() | {"bytes": 0} == dict.fromkeys(kv_store.STATS, 0) | {"hits": 1, "writes": 1}
    assert not store.save(key, ids, data)  # closed: dropped, counted
    assert store.stats()["dropped"] == 1


def test_keys_separate_models_formats_seeds_and_earlier_tokens(model: MiniCPMForCausalLM, tmp_path: Path) -> None:
    a, b = prompt_of(8, 1), prompt_of(8, 2)
    k0 = first_key("id", ("seed", 1.0), a)
    assert k0 == first_key("id", ("seed", 1.0), a)  # stable: no hash(), no process salt
    assert len({k0, first_key("id2", ("seed", 1.0), a), first_key("id", ("seed", 2.0), a)}) == 3
    assert next_key(k0, b) != next_key(first_key("id", ("seed", 1.0), [a[0] + 1, *a[1:]]), b)
    assert next_key(k0, b) != next_key(k0, [b[0] + 1, *b[1:]])

    def identity(m: MiniCPMForCausalLM, **overrides) -> str:
        engine = make_engine(m, tmp_path, **overrides)
        engine.close()
        return engine.prefix_store.store.identity

    same = tiny(seed=1)  # same weights, another object: the same digest
    assert model_fingerprint(same) == model_fingerprint(model)
    base = identity(model)
    assert identity(model) == base  # a second engine over the (now prepared) model
    assert identity(same) == base
    assert identity(tiny(seed=2)) != base  # another checkpoint of the same shape
    assert identity(model, kv_cache_dtype="int8") != base
    assert identity(model, block_size=16) != base
    assert len({p.name for p in tmp_path.iterdir() if p.is_dir()}) == 0  # nothing written by merely opening


def test_engine_settings_are_validated() -> None:
    with pytest.raises(UserError, match="'kv_cache_dir_bytes'"):
        EngineConfig(kv_cache_dir_bytes=10)
    with pytest.raises(UserError, match="'kv_cache_dir_bytes'"):
        EngineConfig(kv_cache_dir="x", kv_cache_dir_bytes=0)
    with pytest.raises(UserError, match=r"'kv_cache_dir'.*'enable_prefix_caching'"):
        EngineConfig(kv_cache_dir="x", enable_prefix_caching=False)
    with pytest.raises(UserError, match="'kv_cache_dir'"):
        EngineConfig(kv_cache_dir="")
    assert EngineConfig(kv_cache_dir=Path("d")).kv_cache_dir == "d"


# ---------------------------------------------------------------------------------------- engine
def test_same_greedy_tokens_cold_warm_and_without(model: MiniCPMForCausalLM, tmp_path: Path) -> None:
    doc = prompt_of(61, 5)  # 7 full blocks and a part
    prompts = [doc, doc[:40] + prompt_of(20, 6), prompt_of(13, 7)]  # a shared prefix; a short prompt
    expected = run(make_engine(model, None), prompts)
    cold = make_engine(model, tmp_path)
    assert run(cold, prompts) == expected
    cold.close()
    written = cold.stats()["kv_store_writes"]
    assert written == 7 + 2  # doc's 7 blocks, the second prompt's 2 after the shared 5; none of the short one
    assert len(block_files(tmp_path)) == written

    warm = make_engine(model, tmp_path)
    done = warm.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert [c.token_ids for c in done] == expected
    s = warm.stats()
    assert s["kv_store_hits"] == 7 + 2 and s["kv_store_writes"] == 0 and s["kv_store_skipped"] == 0
    assert [c.cached_tokens for c in done] == [56, 56, 0]  # the second: 5 blocks from disk or memory, 2 from disk
    assert s["cached_prompt_tokens"] == 112
    # n choices and preemption over a warm store: the in-memory prefix cache takes the rest
    small = make_engine(model, tmp_path, blocks=12)
    assert run(small, [doc, doc, prompts[1]], new=12) == run(
        make_engine(model, None, blocks=12), [doc, doc, prompts[1]], 12
    )
    assert small.stats()["kv_store_skipped"] == 0


def test_scoring_a_prompt_never_reads_the_store(model: MiniCPMForCausalLM, tmp_path: Path) -> None:
    doc = prompt_of(40, 8)
    warmup = make_engine(model, tmp_path)
    run(warmup, [doc])
    warmup.close()
    engine = make_engine(model, tmp_path)
    done = engine.generate([doc], SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=0))[0]
    assert engine.stats()["kv_store_hits"] == 0 and done.cached_tokens == 0


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))


def _other_identity(path: Path) -> None:
    header = check_file(path)
    path.write_bytes(path.read_bytes().replace(header["identity"].encode(), b"0" * 64, 1))


CORRUPTIONS = {
    "flipped payload byte": _flip_byte,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-100]),
    "header only": lambda p: p.write_bytes(p.read_bytes()[:20]),
    "another identity": _other_identity,
    "not a block file": lambda p: p.write_bytes(b"hello " * 100),
    "far too large": lambda p: p.write_bytes(p.read_bytes() + bytes(2**21)),  # refused unread
}


@pytest.mark.parametrize("kind", [*CORRUPTIONS, "another block renamed into place"])
def test_a_bad_file_is_skipped_counted_removed_and_rewritten(
    model: MiniCPMForCausalLM, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    doc = prompt_of(50, 9)  # 6 full blocks
    expected = run(make_engine(model, None), [doc])
    cold = make_engine(model, tmp_path)
    run(cold, [doc])
    cold.close()
    keys = chain(cold, doc, 6)
    bad = cold.prefix_store.store.path(keys[3])
    if kind in CORRUPTIONS:
        CORRUPTIONS[kind](bad)
    else:
        shutil.copy(cold.prefix_store.store.path(keys[1]), bad)  # block 1's file under block 3's name
    warm = make_engine(model, tmp_path)
    with caplog.at_level(logging.WARNING, logger="minicpm.engine"):
        done = warm.generate([doc], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    assert done.token_ids == expected[0]
    s = warm.stats()
    assert s["kv_store_skipped"] == 1 and s["kv_store_hits"] == 3 and done.cached_tokens == 3 * BLOCK
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "removed" in warnings[0]
    warm.close()
    assert warm.stats()["kv_store_writes"] == 3  # computed again, stored again
    for path in block_files(tmp_path):
        check_file(path)


def test_the_directory_stays_under_its_bound_keeping_the_recently_used(tmp_path: Path) -> None:
    store = DiskKVStore(tmp_path, "cd" * 32, max_bytes=2**30)  # bound set below, from one file's size
    data = {"k": torch.randn(2, 8, 2, 16), "v": torch.randn(2, 8, 2, 16)}
    layout = {n: (t.dtype, tuple(t.shape)) for n, t in data.items()}
    keys = [first_key(store.identity, "s", [i] * 8) for i in range(30)]
    store.save(keys[0], [0] * 8, {n: t.clone() for n, t in data.items()})
    store.flush()
    size = store.path(keys[0]).stat().st_size
    store.max_bytes = 10 * size
    for i in range(1, 30):
        store.save(keys[i], [i] * 8, {n: t.clone() for n, t in data.items()})
        store.flush()  # one at a time: each file newer than the last
        if i % 5 == 0:
            assert store.load(keys[0], [0] * 8, layout) is not None  # block 0 stays in use
    store.close()
    files = block_files(tmp_path)
    assert sum(p.stat().st_size for p in files) <= 10 * size == store.max_bytes
    assert store.stats()["bytes"] == sum(p.stat().st_size for p in files)
    survivors = {p.stem for p in files}
    assert keys[0].hex() in survivors and keys[29].hex() in survivors and keys[28].hex() in survivors
    assert keys[1].hex() not in survivors and store.stats()["evicted"] == 30 - len(files)


def test_a_full_disk_is_counted_and_serving_goes_on(
    model: MiniCPMForCausalLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class FullDisk:
        def __getattr__(self, name: str) -> object:
            return getattr(os, name)

        @staticmethod
        def replace(src: object, dst: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    doc = prompt_of(50, 10)
    expected = run(make_engine(model, None), [doc, doc[:30]])
    monkeypatch.setattr(kv_store, "os", FullDisk())
    engine = make_engine(model, tmp_path)
    with caplog.at_level(logging.WARNING, logger="minicpm.engine"):
        assert run(engine, [doc]) == expected[:1]
        engine.prefix_store.store.flush()
        assert run(engine, [doc[:30]]) == expected[1:]  # still serving
        engine.close()
    s = engine.stats()
    # doc's 6 blocks, then doc[:30]'s 3 (in memory: not computed again, but tried again on disk)
    assert s["kv_store_write_errors"] == 6 + 3 and s["kv_store_writes"] == 0
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []  # no file, no temporary file left
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]


def test_steps_never_wait_for_the_writer(model: MiniCPMForCausalLM, tmp_path: Path) -> None:
    engine = make_engine(model, tmp_path)
    store = engine.prefix_store.store
    release, write = threading.Event(), store._write

    def stuck(item: object) -> bool:
        release.wait()
        return write(item)

    store._write = stuck
    one = engine.runner.bytes_per_block
    store.queue_bytes = 3 * one  # three blocks queued at most
    doc = prompt_of(70, 11)  # 8 full blocks
    try:
        assert run(engine, [doc]) == run(make_engine(model, None), [doc])  # every step ran, the writer stuck
        s = engine.stats()
        assert s["kv_store_writes"] == 0 and s["kv_store_dropped"] == 8 - 3
    finally:
        release.set()
    engine.close()
    assert engine.stats()["kv_store_writes"] == 3 and len(block_files(tmp_path)) == 3
    # the dropped blocks are not taken for stored: the next engine reads 3 and stores the other 5
    again = make_engine(model, tmp_path)
    run(again, [doc])
    again.close()
    assert again.stats()["kv_store_hits"] == 3 and again.stats()["kv_store_writes"] == 5


# ---------------------------------------------------------------------------------------- processes
SCRIPT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from test_kv_store import make_engine, prompt_of, tiny
from minicpm import SamplingParams
from minicpm.engine import kv_store
directory, prompts, slow, bound = sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
if bound:
    kv_store.RESCAN_WRITES = 1  # see the other process's files at every write
if slow:  # writes still queued when the script ends: the exit hook must write them
    write = kv_store.DiskKVStore._write
    kv_store.DiskKVStore._write = lambda self, item: (time.sleep(slow), write(self, item))[1]
engine = make_engine(tiny(), directory, kv_cache_dir_bytes=bound or None)
done = engine.generate([prompt_of(n, s) for n, s in prompts], SamplingParams(max_new_tokens=6, ignore_eos=True))
if bound:  # every write done, its evictions counted, before the stats are read (else a race under load)
    engine.prefix_store.close()
print(json.dumps({"tokens": [c.token_ids for c in done], "stats": engine.stats()}))
"""


def _process(directory: Path, prompts: list[tuple[int, int]], slow: float = 0, bound: int = 0) -> subprocess.Popen:
    args = [sys.executable, "-c", SCRIPT, str(TESTS), str(directory), json.dumps(prompts), str(slow), str(bound)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.splitlines()[-1])


def test_a_second_process_reads_what_the_first_left(model: MiniCPMForCausalLM, tmp_path: Path) -> None:
    prompts = [(75, 12)]  # 9 full blocks
    first = _result(_process(tmp_path, prompts, slow=0.3))
    assert first["stats"]["kv_store_writes"] < 9  # most were still queued when it printed
    assert len(block_files(tmp_path)) == 9  # ... and written before it exited
    second = _result(_process(tmp_path, prompts))
    assert second["tokens"] == first["tokens"] == run(make_engine(model, None), [prompt_of(75, 12)])
    assert second["stats"]["kv_store_hits"] == 9 and second["stats"]["kv_store_writes"] == 0
    assert second["stats"]["cached_prompt_tokens"] == 72 and first["stats"]["cached_prompt_tokens"] == 0
    assert second["stats"]["steps"] < first["stats"]["steps"]


def test_two_processes_writing_at_once_leave_only_whole_files(model: MiniCPMForCausalLM, tmp_path: Path) -> None:
    one = [(60, s) for s in range(20, 26)]
    other = [(60, s) for s in range(23, 29)]  # half the same prompts
    bound = 40 * 8700  # about 40 of the 63 distinct files: both evict while the other writes
    procs = [_process(tmp_path, one, bound=bound), _process(tmp_path, other, bound=bound)]
    results = [_result(p) for p in procs]
    assert results[0]["tokens"][3:] == results[1]["tokens"][:3]
    assert all(r["stats"]["kv_store_write_errors"] == r["stats"]["kv_store_skipped"] == 0 for r in results)
    assert sum(r["stats"]["kv_store_evicted"] for r in results) > 0
    files = block_files(tmp_path)
    assert files and sum(p.stat().st_size for p in files) <= bound
    assert len({check_file(p)["identity"] for p in files}) == 1
    assert not list(tmp_path.rglob("*.tmp"))
    engine = make_engine(model, tmp_path)  # what is left reads back whole
    assert run(engine, [prompt_of(n, s) for n, s in one]) == results[0]["tokens"]
    assert engine.stats()["kv_store_skipped"] == 0 and engine.stats()["kv_store_hits"] > 0


# ---------------------------------------------------------------------------------------- command line
def test_the_command_line_reuses_blocks_across_runs(default_model_dir: Path, tmp_path: Path, capsys) -> None:
    from minicpm.cli import main

    path = tmp_path / "tiny"
    random_model(tiny_config(vocab_size=49152, max_position_embeddings=256, rope_scaling=None)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, path / name)
    store = tmp_path / "kv"
    text = "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest. " * 4
    argv = ["generate", "--model", str(path), "--prompt", text, "--block-size", "16", "--max-new-tokens", "4"]
    base = [*argv, "--ignore-eos", "--device", "cpu"]
    argv = [*base, "--kv-cache-dir", str(store)]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert main(argv) == 0
    second = capsys.readouterr()
    assert second.out == first.out
    assert f"kv cache dir {store}: 0 blocks read, " in first.err
    read = int(second.err.split(f"kv cache dir {store}: ")[1].split(" blocks read")[0])
    assert read >= 2 and ", 0 written" in second.err
    assert main([*base, "--kv-cache-dir-gib", "1"]) == 2
    assert "--kv-cache-dir-gib bounds --kv-cache-dir, which is not set" in capsys.readouterr().err
    assert main([*argv, "--no-prefix-caching"]) == 2
    assert "--kv-cache-dir keeps the prefix cache on disk" in capsys.readouterr().err


def test_metrics_expose_the_store() -> None:
    from minicpm.server.metrics import KV_STORE_COUNTERS, _EngineCollector

    class Fake:
        def stats(self) -> dict:
            base = {"num_blocks": 4, "free_blocks": 4, "running": 0, "waiting": 0, "preemptions": 0}
            base |= {"prompt_tokens": 0, "cached_prompt_tokens": 0, "attention_backend": "x"}
            base |= {"kv_cache_dtype": "int8", "kv_bytes_per_token": 68, "kv_capacity_tokens": 512}
            return base | {"kernel_failures": 0, "request_errors": 0, "kv_store_hits": 3, "kv_store_bytes": 99}

    metrics = {m.name: m for m in _EngineCollector(Fake()).collect()}
    assert all(f"minicpm:kv_store_{n}" in metrics for n in KV_STORE_COUNTERS)
    assert metrics["minicpm:kv_store_hits"].samples[0].value == 3
    assert metrics["minicpm:kv_store_bytes"].samples[0].value == 99

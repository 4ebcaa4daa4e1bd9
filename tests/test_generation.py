"""Generation, sampling and chat on a tiny random model with a real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import random_model, tiny_config

from minicpm import LLM, SamplingParams, Tokenizer
from minicpm.sampling import apply_penalties, filter_logits

PROMPT = "Once upon a time, in a small village"


@pytest.fixture(scope="module")
def llm(spm_dir: Path) -> LLM:
    tok = Tokenizer.from_pretrained(spm_dir)
    config = tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=96, max_length=160, num_key_value_heads=2)
    return LLM(random_model(config, seed=3), tok)


def test_greedy_equals_argmax_of_full_recompute(llm: LLM) -> None:
    out = llm.generate(PROMPT, max_new_tokens=24, ignore_eos=True)
    assert len(out.token_ids) == 24 and out.finish_reason == "length"
    ids = llm.tokenizer.encode(PROMPT)
    with torch.no_grad():
        for tok in out.token_ids:
            full = llm.model(torch.tensor([ids]), rope_lengths=len(llm.tokenizer.encode(PROMPT)))
            assert int(full[0, -1].argmax()) == tok
            ids.append(tok)
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_greedy_past_max_positions_keeps_prompt_base(llm: LLM) -> None:
    """Decoding past max_position_embeddings (96) with the prompt's NTK base (prompt > 96 here)."""
    prompt = llm.tokenizer.encode(PROMPT * 12)[:100]
    out = llm.generate(prompt, max_new_tokens=8, ignore_eos=True)
    ids = list(prompt)
    with torch.no_grad():
        for tok in out.token_ids:
            assert int(llm.model(torch.tensor([ids]), rope_lengths=100)[0, -1].argmax()) == tok
            ids.append(tok)


def test_seed_reproducible_sampling(llm: LLM) -> None:
    params = dict(max_new_tokens=16, temperature=1.5, top_p=0.95, top_k=50, ignore_eos=True)
    a = llm.generate(PROMPT, seed=1, **params).token_ids
    b = llm.generate(PROMPT, seed=1, **params).token_ids
    c = llm.generate(PROMPT, seed=2, **params).token_ids
    assert a == b and a != c


def test_stop_token_and_stop_string(llm: LLM) -> None:
    free = llm.generate(PROMPT, max_new_tokens=20, ignore_eos=True)
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    out = llm.generate(PROMPT, max_new_tokens=20, stop_token_ids=[stop_id], ignore_eos=True)
    # the stop id is the last token id (generated, counted) but adds no text
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"
    assert out.text == llm.tokenizer.decode(free.token_ids[:first])

    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.index(stop)
    params = SamplingParams(max_new_tokens=20, stop=(stop,), ignore_eos=True)
    deltas = list(llm.stream(PROMPT, params))
    result = llm.generate(PROMPT, params)
    assert result.text == text[:cut] and result.finish_reason == "stop"
    assert "".join(deltas) == result.text
    assert stop not in "".join(deltas)


def test_stream_concatenates_to_text(llm: LLM) -> None:
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=5, ignore_eos=True)
    deltas = list(llm.stream("中文 🙂 " + PROMPT, params))
    result = llm.generate("中文 🙂 " + PROMPT, params)
    assert "".join(deltas) == result.text == llm.tokenizer.decode(result.token_ids)


def test_eos_and_im_end_stop_generation(llm: LLM) -> None:
    assert {2, 32000} <= llm.stop_token_ids(SamplingParams())
    assert not llm.stop_token_ids(SamplingParams(ignore_eos=True))


def test_prompt_too_long_and_bad_params_are_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match=r"prompt is \d+ tokens; the model's context is 160"):
        llm.generate("word " * 200)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([])
    with pytest.raises(ValueError, match="'top_p'"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="'temperature'"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="'max_new_tokens'"):
        SamplingParams(max_new_tokens=0)
    # an answer never runs past the context: it stops with finish_reason "length"
    prompt = llm.tokenizer.encode("word " * 40)
    out = llm.generate(prompt, max_new_tokens=500, ignore_eos=True)
    assert len(prompt) + len(out.token_ids) == 160 and out.finish_reason == "length"


def test_chat_returns_clean_response_and_history(llm: LLM) -> None:
    response, history = llm.chat("Hi there", system="Be brief.", temperature=0, max_new_tokens=12)
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[-1]["content"] == response
    completion = llm.last_completion
    assert response == llm.tokenizer.decode(completion.token_ids)  # no token dropped
    assert len(completion.token_ids) <= 12  # counts only the answer
    assert "<|im_end|>" not in response and "<|im_start|>" not in response
    prompt = llm.chat_prompt(history[:2])
    assert prompt[0] == 1 and prompt.count(32001) == 3  # bos, then system/user/assistant headers
    response2, history2 = llm.chat("More?", history, temperature=0, max_new_tokens=4)
    assert history2[-1]["content"] == response2
    assert len(history2) == 5 and len(history) == 3  # the caller's list is left alone


def test_batched_processing_matches_transformers_processors_row_by_row() -> None:
    """Each row of one batched call, with its own settings, equals transformers' processors."""
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    settings = [(0, 0.8, 0.0), (40, 1.0, 0.0), (40, 0.5, 0.0), (0, 0.999, 0.0), (0, 1.0, 0.05), (7, 0.9, 0.1)]
    n = len(settings)
    logits = torch.randn(n, 500, generator=g) * 3
    seen_ids = torch.randint(0, 500, (n, 40), generator=g)
    seen = torch.zeros(n, 500, dtype=torch.bool).scatter(1, seen_ids, True)
    zeros = torch.zeros(n)
    penalised = apply_penalties(
        logits, seen, torch.zeros(n, 500, dtype=torch.int32), torch.full((n,), 1.3), zeros, zeros
    )
    theirs = transformers.RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.clone())
    assert torch.allclose(penalised, theirs)
    ours = filter_logits(
        logits / 0.7,
        torch.tensor([s[0] for s in settings]),
        torch.tensor([s[1] for s in settings]),
        torch.tensor([s[2] for s in settings]),
    )
    for row, (top_k, top_p, min_p) in enumerate(settings):
        theirs = transformers.TemperatureLogitsWarper(0.7)(seen_ids[row : row + 1], logits[row : row + 1].clone())
        if top_k:
            theirs = transformers.TopKLogitsWarper(top_k)(seen_ids, theirs)
        if top_p < 1:
            theirs = transformers.TopPLogitsWarper(top_p)(seen_ids, theirs)
        if min_p:
            theirs = transformers.MinPLogitsWarper(min_p)(seen_ids, theirs)
        kept = ~torch.isinf(ours[row])
        assert torch.equal(kept, ~torch.isinf(theirs[0])), (top_k, top_p, min_p)
        assert torch.allclose(ours[row][kept], theirs[0][kept])


def test_presence_and_frequency_penalties_follow_openai() -> None:
    logits = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    counts = torch.tensor([[0, 2, 1, 0]], dtype=torch.int32)
    seen = counts > 0
    one = torch.ones(1)
    out = apply_penalties(logits, seen, counts, one, torch.tensor([0.5]), torch.tensor([0.25]))
    assert torch.allclose(out, torch.tensor([[1.0, -2.0 - 0.5 - 0.5, 3.0 - 0.5 - 0.25, 0.5]]))


def test_leaving_a_stream_early_aborts_its_request(llm: LLM) -> None:
    stream = llm.stream(PROMPT, SamplingParams(max_new_tokens=60, ignore_eos=True))
    first = next(iter(stream))
    assert first
    stream.close()
    engine = llm.engine
    assert not engine.requests and not engine.scheduler.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_list_of_prompts_runs_as_one_batch_with_the_same_greedy_answers(llm: LLM) -> None:
    prompts = [PROMPT, "The capital of France", "1, 2, 3,"]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    batch = llm.generate(prompts, params)
    alone = [llm.generate(p, params) for p in prompts]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    assert [c.text for c in batch] == [c.text for c in alone]


def test_unset_settings_come_from_the_checkpoint_then_the_card(tmp_path) -> None:
    import json

    from minicpm.sampling import checkpoint_sampling_defaults, with_defaults

    assert checkpoint_sampling_defaults(tmp_path) == {"temperature": 0.8, "top_p": 0.8}  # no file: the card
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0.7, "top_k": 20, "do_sample": True}))
    defaults = checkpoint_sampling_defaults(tmp_path)
    assert defaults == {"top_p": 0.7, "top_k": 20}
    given = {"temperature": None, "top_p": None, "top_k": 5, "repetition_penalty": None}
    assert with_defaults(given, defaults) == {"temperature": 1.0, "top_p": 0.7, "top_k": 5, "repetition_penalty": 1.0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert checkpoint_sampling_defaults(tmp_path) == {"temperature": 0.0}

"""Generation, sampling and chat on a tiny random model with a real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import random_model, tiny_config

from minicpm import LLM, SamplingParams, Tokenizer
from minicpm.sampling import apply_repetition_penalty, filter_top_k_top_p

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
    assert out.token_ids == free.token_ids[:first] and out.finish_reason == "stop"
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


def test_sampling_matches_transformers_processors() -> None:
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 500, generator=g) * 3
    seen = torch.randint(0, 500, (1, 40), generator=g)
    ours = apply_repetition_penalty(logits[0], seen[0], 1.3)
    theirs = transformers.RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())[0]
    assert torch.allclose(ours, theirs)
    for top_k, top_p in [(0, 0.8), (40, 1.0), (40, 0.5), (0, 0.999)]:
        ours = filter_top_k_top_p(logits[0] / 0.7, top_k, top_p)
        theirs = transformers.TemperatureLogitsWarper(0.7)(seen, logits.clone())
        if top_k:
            theirs = transformers.TopKLogitsWarper(top_k)(seen, theirs)
        if top_p < 1:
            theirs = transformers.TopPLogitsWarper(top_p)(seen, theirs)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs[0])), (top_k, top_p)
        assert torch.allclose(ours[~torch.isinf(ours)], theirs[0][~torch.isinf(ours)])


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

"""The batched sampler: one call over a step's rows equals plain per-row processing; penalties,
min_tokens and logprobs through the engine equal a full-recompute reference."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model, tiny_config

from minicpm import MiniCPMForCausalLM, SamplingParams
from minicpm.engine.config import EngineConfig
from minicpm.engine.llm_engine import LLMEngine
from minicpm.engine.sampler import Sampler
from minicpm.engine.sequence import Sequence

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 97


def plain_probs(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """One row, the rules written out with Python loops (independent of minicpm.sampling)."""
    p = seq.params
    x = logits.clone().double()
    out = seq.output_ids
    if len(out) < p.min_tokens:
        for t in seq.stop_ids:
            x[t] = float("-inf")
    for t in set(seq.token_ids):
        x[t] = x[t] * p.repetition_penalty if x[t] < 0 else x[t] / p.repetition_penalty
    for t in set(out):
        x[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
    if p.greedy:
        return torch.nn.functional.one_hot(x.argmax(), VOCAB).double()
    x = x / p.temperature
    if p.top_k:
        kth = sorted(x.tolist(), reverse=True)[p.top_k - 1]
        x[x < kth] = float("-inf")
    if p.top_p < 1:
        probs = x.softmax(-1)
        order = probs.argsort()  # ascending
        cumulative = 0.0
        for i in order.tolist()[:-1]:
            cumulative += probs[i].item()
            if cumulative <= 1 - p.top_p:
                x[i] = float("-inf")
    if p.min_p:
        probs = x.softmax(-1)
        x[probs < p.min_p * probs.max()] = float("-inf")
    return x.softmax(-1)


def make_seq(i: int, params: SamplingParams, prompt_len: int, out_len: int) -> Sequence:
    g = torch.Generator().manual_seed(100 + i)
    ids = torch.randint(0, VOCAB, (prompt_len + out_len,), generator=g).tolist()
    seq = Sequence(
        request_id=f"r{i}",
        prompt_ids=ids[:prompt_len],
        params=params,
        stop_ids=frozenset({3, 5}),
        max_tokens=100,
        rope_length=prompt_len,
        hash_seed=0,
        generator=params.make_generator(),
    )
    seq.token_ids = ids
    return seq


PARAMS = [
    SamplingParams(),  # greedy
    SamplingParams(repetition_penalty=1.3),  # greedy with a penalty
    SamplingParams(temperature=0.7, seed=1),
    SamplingParams(temperature=1.2, top_k=5, seed=2),
    SamplingParams(temperature=0.9, top_p=0.6, seed=3),
    SamplingParams(temperature=1.0, min_p=0.2, seed=4),
    SamplingParams(temperature=0.8, presence_penalty=1.5, frequency_penalty=0.7, top_k=20, top_p=0.9, seed=5),
    SamplingParams(temperature=1.0, min_tokens=50, logprobs=4, seed=6),
    SamplingParams(min_tokens=50, logprobs=0),  # greedy, stop ids banned
]


def test_one_batched_call_equals_each_row_alone() -> None:
    g = torch.Generator().manual_seed(0)
    seqs = [make_seq(i, p, prompt_len=6 + i, out_len=i % 4) for i, p in enumerate(PARAMS)]
    seqs[6].token_ids += [7, 7, 7, 9]  # counts above 1: frequency and presence differ
    logits = torch.randn(len(seqs), VOCAB, generator=g) * 2
    logits[:, 3] = logits[:, 5] = 10.0  # the stop ids would win without min_tokens
    logits[6, 7] = logits[6, 9] = 6.0
    got = Sampler(VOCAB, torch.device("cpu")).sample(logits, seqs)
    for i, (seq, row) in enumerate(zip(seqs, logits, strict=True)):
        probs = plain_probs(row, seq)
        if seq.params.greedy:
            expected = int(probs.argmax())
        else:  # the same uniform from the same seed, through the inverse CDF (vocabulary order)
            u = torch.rand(1, generator=torch.Generator().manual_seed(seq.params.seed)).double()
            expected = int((probs.cumsum(0) <= u * probs.sum()).sum())
        assert got[i].token_id == expected, f"row {i}: {seq.params}"
        assert probs[got[i].token_id] > 0
        if seq.params.min_tokens:
            assert got[i].token_id not in (3, 5)
        if seq.params.logprobs is None:
            assert got[i].logprob is None and got[i].top is None
        else:
            raw = torch.log_softmax(row.double(), -1)
            assert got[i].logprob == pytest.approx(raw[got[i].token_id].item(), abs=1e-5)
            top = raw.topk(seq.params.logprobs)
            assert [t for t, _ in got[i].top] == top.indices.tolist()
            assert [v for _, v in got[i].top] == pytest.approx(top.values.tolist(), abs=1e-5)


@pytest.fixture(scope="module")
def model() -> MiniCPMForCausalLM:
    return random_model(tiny_config(num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=256), seed=3)


def engine_for(model: MiniCPMForCausalLM) -> LLMEngine:
    config = EngineConfig(block_size=8, max_num_seqs=4, max_num_batched_tokens=16, kv_cache_memory=1 << 22)
    return LLMEngine(model, None, config)


def reference(model: MiniCPMForCausalLM, prompt: list[int], params: SamplingParams, n: int) -> tuple[list, list]:
    """Greedy by full recompute with the penalties written out; raw log-softmax at each step."""
    ids, logps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1].double()
            logps.append(torch.log_softmax(logits, -1))
            out = ids[len(prompt) :]
            for t in set(ids):
                r = params.repetition_penalty
                logits[t] = logits[t] * r if logits[t] < 0 else logits[t] / r
            for t in set(out):
                logits[t] -= params.frequency_penalty * out.count(t) + params.presence_penalty
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :], logps


def test_penalties_and_logprobs_through_the_engine_equal_the_reference(model: MiniCPMForCausalLM) -> None:
    engine = engine_for(model)
    prompts = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 23)]
    cases = [
        SamplingParams(max_new_tokens=20, ignore_eos=True, repetition_penalty=1.5, logprobs=3),
        SamplingParams(max_new_tokens=20, ignore_eos=True, presence_penalty=1.2, frequency_penalty=0.8, logprobs=0),
        SamplingParams(max_new_tokens=20, ignore_eos=True, logprobs=5),
    ]
    requests = [(p, sp) for p in prompts for sp in cases]
    results = engine.generate([p for p, _ in requests], [sp for _, sp in requests])  # one batch
    outs = {}
    for (prompt, params), done in zip(requests, results, strict=True):
        expected, logps = reference(model, prompt, params, 20)
        assert done.token_ids == expected, params
        outs[(tuple(prompt), params)] = (done, logps)
    # logprobs come with each output, in order
    engine = engine_for(model)
    for prompt in prompts:
        params = cases[0]
        rid = engine.add_request(prompt, params)
        got = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                assert out.request_id == rid and len(out.logprobs) == len(out.token_ids)
                got += out.logprobs
        _, logps = reference(model, prompt, params, 20)
        for step, (sampled, lp) in enumerate(zip(got, logps, strict=True)):
            assert sampled.logprob == pytest.approx(lp[sampled.token_id].item(), abs=1e-4), step
            assert [t for t, _ in sampled.top] == lp.topk(3).indices.tolist()
    assert not engine.runner.sampler._histories  # released when the requests ended


def test_min_tokens_holds_back_stop_ids_and_stop_strings(model: MiniCPMForCausalLM) -> None:
    engine = engine_for(model)
    prompt = [1, 2, 3, 4]
    first = engine.generate([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))[0].token_ids[0]
    stopped = engine.generate([prompt], SamplingParams(max_new_tokens=10, stop_token_ids=(first,)))[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    held = engine.generate([prompt], SamplingParams(max_new_tokens=10, stop_token_ids=(first,), min_tokens=4))[0]
    assert len(held.token_ids) >= 4 and first not in held.token_ids[:4]


def test_prompt_logprobs_over_chunks_and_past_the_prefix_cache(model: MiniCPMForCausalLM) -> None:
    engine = engine_for(model)  # 16-token steps: a 40-token prompt is scored over three chunks
    prompt = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(9)).tolist()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt]))[0].double(), -1)
    engine.generate([prompt], SamplingParams(max_new_tokens=2, ignore_eos=True))  # its blocks are now cached
    for _ in range(2):
        rid = engine.add_request(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=2))
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        assert outs[0].request_id == rid and all(o.prompt_logprobs is None for o in outs[1:])
        scores = outs[0].prompt_logprobs
        assert [s.token_id for s in scores] == prompt[1:]
        for p, s in enumerate(scores):
            assert s.logprob == pytest.approx(logp[p, prompt[p + 1]].item(), abs=1e-4), p
            assert [t for t, _ in s.top] == logp[p].topk(2).indices.tolist()
        assert outs[-1].cached_tokens == 0  # scored from scratch, not from cached blocks


def test_draw_decides_filters_among_candidates_as_over_the_whole_vocabulary() -> None:
    """On a real-sized vocabulary, rows whose filters are decided within the 256 candidates give
    the token that the whole-vocabulary path gives for the same uniform, and the plain rules'."""
    from minicpm.engine import sampler as sampler_module
    from minicpm.engine.sampler import draw

    gen = torch.Generator().manual_seed(0)
    vocab, rows = 5000, 24
    logits = torch.randn(rows, vocab, generator=gen) * torch.linspace(0.5, 6, rows)[:, None]
    top_k = torch.tensor([0, 5, 40, 255, 300, 0, 0, 0] * 3)
    top_p = torch.tensor([0.9, 1.0, 0.8, 1.0, 0.95, 1.0, 0.5, 1.0] * 3)
    min_p = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.0, 0.05, 0.0, 0.0] * 3)
    probs = logits.softmax(-1)
    for trial in range(20):
        u = torch.rand(rows, generator=gen)
        fast = draw(probs, top_k, top_p, min_p, u)
        old, sampler_module.CANDIDATES = sampler_module.CANDIDATES, vocab  # force the whole vocabulary
        try:
            full = draw(probs, top_k, top_p, min_p, u)
        finally:
            sampler_module.CANDIDATES = old
        assert torch.equal(fast, full), f"trial {trial}"
        for r in range(rows):  # the plain rules, written out: what is kept, then the inverse CDF
            x = logits[r].double()
            if top_k[r]:
                x[x < x.sort(descending=True).values[top_k[r] - 1]] = float("-inf")
            if top_p[r] < 1:
                p = x.softmax(-1)
                order = p.argsort()
                cumulative = p[order].cumsum(0)
                x[order[:-1][cumulative[:-1] <= 1 - top_p[r].item()]] = float("-inf")
            if min_p[r]:
                p = x.softmax(-1)
                x[p < min_p[r].item() * p.max()] = float("-inf")
            kept = x > float("-inf")
            weights = probs[r].double() * kept
            assert kept[fast[r]], f"row {r} drew a filtered token"
            assert int((weights.cumsum(0) <= u[r].double() * weights.sum()).sum()) == int(fast[r])

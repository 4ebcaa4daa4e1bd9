"""The Hugging Face transformers peer of the benchmarks: a ``LlamaForCausalLM`` with our weights.

``hf_llama(model)`` returns transformers' Llama carrying the same weights as a
:class:`minicpm.MiniCPMForCausalLM`, on its device and in its dtype, sharing every tensor it can
(MiniCPM's three scales are folded into the embedding, ``o_proj``/``down_proj`` and the head,
which only costs new copies of those). For Llama checkpoints the scales are neutral and the two
models compute the same function; for MiniCPM they differ only in rounding. The speed of the
peer does not depend on that.
"""

from __future__ import annotations

import torch

from minicpm import MiniCPMForCausalLM


def hf_llama(model: MiniCPMForCausalLM, attn_implementation: str = "sdpa", fold_scales: bool = True):
    """The peer; ``fold_scales=False`` shares every tensor (no copy) and drops MiniCPM's scales,
    which changes the function but neither speed nor memory (the GPU benchmark's choice)."""
    import itertools

    import transformers

    if model.fused:
        raise ValueError("build the HF peer before an engine takes the model over (its layers are fused)")
    c = model.config
    rope = {"rope_type": c.rope_type, "factor": c.rope_factor} if c.rope_type != "none" else None
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta,
        rope_scaling=rope,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings and (not fold_scales or c.scale_emb == c.logit_scale == 1),
        attn_implementation=attn_implementation,
        dtype=model.dtype,
    )
    state = dict(model.state_dict())
    if "lm_head.weight" not in state or state["lm_head.weight"] is state["model.embed_tokens.weight"]:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.no_grad():
        if fold_scales and c.scale_emb != 1:
            state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * c.scale_emb
        if fold_scales and c.residual_scale != 1:
            for name in state:
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    state[name] = state[name] * c.residual_scale
        if fold_scales and c.logit_scale != 1:
            state["lm_head.weight"] = state["lm_head.weight"] * c.logit_scale
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_config)
    hf.load_state_dict(state, strict=True, assign=True)
    if hf_config.tie_word_embeddings:
        hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config).to(model.device)  # its buffers were on meta
    meta = [n for n, t in itertools.chain(hf.named_parameters(), hf.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"HF peer still has meta tensors: {meta[:5]}")
    return hf.eval()

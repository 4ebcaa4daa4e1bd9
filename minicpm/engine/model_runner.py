"""The only code that turns scheduled sequences into tensors and runs the model: :class:`ModelRunner`.

Contract:

* At construction it chooses the attention backend, once
  (:func:`~minicpm.engine.attention.select_backend` from ``EngineConfig.attention_backend``, logged
  in one line), prepares the model (:func:`~minicpm.engine.layers.prepare_model`: fused
  projections, packed CPU bf16 weights), then sizes the paged KV cache from the memory at hand
  (``kv_cache_memory`` bytes; on CUDA ``gpu_memory_utilization`` of the card minus the weights,
  what is already in use and a measured activation reserve; on CPU the available memory, the
  weights loaded, minus an activation reserve and room for the system), in the KV format
  ``kv_cache_dtype`` resolves to (``kv_format``; bytes per token counted with its scales) and,
  on CUDA unless ``enforce_eager``,
  captures one CUDA graph of the decoder per batch-size bucket (hidden states into one shared
  static buffer; any context length replays it, the attention kernel's work following each row's
  real length).
* ``run(batch)`` feeds each scheduled sequence's next tokens as one flattened forward, computes
  logits only for the sequences that sample this step (those whose tokens reach their end) and
  returns one sampled token id per such sequence, in order. Pure decode batches that fit a
  captured graph replay it, then compute the logits of their real rows outside the graph;
  everything else runs eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import UserError
from ..model import MiniCPMForCausalLM, rope_inv_freq
from ..plan import available_cpu_memory, estimate_activation_reserve, format_bytes, prefill_reads, system_room
from ..weights import release_freed_memory
from .attention import AttentionMetadata, CpuNativeBackend, PagedKVCache, select_backend
from .attention.kv_format import resolve_kv_format
from .config import EngineConfig
from .fused_decode import FusedDecoder
from .kv_store import model_fingerprint
from .layers import StepRows, prepare_model
from .sampler import Sampled, Sampler
from .scheduler import ScheduledBatch
from .sequence import Sequence

log = logging.getLogger("minicpm.engine")


GRAPH_RESERVE = 512 * 2**20  # CUDA graphs' pool, where the budget is decided before their capture
ALLOCATOR_SLACK = 256 * 2**20  # fragmentation of torch's caching allocator


def cuda_kv_budget(total: int, free: int, utilization: float, activations: int, gather: int, graphs: int = 0) -> int:
    """Bytes the KV cache may take on a device of ``total`` bytes with ``free`` free now: what
    ``utilization`` of it leaves after everything in use now (weights, CUDA graph pools captured
    already, other processes), a forward's measured peak ``activations``, one layer's context
    gathered by a fallback path, the ``graphs`` still to capture and the allocator's slack."""
    return int(total * utilization - (total - free) - activations - gather - graphs - ALLOCATOR_SLACK)


def _padded_tables(seqs: list[Sequence], width: int) -> list[list[int]]:
    """Each sequence's first ``width`` block ids, padded with block 0 (rows of one int32 table)."""
    return [seq.block_table[:width] + [0] * (width - len(seq.block_table[:width])) for seq in seqs]


class ModelRunner:
    def __init__(self, model: MiniCPMForCausalLM, config: EngineConfig, max_model_len: int) -> None:
        # the weights as loaded (kept on the model: a second engine over it gets the same digest),
        # what the persistent prefix cache's files are keyed by
        self.fingerprint = model_fingerprint(model)
        self.model = prepare_model(model.eval(), config.quantize, config.group_size)
        self.rows: StepRows = self.model.step_rows  # the model's, shared by every engine over it
        self.config = config
        self.model_config = model.config
        self.device = model.device
        self.dtype = model.dtype
        self.block_size = config.block_size
        c = self.model_config
        self.kv_format = resolve_kv_format(config.kv_cache_dtype, self.dtype, self.device, c.head_dim)
        self.kv_bytes_per_token = self.kv_format.bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
        self.bytes_per_block = config.block_size * self.kv_bytes_per_token
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Callable[[], None]]] = {}
        self.backend = select_backend(self.device, self.dtype, c, config.attention_backend)
        graphs = self.device.type == "cuda" and not config.enforce_eager and self.backend.graphs
        if graphs and config.kv_cache_memory is None:
            self._size_cache_after_capture(max_model_len)
        else:
            self.num_blocks = self._num_blocks(max_model_len)
            self.cache = self._new_cache(self.num_blocks)
        self.inv_freq_cache: dict[float, Tensor] = {}
        self.sampler = Sampler(c.vocab_size, self.device)
        self._scoring: list[tuple[Sequence, int, int, int]] = []
        self.fused = self._fused_decoder()
        log.info("attention: %s%s", self.backend.describe(), "; fused CPU decoder" if self.fused else "")
        if self.device.type == "cpu":
            release_freed_memory()  # loading and packing freed a model's worth of copies
        if graphs and not self.graphs:
            self._capture_graphs(min(max_model_len, self.num_blocks * self.block_size))

    def _new_cache(self, num_blocks: int) -> PagedKVCache:
        c, cfg = self.model_config, self.config
        return PagedKVCache(
            c,
            num_blocks,
            self.block_size,
            self.dtype,
            self.device,
            self.backend,
            cfg.on_kernel_failure,
            self.kv_format,
            rotate=cfg.kv_rotation,
        )

    def _fused_decoder(self) -> FusedDecoder | None:
        """The fused CPU decoder where ``EngineConfig.fused_decode`` allows it and the backend is
        ``cpu-native``; ``fused_decode=True`` where it cannot run is an error that says why."""
        wanted = self.config.fused_decode
        if wanted is False:
            return None
        if not isinstance(self.backend, CpuNativeBackend):
            if wanted:
                raise UserError(f"the fused decoder runs on the cpu-native attention backend, not {self.backend.name}")
            return None
        fused = FusedDecoder.build(self.model, self.cache)
        if fused is None and wanted:
            raise UserError("the fused decoder cannot run this model (its layers are not all on native panels)")
        return fused

    @property
    def attention_backend(self) -> str:
        """The backend serving now (a fallback's name after a kernel failure)."""
        return self.cache.backend.name

    # ------------------------------------------------------------------ memory
    def _num_blocks(self, max_model_len: int) -> int:
        cfg = self.config
        useful = cfg.max_num_seqs * -(-max_model_len // self.block_size)
        if cfg.kv_cache_memory is not None:
            budget = cfg.kv_cache_memory
            source = f"kv_cache_memory={format_bytes(budget)}"
        elif self.device.type == "cuda":
            budget = self._cuda_kv_budget(max_model_len)
            source = f"gpu_memory_utilization={cfg.gpu_memory_utilization} of the device"
        else:
            budget, source = self._cpu_kv_budget(max_model_len)
        self.kv_budget, self.kv_budget_source = budget, source
        num_blocks = min(budget // self.bytes_per_block, useful)
        if num_blocks < 1:
            raise UserError(
                f"no room for a KV cache: one block of {self.block_size} tokens takes "
                f"{format_bytes(self.bytes_per_block)} and the budget ({source}) is {format_bytes(max(budget, 0))}"
            )
        return int(num_blocks)

    def _cpu_kv_budget(self, max_model_len: int) -> tuple[int, str]:
        """What the machine can give the cache now, the weights already loaded: available memory
        minus a forward's activation reserve (:func:`~minicpm.plan.estimate_activation_reserve` for
        this engine's chunk, context and prefill path) and room for the rest of the system (:func:`system_room`).
        The cache's pages are committed as tokens arrive, so an idle engine holds little of it."""
        found = available_cpu_memory()
        if found is None:
            raise UserError("cannot measure the available memory here: set kv_cache_memory (--kv-cache-gib)")
        available, where = found
        native = isinstance(self.backend, CpuNativeBackend) and self.backend.prefill is not None
        reads = prefill_reads(native, self.kv_format.quantized)
        reserve = estimate_activation_reserve(
            self.model_config, self.dtype, max_model_len, prefill_chunk=self.config.max_num_batched_tokens, **reads
        )
        room = system_room()
        budget = available - reserve - room
        source = (
            f"available memory {format_bytes(available)} ({where}) minus {format_bytes(reserve)} for activations "
            f"and {format_bytes(room)} left to the system"
        )
        return budget, source

    def _cuda_kv_budget(self, max_model_len: int) -> int:
        """:func:`cuda_kv_budget` from what this device holds now (weights, and CUDA graph pools
        when captured first) and a warm-up forward's measured peak."""
        cfg, c = self.config, self.model_config
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.inference_mode():
            tokens = min(cfg.max_num_batched_tokens, max_model_len)
            ids = torch.zeros(1, tokens, dtype=torch.long, device=self.device)
            self.model(ids, logits_to_keep=torch.arange(min(cfg.max_num_seqs, tokens), device=self.device))
        torch.cuda.synchronize()
        activations = torch.cuda.max_memory_allocated() - before
        # a chunk attending to the longest context gathers its keys and values for one layer
        # (dequantized, for a quantized cache: in the activation dtype)
        gather = max_model_len * c.kv_bytes_per_token(self.dtype.itemsize) // c.num_hidden_layers
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        graphs = 0 if self.graphs else GRAPH_RESERVE  # captured before: their pool is in use already
        return cuda_kv_budget(total, free, cfg.gpu_memory_utilization, activations, gather, graphs)

    def _size_cache_after_capture(self, max_model_len: int) -> None:
        """The CUDA graphs first, over a one-block cache, so that the budget is measured with their
        memory pool in use (its growth logged); then the cache gets the budget and the graphs are
        captured again over it (they hold the cache's addresses)."""
        self.cache = self._new_cache(1)
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        self._capture_graphs(max_model_len)
        torch.cuda.synchronize()
        pool = torch.cuda.memory_reserved() - before
        self.num_blocks = self._num_blocks(max_model_len)
        self.graphs.clear()
        self.static = None
        self.cache = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self.cache = self._new_cache(self.num_blocks)
        self._capture_graphs(min(max_model_len, self.num_blocks * self.block_size))
        log.info(
            "CUDA graphs took %s; KV cache %d blocks (%s)",
            format_bytes(pool),
            self.num_blocks,
            format_bytes(self.num_blocks * self.bytes_per_block),
        )

    # ------------------------------------------------------------------ inputs
    def inv_freq(self, seq: Sequence) -> Tensor:
        key = self.model_config.rope_base(seq.rope_length)
        table = self.inv_freq_cache.get(key)
        if table is None:
            table = self.inv_freq_cache[key] = rope_inv_freq(self.model_config, seq.rope_length, self.device)
        return table

    def _tensor(self, data: list[int], dtype: torch.dtype = torch.long) -> Tensor:
        t = torch.tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _prepare(
        self, batch: ScheduledBatch
    ) -> tuple[Tensor, Tensor, Tensor, AttentionMetadata, list[int], list[Sequence]]:
        """Inputs of one forward, the rows whose logits are needed and the sequences they sample
        for; the attention metadata is the backend's (:meth:`PagedKVCache.prepare`)."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        samplers: list[Sequence] = []
        scoring: list[tuple[Sequence, int, int, int]] = []  # (seq, first position, end, first row)
        context_lens: list[int] = []
        tables: list[list[int]] = []
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if end == seq.num_tokens:
                logits_rows.append(len(ids) - 1)
                samplers.append(seq)
            last_scored = min(end, seq.num_prompt_tokens - 1)  # row p scores prompt token p + 1
            if seq.params.prompt_logprobs is not None and start < last_scored:
                scoring.append((seq, start, last_scored, len(ids) - (end - start)))
            context_lens.append(end)
            tables.append(table[: -(-end // bs)])
        width = max(len(t) for t in tables)
        md = self.cache.prepare(
            AttentionMetadata(
                slot_mapping=self._tensor(slots),
                block_tables=self._tensor(_padded_tables(batch.seqs, width), torch.int32),
                context_lens=self._tensor(context_lens, torch.int32),
                decode_only=batch.decode_only,
                query_lens=list(batch.num_tokens),
                context_lens_host=context_lens,
                tables=tables,
                leading_decodes=batch.leading_decodes,
            )
        )
        freqs = torch.stack([self.inv_freq(s) for s in batch.seqs])
        counts = self._tensor(batch.num_tokens)
        inv_freq = torch.repeat_interleave(freqs, counts, dim=0, output_size=len(ids))
        for _, first, last, row in scoring:
            logits_rows.extend(range(row, row + last - first))
        self._scoring = scoring
        return self._tensor(ids)[None], self._tensor(positions)[None], inv_freq[None], md, logits_rows, samplers

    # ------------------------------------------------------------------ run
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[Sampled]:
        """One sampled token (with logprobs where asked) per sequence of ``batch`` that reached the
        end of its tokens, in order. On CPU the step's leading decode rows go through the fused
        decoder (one native call for every layer), the rest through the model."""
        lead = self._fused_rows(batch)
        if not lead:
            logits, samplers = self._forward(batch)
            return self.sampler.sample(logits, samplers)
        decoded = self._decode_fused(batch.seqs[:lead])
        if lead == len(batch.seqs):
            return self.sampler.sample(decoded, batch.seqs)
        logits, samplers = self._forward(ScheduledBatch(batch.seqs[lead:], batch.num_tokens[lead:]))
        return self.sampler.sample(torch.cat((decoded, logits)), batch.seqs[:lead] + samplers)

    def _fused_rows(self, batch: ScheduledBatch) -> int:
        """How many leading sequences the fused decoder takes: one new token each, sampling after
        it, no prompt logprobs to score."""
        if self.fused is None:
            return 0
        lead = 0
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            last = seq.num_computed_tokens + 1 == seq.num_tokens
            scores = seq.params.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens - 1
            if n != 1 or not last or scores:
                break
            lead += 1
        return lead

    def _decode_fused(self, seqs: list[Sequence]) -> Tensor:
        """float32 logits (rows, vocab) of one new token for each of ``seqs`` (the fused decoder)."""
        bs = self.block_size
        positions = [seq.num_computed_tokens for seq in seqs]
        lens = [p + 1 for p in positions]
        width = max(-(-n // bs) for n in lens)
        h = self.fused.hidden_states(
            torch.tensor([seq.token_ids[p] for seq, p in zip(seqs, positions, strict=True)]),
            torch.tensor(positions),
            torch.stack([self.inv_freq(s) for s in seqs]),
            torch.tensor([seq.block_table[p // bs] * bs + p % bs for seq, p in zip(seqs, positions, strict=True)]),
            torch.tensor(_padded_tables(seqs, width), dtype=torch.int32),
            torch.arange(len(seqs), dtype=torch.int32),
            torch.tensor(lens, dtype=torch.int32),
        )
        return self.model.logits(h[None])[0]

    def _forward(self, batch: ScheduledBatch) -> tuple[Tensor, list[Sequence]]:
        """The model over ``batch``: logits of the sampling rows (then of the scored prompt rows,
        already consumed) and the sequences they sample for."""
        ids, positions, inv_freq, md, rows, samplers = self._prepare(batch)
        graph = self._graph_for(batch, md) if self.graphs and md.decode_only else None
        if graph is not None:
            logits = self._replay(graph, ids, positions, inv_freq, md, self._tensor(rows))
        else:
            self.cache.metadata = md
            # a mixed step's decode rows (first in the batch) go through the linears apart from the
            # rest (a split at or past the last row, as in a decode-only step, splits nothing)
            self.rows.split = batch.leading_decodes
            try:
                keep = self._tensor(rows) if rows else torch.empty(0, dtype=torch.long, device=self.device)
                logits = self.model(ids, positions, cache=self.cache, logits_to_keep=keep, inv_freq=inv_freq)[0]
            finally:
                self.cache.metadata = None
                self.rows.split = 0
        if self._scoring:
            self._score_prompts(logits[len(samplers) :])
        return logits[: len(samplers)], samplers

    def _score_prompts(self, logits: Tensor) -> None:
        """Logprobs of prompt tokens (with their top alternatives) into each scoring sequence."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        row = 0
        for seq, first, last, _ in self._scoring:
            rows = logp[row : row + last - first]
            row += last - first
            targets = torch.tensor(seq.token_ids[first + 1 : last + 1], device=rows.device)
            chosen = rows.gather(-1, targets[:, None])[:, 0].tolist()
            k = seq.params.prompt_logprobs
            top = rows.topk(k, dim=-1) if k else None
            top_ids, top_values = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
            if seq.prompt_logprobs is None:
                seq.prompt_logprobs = [None] * (seq.num_prompt_tokens - 1)
            for j, p in enumerate(range(first, last)):
                pairs = list(zip(top_ids[j], top_values[j], strict=True)) if top is not None else []
                seq.prompt_logprobs[p] = Sampled(seq.token_ids[p + 1], chosen[j], pairs)

    # ------------------------------------------------------------------ CUDA graphs
    def _graph_for(self, batch: ScheduledBatch, md: AttentionMetadata) -> tuple | None:
        """The smallest captured batch bucket that holds this decode step (any context: the
        graphs' block tables are as wide as the longest sequence, and the decode kernel's work
        follows each row's real length)."""
        n = len(batch.seqs)
        if not self.cache.backend.graphs:  # its kernels failed and were left: the graphs hold them
            return None
        fitting = [b for b in self.graphs if b >= n]
        if not fitting or md.block_tables.shape[1] > self.static["tables"].shape[1]:
            return None
        b = min(fitting)
        return (b, *self.graphs[b])

    def _capture_graphs(self, max_len: int) -> None:
        """One graph per batch-size bucket of the decoder alone (embeddings to the last layer),
        writing its hidden states into one shared static buffer; logits are computed outside the
        graphs, for the real rows only."""
        bs = self.block_size
        max_batch = self.config.max_num_seqs
        batch_sizes = sorted(
            {b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if b < max_batch} | {max_batch}
        )
        max_blocks = -(-max_len // bs)
        d2 = self.model_config.head_dim // 2
        dev = self.device
        self.static = {
            "ids": torch.zeros(1, max_batch, dtype=torch.long, device=dev),
            "positions": torch.zeros(1, max_batch, dtype=torch.long, device=dev),
            "inv_freq": torch.zeros(1, max_batch, d2, dtype=torch.float32, device=dev),
            "slots": torch.full((max_batch,), self.cache.scratch_slot, dtype=torch.long, device=dev),
            "tables": torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=dev),
            "lens": torch.zeros(max_batch, dtype=torch.int32, device=dev),
            "hidden": torch.zeros(1, max_batch, self.model_config.hidden_size, dtype=self.dtype, device=dev),
        }
        st = self.static
        pool = None
        for b in reversed(batch_sizes):
            md = AttentionMetadata(
                slot_mapping=st["slots"][:b],
                block_tables=st["tables"][:b],
                context_lens=st["lens"][:b],
                decode_only=True,
            )

            def decoder(b: int = b, md: AttentionMetadata = md) -> None:
                self.cache.metadata = md
                try:
                    h = self.model.hidden_states(
                        st["ids"][:, :b], st["positions"][:, :b], cache=self.cache, inv_freq=st["inv_freq"][:, :b]
                    )
                    st["hidden"][:, :b].copy_(h)
                finally:
                    self.cache.metadata = None

            with torch.inference_mode():
                decoder()  # warm up
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    decoder()
            if pool is None:
                pool = graph.pool()
            self.graphs[b] = (graph, decoder)
            torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch buckets %s)", len(self.graphs), batch_sizes)

    def _replay(
        self, graph: tuple, ids: Tensor, positions: Tensor, inv_freq: Tensor, md: AttentionMetadata, keep: Tensor
    ) -> Tensor:
        _, g, _ = graph
        n = ids.shape[1]
        st = self.static
        width = md.block_tables.shape[1]
        st["ids"][:, :n] = ids
        st["positions"][:, :n] = positions
        st["inv_freq"][:, :n] = inv_freq
        st["slots"].fill_(self.cache.scratch_slot)
        st["slots"][:n] = md.slot_mapping
        st["lens"].zero_()  # padded rows: no context, no reads
        st["lens"][:n] = md.context_lens
        st["tables"][:n, :width] = md.block_tables  # entries past a row's length are never read
        g.replay()
        return self.model.logits(st["hidden"][:, :n], keep)[0]

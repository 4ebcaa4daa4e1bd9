"""The paged KV cache: :class:`PagedKVCache`, the storage every attention backend reads.

Contract: the cache holds, per layer, keys and values of shape (num_blocks + 1, block_size,
kv_heads, head_dim) in its :class:`~.kv_format.KVFormat` (``cache.format``): the activations' own
dtype, or quantized codes (``k``/``v``, (.., kv_heads, code width)) with float16 scales beside them
(``k_scale``/``v_scale``, (.., kv_heads, scale width)) indexed by the same block and slot. The extra
last block is a scratch block that padded rows of a CUDA-graph batch write into. ``storage`` names
every tensor of the cache, each indexed [layer, block]: what a block is, for whoever copies one.

A forward over a flattened batch (input ids of shape (1, total tokens)) sets
``cache.metadata`` (prepared by ``cache.backend``) and passes the cache to the model; for every
layer :meth:`PagedKVCache.attend` writes the new keys and values at ``metadata.slot_mapping``
(``index_copy_``: an out-of-range slot raises; quantized first, on CPU by the native kernels'
writer where they build) and returns the backend's attention. With a quantized format the
backend is handed the new keys and values as the cache gives them back (dequantized), so a chunk
attending to its own keys sees what a later decode step reads: every token attends to the
quantized cache, its own entry included. A cache made with ``rotate`` and a quantized format
rotates queries, keys and values first and each output back (``rotation``; see
:mod:`.kv_format`): backends see and store the rotated vectors.

The backend is fixed at construction. When one of its kernels raises mid-serving (anything but
running out of memory), the cache either raises (``on_kernel_failure="raise"``) or, where the
backend names a fallback, counts the failure in ``kernel_failures``, logs it once, and serves this
step and every later one with the fallback (``"fallback"``). Inside a captured CUDA graph there is
nothing to fall back to: it raises.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ...config import MiniCPMConfig
from ...errors import UserError
from ..config import KERNEL_FAILURE_CHOICES
from ..cpu_kernels import KV_KINDS, advise_huge_pages, kv_quantize, native_kernels
from .base import AttentionBackend, AttentionMetadata
from .kv_format import FORMATS, ROTATION, KVFormat, hadamard, rotate_heads, writer_fits

log = logging.getLogger("minicpm.engine")

HUGE_PAGE_LAYER_BYTES = 64 * 1024**2


class PagedKVCache:
    """See the module docstring. ``backend``: None selects the default for the device and dtype
    (:func:`~minicpm.engine.attention.select_backend`)."""

    def __init__(
        self,
        config: MiniCPMConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        backend: AttentionBackend | None = None,
        on_kernel_failure: str = "raise",
        kv_format: KVFormat | None = None,
        rotate: bool = False,
    ) -> None:
        if on_kernel_failure not in KERNEL_FAILURE_CHOICES:
            raise UserError(f"on_kernel_failure must be 'raise' or 'fallback', got {on_kernel_failure!r}")
        fmt = kv_format or next(f for f in FORMATS.values() if not f.quantized and f.dtype == dtype)
        self.format, self.dtype = fmt, dtype
        lead = (config.num_hidden_layers, num_blocks + 1, block_size, config.num_key_value_heads)
        # uninitialized: no path reads a slot before it is written, except the padded gather of
        # batched decode, which zeroes what it masks (so a large CPU budget costs no memory until used)
        self.k = torch.empty((*lead, fmt.code_width(config.head_dim)), dtype=fmt.dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.storage = {"k": self.k, "v": self.v}
        self.k_scale = self.v_scale = None
        if fmt.quantized:
            self.k_scale = torch.empty((*lead, fmt.scale_width(config.head_dim)), dtype=torch.float16, device=device)
            self.v_scale = torch.empty(
                (*lead, fmt.scale_width(config.head_dim, value=True)), dtype=torch.float16, device=device
            )
            self.storage.update(k_scale=self.k_scale, v_scale=self.v_scale)
        # on CPU, a cache of at least 64 MiB a layer on huge pages (decode attention reads scattered
        # blocks: fewer TLB misses); a smaller one stays on 4 KiB pages, where touching one block
        # of each layer would commit 2 MiB a layer
        if self.k[0].nbytes >= HUGE_PAGE_LAYER_BYTES:
            for cache in self.storage.values():
                advise_huge_pages(cache)
        # a quantized format's Hadamard rotation (kv_format.rotate_heads), where ``rotate`` and the
        # head size allow it; None: stored as computed
        self.rotation: Tensor | None = None
        if rotate and fmt.quantized and config.head_dim % ROTATION == 0:
            self.rotation = hadamard(ROTATION, device)
        # a quantized CPU cache is written by the native kernels' quantizer where they build
        # (csrc/kv_quant.c: the reference's codes, bit for bit), else by kv_format's torch one
        self.native_writer = (
            fmt.dtype in KV_KINDS and torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16)
        )
        self.int4_fits = writer_fits(device)  # how an int4 writer here picks its scales
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.scratch_slot = num_blocks * block_size
        self.scale = config.head_dim**-0.5
        if backend is None:
            from .select import select_backend

            backend = select_backend(torch.device(device), dtype, config)
        self.backend = backend
        self.on_kernel_failure = on_kernel_failure
        self.kernel_failures: Counter[str] = Counter()
        self.metadata: AttentionMetadata | None = None
        # called before each layer's attention (the CPU engine's thread governor: a long prefill
        # step follows the machine's load layer by layer, not only between steps)
        self.on_layer: Callable[[], None] | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.storage.values())

    def prepare(self, md: AttentionMetadata) -> AttentionMetadata:
        """The backend's metadata for the step ``md`` describes."""
        return self.backend.prepare(self, md)

    def slots(self, layer: int) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s keys and values (codes, for a quantized format) as (slots, kv_heads,
        code width) views, slot = block * block_size + offset."""
        return self.k[layer].flatten(0, 1), self.v[layer].flatten(0, 1)

    def scale_slots(self, layer: int) -> tuple[Tensor, Tensor] | tuple[None, None]:
        """Layer ``layer``'s key and value scales as (slots, kv_heads, scale width) views; (None,
        None) for a float format."""
        if self.k_scale is None:
            return None, None
        return self.k_scale[layer].flatten(0, 1), self.v_scale[layer].flatten(0, 1)

    def read(self, layer: int, slots: slice | Tensor) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s keys and values at ``slots`` (a slice, or an index tensor) as (tokens,
        kv_heads, head_dim) in the activation dtype: a view for a float format and a slice, else
        dequantized (or gathered)."""
        return self._take(layer, slots, by_block=False)

    def read_blocks(self, layer: int, blocks: slice | Tensor) -> tuple[Tensor, Tensor]:
        """As :meth:`read`, for whole blocks: ``blocks`` a slice of block ids or a tensor of them
        (any shape; its blocks in row-major order)."""
        return self._take(layer, blocks, by_block=True)

    def _take(self, layer: int, index: slice | Tensor, by_block: bool) -> tuple[Tensor, Tensor]:
        def take(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            t = t[layer] if by_block else t[layer].flatten(0, 1)
            t = t[index] if isinstance(index, slice) else t.index_select(0, index.reshape(-1))
            return t.flatten(0, 1) if by_block else t

        k, v = take(self.k), take(self.v)
        if not self.format.quantized:
            return k, v
        fmt = self.format
        k = fmt.dequantize(k, take(self.k_scale), self.dtype)
        return k, fmt.dequantize(v, take(self.v_scale), self.dtype, value=True)

    def write(self, layer: int, k: Tensor, v: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s new keys and values (1, kv_heads, tokens, head_dim) at ``slots``;
        returns them as the cache gives them back (``k`` and ``v`` themselves for a float format)."""
        kc, vc = self.slots(layer)
        if not self.format.quantized:
            kc.index_copy_(0, slots, k[0].transpose(0, 1))
            vc.index_copy_(0, slots, v[0].transpose(0, 1))
            return k, v
        fmt, back = self.format, []
        lib = native_kernels() if self.native_writer else None
        ks, vs = self.scale_slots(layer)
        for new, codes, scales, value in ((k, kc, ks, False), (v, vc, vs, True)):
            rows = new[0].transpose(0, 1)
            if lib is not None:  # the C writer: the reference's codes, bit for bit
                q = torch.empty((rows.shape[0], *codes.shape[1:]), dtype=codes.dtype)
                s = torch.empty((rows.shape[0], *scales.shape[1:]), dtype=scales.dtype)
                kv_quantize(rows.contiguous(), q, s, torch.arange(rows.shape[0]), lib, value)
            else:
                q, s = fmt.quantize(rows, self.int4_fits, value)
            codes.index_copy_(0, slots, q)
            scales.index_copy_(0, slots, s)
            back.append(fmt.dequantize(q, s, new.dtype, value).transpose(0, 1)[None])
        return back[0], back[1]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        md = self.metadata
        if md is None:
            raise RuntimeError("PagedKVCache.attend called without metadata")
        if self.on_layer is not None:
            self.on_layer()
        h = self.rotation
        if h is not None:
            q, k, v = rotate_heads(q, h), rotate_heads(k, h), rotate_heads(v, h)
        k, v = self.write(layer, k, v, md.slot_mapping)
        try:
            out = self.backend.attend(self, layer, q, k, v, md)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # counted and served by the fallback, or raised (see the module docstring)
            if not self._fall_back(exc, md):
                raise
            out = self.backend.attend(self, layer, q, k, v, self.metadata)
        return out if h is None else rotate_heads(out, h)

    def _fall_back(self, exc: Exception, md: AttentionMetadata) -> bool:
        """Move to the backend's fallback for good (this step re-prepared for it); False where
        the failure must raise instead."""
        failed, fallback = self.backend, self.backend.fallback
        if fallback is None or self.on_kernel_failure == "raise" or md.context_lens_host is None:
            return False
        self.kernel_failures[failed.name] += 1
        log.warning(
            "the %s attention backend failed (%s: %s); %s serves from now on",
            failed.name,
            type(exc).__name__,
            exc,
            fallback.name,
        )
        self.backend = fallback
        self.metadata = fallback.prepare(self, md)
        return True

    def block_data(self, block_id: int) -> dict[str, Tensor]:
        """A copy of block ``block_id``'s whole content: each :attr:`storage` tensor's
        ``[:, block_id]`` (layers, block_size, kv_heads, width), cloned on the cache's device."""
        return {name: t[:, block_id].clone() for name, t in self.storage.items()}

    def load_block(self, block_id: int, data: dict[str, Tensor]) -> None:
        """Write ``data`` (as :meth:`block_data` gives it, on any device) into block ``block_id``."""
        for name, t in self.storage.items():
            dst, src = t[:, block_id], data[name]
            if dst.device.type == src.device.type == "cpu":
                # a plain copy in this thread: torch's copy of a few MB in strided rows wakes OpenMP
                # workers that cost more than they give, several times more on a busy machine
                np.copyto(dst.view(torch.uint8).numpy(), src.contiguous().view(torch.uint8).numpy())
            else:
                dst.copy_(src)

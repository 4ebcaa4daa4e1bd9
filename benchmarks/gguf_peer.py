"""GGUF files for llama.cpp peers, written from the weights we measure.

``write_dequantized(src, dst, dtype)`` copies a GGUF's metadata and writes every tensor
dequantized to float32 (or bfloat16 / float16 for the 2-D weights), so llama.cpp runs the very
weights our engine runs after converting the same file. Written atomically; reused when ``dst``
is newer than ``src``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def write_dequantized(src: str | Path, dst: str | Path, dtype: str = "f32") -> Path:
    import gguf

    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        for name, f in reader.fields.items():
            if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
                continue
            vtype = gguf.GGUFValueType(f.types[0])
            sub = gguf.GGUFValueType(f.types[1]) if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
            writer.add_key_value(name, f.contents(), vtype, sub)
        writer.add_file_type({"f32": 0, "f16": 1, "bf16": 32}[dtype])
        for t in reader.tensors:
            arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            if dtype == "f16" and arr.ndim == 2:
                writer.add_tensor(t.name, arr.astype(np.float16))
            elif dtype == "bf16" and arr.ndim == 2:
                bits = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16)
                writer.add_tensor(t.name, bits, raw_shape=bits.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                writer.add_tensor(t.name, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def float_checkpoint() -> Path:
    """The embedded model's weights dequantized to float32, as a checkpoint directory (for peers
    that load Hugging Face checkpoints, such as vLLM), converted once into the cache."""
    from minicpm.convert import convert_gguf
    from minicpm.default_model import cache_root, default_gguf

    target = cache_root() / "bench" / "smollm2-float32"
    if not (target / "config.json").exists():
        convert_gguf(default_gguf(), target, quantize="none")
    return target

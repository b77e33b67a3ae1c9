#!/usr/bin/env python3
"""Write tests/fixtures/quant/vectors.json: GGUF quantization test vectors from the `gguf` package.

Usage:  pip install gguf==0.19.0 && python3 tools/make_quant_vectors.py

For Q8_0 and Q4_0 the package's numpy reference quantizes random f32 rows (which the Rust test
checks our quantizer reproduces byte for byte); for all four formats (Q8_0, Q4_0, Q4_K, Q6_K) it
dequantizes random but valid blocks, including edge scales (zero, negative, subnormal, the f16
maximum). The Rust test `crates/kernels/tests/quant_vectors.rs` asserts that
`WeightMatrix::dequantize_row` gives exactly the package's f32 values from the same bytes.

All arrays are stored as lowercase hex of their little-endian bytes. Deterministic (fixed seed).
"""

import json
import os
import sys

import numpy as np

import gguf
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "quant", "vectors.json")

FORMATS = {"Q8_0": T.Q8_0, "Q4_0": T.Q4_0, "Q4_K": T.Q4_K, "Q6_K": T.Q6_K}
# Byte offsets of each block's f16 scale fields.
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}
EDGE_SCALES = [0.0, -0.0, 6.0e-8, -3.0e-5, 65504.0, -65504.0, 1.0, -0.125]


def hexf32(a):
    return np.ascontiguousarray(a, dtype="<f4").tobytes().hex()


def random_rows(rng, rows, cols):
    """Gaussian rows, with a few edge rows mixed in: zeros, a constant, one spike, tiny values."""
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[0, :32] = 0.0
    if rows > 1:
        x[1, :32] = 0.75
        x[1, 32:64] = np.where(np.arange(32) == 7, 50.0, 0.01).astype(np.float32)
    if rows > 2:
        x[2] *= np.float32(1e-3)
    return x


def random_blocks(rng, name, rows, cols):
    block, size = GGML_QUANT_SIZES[FORMATS[name]]
    n_blocks = rows * cols // block
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for b in range(n_blocks):
        for at in F16_FIELDS[name]:
            if b < len(EDGE_SCALES):
                v = EDGE_SCALES[(b + at) % len(EDGE_SCALES)]
            else:
                v = float(rng.standard_normal() * 0.02)
            raw[b, at:at + 2] = np.frombuffer(np.float16(v).tobytes(), dtype=np.uint8)
    return raw.reshape(rows, -1)


def main():
    rng = np.random.default_rng(20240611)
    cases = []
    for name in ["Q8_0", "Q4_0"]:
        qtype = FORMATS[name]
        rows, cols = 3, 160
        x = random_rows(rng, rows, cols)
        q = quantize(x, qtype)
        y = dequantize(q, qtype)
        assert y.shape == x.shape and np.all(np.isfinite(y))
        cases.append({
            "format": name, "source": "quantize", "rows": rows, "cols": cols,
            "input_f32": hexf32(x), "bytes": q.tobytes().hex(), "dequant_f32": hexf32(y),
        })
    for name in ["Q8_0", "Q4_0", "Q4_K", "Q6_K"]:
        qtype = FORMATS[name]
        block = GGML_QUANT_SIZES[qtype][0]
        rows, cols = 3, 2 * block if block == 256 else 5 * block
        raw = random_blocks(rng, name, rows, cols)
        y = dequantize(raw, qtype)
        assert y.shape == (rows, cols) and np.all(np.isfinite(y))
        cases.append({
            "format": name, "source": "random_blocks", "rows": rows, "cols": cols,
            "bytes": raw.tobytes().hex(), "dequant_f32": hexf32(y),
        })
    doc = {
        "generator": "tools/make_quant_vectors.py",
        "gguf_version": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "numpy_version": np.__version__,
        "block_sizes": {n: list(GGML_QUANT_SIZES[t]) for n, t in FORMATS.items()},
        "cases": cases,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes, {len(cases)} cases)", file=sys.stderr)


def _dist_version(name):
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()

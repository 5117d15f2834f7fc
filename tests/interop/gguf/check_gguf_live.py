#!/usr/bin/env python3
"""Live GGUF interop check against gguf-py 0.19.0 (run by tests/interop/gguf/live.sh).

    venv="$(bash tests/interop/gguf/setup_venv.sh | tail -n1)"
    "$venv/bin/python" tests/interop/gguf/check_gguf_live.py --migrate target/release/examples/migrate \
        --work DIR --seed N

From a fresh seed, writes a GGUF file with gguf.GGUFWriter (random shapes and values; Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1 quantized by gguf.quants.quantize, Q2_K..Q6_K as random raw blocks with sane f16 scales, the
plain types F32/F16/BF16/F64/I8/I16/I32/I64; KVs of every scalar type and arrays; 50% general.alignment
64 at a random position), the same file as GGUF v2, and a copy with one Q4_0 tensor's type id patched to
IQ4_NL (20).  Then ckptkit (`migrate`) converts and is checked against gguf-py's own reading of the file
(GGUFReader, gguf.quants.dequantize):

  plain      --to plain: same keys; plain tensors byte-identical (dtype, numpy shape); block-quantized
             ones F32 bit-identical to gguf.quants.dequantize (NaN / inf / -0 included)
  keep       --to keep: raw blocks U8 [rows, row_bytes] byte-identical; `ckptkit.gguf.tensors`
             (types, shapes); `ckptkit.gguf.kv` (every KV in file order, type names, exact values)
  keep→plain the kept file converted --to plain equals the plain output tensor by tensor
  v2         the v2 file gives the same plain output (and gguf_version 2 in `ckptkit.gguf.kv`)
  refusal    IQ4_NL refused: exit != 0, "unsupported GGUF tensor type" and the tensor's name in stderr
  verify     `migrate verify` exits 0 on the GGUF files and on ckptkit's outputs
  inspect    `migrate inspect --json` lists each quantized module as gguf:<TYPE> with its shape

Then the GGUF writer (spec/gguf.md §4, spec/layouts.md §8).  A float safetensors model, written by hand
(`<module>.weight` 2-D, 3-D and 4-D in F32 / F16 / BF16 with rows x1e-3 and x1e3, rounding-tie blocks, zero,
constant and +-max blocks, f16-scale overflow in F32; biases; weights that stay unquantized: exactly 1024
elements, fewer, rows that are not whole blocks, 1-D, a name not `.weight`, I32, F64):

  gguf:TYPE  for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, `--to gguf:TYPE --gguf-arch live`: GGUFReader parses it;
             quantizable weights are TYPE with the bytes of gguf.quants.quantize of the exact f32
             widening, every other tensor its dtype's ggml type and bytes; numpy shapes; version 3,
             alignment 32; general.architecture, general.quantization_version, ckptkit.gguf.tensors
             (type, shape, dtype when not F32) and ckptkit.blake3 (a digest for every tensor)
  -> plain   back --to plain: dequantize of the written blocks rounded to the model dtype, in that
             dtype; every other tensor unchanged
  verify     `migrate verify` reports every tensor checked; one flipped bit makes verify and convert fail

and the GGUF file above --to keep into GGUF (through a safetensors file, directly, and from the v2 file):
every tensor (K-quants included) with its type, shape and bytes, every KV but general.alignment typed and
byte-identical in the original order, besides them only ckptkit's two KVs; `migrate verify` checks all.

plus self-tests of the comparisons (a flipped bit, a wrong quantizer, a changed or moved KV must be caught).
One OK/FAIL line per check, then
`live gguf interop (seed N): P passed, F failed`; exit 1 on any failure.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import struct
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# The generator pins (and checks) the versions: gguf 0.19.0, numpy, safetensors.  Its K-quant d/dmin
# offsets and its independent GGUF parser are reused here.
import gen_gguf_fixtures as fx  # noqa: E402

import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402
import safetensors.numpy  # noqa: E402,F401
from gguf import GGUFReader, GGUFWriter  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFValueType as VT  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

ARCH = "ckptkit-live"
LEGACY = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
K_FIELDS = {qt: tuple(fields.values()) for _, qt, fields in fx.K_QUANTS}  # d (and dmin) byte offsets
BLOCK_TYPES = set(LEGACY) | set(K_FIELDS)
PLAIN_DTYPES = {Q.F32: "F32", Q.F16: "F16", Q.BF16: "BF16", Q.F64: "F64",
                Q.I8: "I8", Q.I16: "I16", Q.I32: "I32", Q.I64: "I64"}
ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "U8": 1}
VT_NAME = {VT.UINT8: "u8", VT.INT8: "i8", VT.UINT16: "u16", VT.INT16: "i16", VT.UINT32: "u32",
           VT.INT32: "i32", VT.FLOAT32: "f32", VT.BOOL: "bool", VT.STRING: "string", VT.ARRAY: "array",
           VT.UINT64: "u64", VT.INT64: "i64", VT.FLOAT64: "f64"}
INT_RANGE = {VT.UINT8: (0, 2**8), VT.INT8: (-2**7, 2**7), VT.UINT16: (0, 2**16), VT.INT16: (-2**15, 2**15),
             VT.UINT32: (0, 2**32), VT.INT32: (-2**31, 2**31), VT.UINT64: (0, 2**64),
             VT.INT64: (-2**63, 2**63)}
IQ4_NL = 20


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, problems: list[str], ok_detail: str = "") -> bool:
        if problems:
            self.failed += 1
            print(f"FAIL {name}:")
            for p in problems[:20]:
                print(f"    {p}")
            if len(problems) > 20:
                print(f"    ... and {len(problems) - 20} more")
            return False
        self.passed += 1
        print(f"OK   {name}" + (f": {ok_detail}" if ok_detail else ""))
        return True


# ------------------------------------------------------------------------------------------------
# Random contents
# ------------------------------------------------------------------------------------------------

def rand_text(rng: np.random.Generator, max_len: int = 12) -> str:
    alphabet = "abcxyz019 _-./\t\u00e9\u00fc\u2581\u2713\u4e16\u754c\U0001f600"
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=int(rng.integers(0, max_len + 1))))


def rand_f32(rng: np.random.Generator) -> float:
    """A float32 value (returned widened exactly), sometimes special."""
    specials = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -3.4028234663852886e38, 1.1754942e-38]
    if rng.random() < 0.3:
        return float(np.float32(specials[int(rng.integers(len(specials)))]))
    return float(np.float32(rng.standard_normal() * 10.0 ** rng.uniform(-8, 8)))


def rand_f64(rng: np.random.Generator) -> float:
    specials = [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 1.7976931348623157e308, 1.0 / 3.0]
    if rng.random() < 0.3:
        return specials[int(rng.integers(len(specials)))]
    return float(rng.standard_normal() * 10.0 ** rng.uniform(-300, 300))


def rand_int(rng: np.random.Generator, vt: VT) -> int:
    lo, hi = INT_RANGE[vt]
    if rng.random() < 0.2:
        return [lo, hi - 1, 0][int(rng.integers(3))]
    # full-width random value (numpy's integers cannot span 2^64 at once)
    return lo + int.from_bytes(rng.bytes(8), "little") % (hi - lo)


def make_kvs(rng: np.random.Generator, align64: bool) -> list[tuple]:
    """(key, vtype, value, sub_type) in the order they are added, general.architecture excluded."""
    p = f"{ARCH}.live"
    kvs: list[tuple] = [("general.name", VT.STRING, "live " + rand_text(rng), None),
                        ("general.quantization_version", VT.UINT32, 2, None)]
    for vt in (VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64):
        kvs.append((f"{p}.{VT_NAME[vt]}", vt, rand_int(rng, vt), None))
    kvs.append((f"{p}.u64_big", VT.UINT64, 2**63 + int(rng.integers(0, 2**62)), None))
    for i in range(2):
        kvs.append((f"{p}.f32_{i}", VT.FLOAT32, rand_f32(rng), None))
        kvs.append((f"{p}.f64_{i}", VT.FLOAT64, rand_f64(rng), None))
    kvs.append((f"{p}.bool", VT.BOOL, bool(rng.integers(2)), None))
    kvs.append((f"{p}.string", VT.STRING, rand_text(rng, 40), None))
    kvs.append((f"{p}.string_empty", VT.STRING, "", None))
    n = int(rng.integers(1, 7))
    kvs.append(("tokenizer.ggml.tokens", VT.ARRAY, [rand_text(rng) for _ in range(n)], VT.STRING))
    kvs.append(("tokenizer.ggml.scores", VT.ARRAY, [rand_f32(rng) for _ in range(n)], VT.FLOAT32))
    kvs.append((f"{p}.array_i32", VT.ARRAY, [rand_int(rng, VT.INT32) for _ in range(int(rng.integers(1, 6)))],
                VT.INT32))
    for vt in (VT.UINT64, VT.INT64, VT.UINT8, VT.INT16):
        kvs.append((f"{p}.array_{VT_NAME[vt]}", VT.ARRAY,
                    [rand_int(rng, vt) for _ in range(int(rng.integers(1, 6)))], vt))
    kvs.append((f"{p}.array_f64", VT.ARRAY, [rand_f64(rng) for _ in range(int(rng.integers(1, 5)))], VT.FLOAT64))
    kvs.append((f"{p}.array_bool", VT.ARRAY, [bool(b) for b in rng.integers(0, 2, size=int(rng.integers(1, 5)))],
                VT.BOOL))
    # shuffle all but the first two
    head, tail = kvs[:2], kvs[2:]
    tail = [tail[i] for i in rng.permutation(len(tail))]
    kvs = head + tail
    if align64:
        kvs.insert(int(rng.integers(0, len(kvs) + 1)), ("general.alignment", VT.UINT32, 64, None))
    return kvs


def legacy_source(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """N(0, sigma) with random sigma; some rows scaled by 1e-3; one block of zeros; sometimes a constant
    block and a block whose largest |x| appears with both signs."""
    cols = shape[-1]
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 1)
    flat = x.reshape(-1, cols)
    rows = flat.shape[0]
    flat[rng.random(rows) < 0.35] *= 1e-3
    nb = cols // 32
    r, b = int(rng.integers(rows)), int(rng.integers(nb))
    flat[r, b * 32:(b + 1) * 32] = 0.0
    if rng.random() < 0.5:
        r, b = int(rng.integers(rows)), int(rng.integers(nb))
        flat[r, b * 32:(b + 1) * 32] = rng.standard_normal()
    if rng.random() < 0.25:
        # a block whose f16 scale overflows to inf: its dequantization holds +-inf and NaN (inf * 0)
        r, b = int(rng.integers(rows)), int(rng.integers(nb))
        flat[r, b * 32:(b + 1) * 32] = rng.standard_normal(32) * 1e8
    if rng.random() < 0.5:
        r, b = int(rng.integers(rows)), int(rng.integers(nb))
        blk = flat[r, b * 32:(b + 1) * 32]
        i = int(np.argmax(np.abs(blk)))
        j = (i + 1 + int(rng.integers(31))) % 32
        blk[j] = -blk[i]
    return x.astype(np.float32)


def k_quant_raw(rng: np.random.Generator, qt: Q, rows: int, cols: int) -> np.ndarray:
    """Random block bytes with the f16 d (and dmin) of every block set to 2^u, u ~ U[-10, -4] (as
    gen_gguf_fixtures.k_quant_raw)."""
    block, tsize = GGML_QUANT_SIZES[qt]
    nb = cols // block
    raw = rng.integers(0, 256, size=(rows, nb, tsize), dtype=np.uint8)
    for off in K_FIELDS[qt]:
        d = np.exp2(rng.uniform(-10, -4, size=(rows, nb))).astype(np.float16)
        raw[:, :, off:off + 2] = d.view(np.uint8).reshape(rows, nb, 2)
    zeroed = raw.copy()
    for off in K_FIELDS[qt]:
        zeroed[:, :, off:off + 2] = 0
    assert np.all(dequantize(zeroed.reshape(rows, nb * tsize), qt) == 0), f"{qt.name}: d/dmin offsets"
    raw = raw.reshape(rows, nb * tsize)
    deq = dequantize(raw, qt)
    assert np.all(np.isfinite(deq)) and float(np.abs(deq).max()) < 1024.0, f"{qt.name}: dequant not sane"
    return raw


def random_bits(rng: np.random.Generator, x: np.ndarray, frac: float) -> None:
    """Overwrite a fraction of x's elements with random bit patterns (NaN payloads, subnormals, ...) and
    a few with NaN, +-inf, -0."""
    u = x.reshape(-1).view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.itemsize])
    idx = np.flatnonzero(rng.random(u.size) < frac)
    u[idx] = rng.integers(0, np.iinfo(u.dtype).max, size=idx.size, dtype=u.dtype, endpoint=True)
    f = x.reshape(-1)
    for v in (np.nan, np.inf, -np.inf, -0.0):
        if rng.random() < 0.5:
            f[int(rng.integers(f.size))] = v


def make_tensors(rng: np.random.Generator) -> list[tuple[str, np.ndarray, Q]]:
    """(name, array as handed to GGUFWriter, ggml type), in (shuffled) file order."""
    specs: list[tuple[str, np.ndarray, Q]] = []
    for qt in LEGACY:
        shape = (int(rng.integers(1, 7)), 32 * int(rng.integers(1, 17)))
        specs.append((qt.name.lower(), quantize(legacy_source(rng, shape), qt), qt))
    shape3 = (int(rng.integers(1, 4)), int(rng.integers(1, 4)), 32 * int(rng.integers(1, 5)))
    specs.append(("q8_0_3d", quantize(legacy_source(rng, shape3), Q.Q8_0), Q.Q8_0))
    qt1 = LEGACY[int(rng.integers(len(LEGACY)))]
    specs.append((qt1.name.lower() + "_1d", quantize(legacy_source(rng, (32 * int(rng.integers(1, 9)),)), qt1), qt1))
    for qt in K_FIELDS:
        specs.append((qt.name.lower(), k_quant_raw(rng, qt, int(rng.integers(1, 4)), 256 * int(rng.integers(1, 3))),
                      qt))

    def fshape(nd: int) -> tuple:
        return tuple(int(rng.integers(1, 7 if i < nd - 1 else 70)) for i in range(nd))

    f32 = rng.standard_normal(fshape(2)).astype(np.float32)
    random_bits(rng, f32, 0.1)
    specs.append(("token_embd", f32, Q.F32))
    f32_1d = rng.standard_normal(fshape(1)).astype(np.float32)
    random_bits(rng, f32_1d, 0.1)
    specs.append(("output_norm", f32_1d, Q.F32))
    f16 = (rng.standard_normal(fshape(2)) * 10.0 ** rng.uniform(-3, 3)).astype(np.float16)
    random_bits(rng, f16, 0.1)
    specs.append(("f16", f16, Q.F16))
    bf16_src = (rng.standard_normal(fshape(2)) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    random_bits(rng, bf16_src, 0.1)
    specs.append(("bf16", quantize(bf16_src, Q.BF16), Q.BF16))
    f64 = rng.standard_normal(fshape(1))
    random_bits(rng, f64, 0.1)
    specs.append(("f64", f64, Q.F64))
    specs.append(("i8", rng.integers(-128, 128, size=fshape(1), dtype=np.int8), Q.I8))
    specs.append(("i16", rng.integers(-2**15, 2**15, size=fshape(2), dtype=np.int16), Q.I16))
    specs.append(("i32", rng.integers(-2**31, 2**31, size=fshape(1), dtype=np.int32), Q.I32))
    specs.append(("i64", rng.integers(-2**63, 2**63 - 1, size=fshape(1), dtype=np.int64), Q.I64))

    order = rng.permutation(len(specs))
    out = []
    for i, k in enumerate(order):
        kind, a, qt = specs[k]
        # one module per tensor: ckptkit holds at most one block-quantized tensor per module
        name = f"{kind}.weight" if kind in ("token_embd", "output_norm") else f"blk.{i}.{kind}.weight"
        out.append((name, a, qt))
    return out


def write_gguf(path: Path, kvs: list[tuple], tensors: list[tuple[str, np.ndarray, Q]]) -> None:
    w = GGUFWriter(path, ARCH)
    for key, vt, value, sub in kvs:
        if key == "general.alignment":
            w.add_custom_alignment(value)
        else:
            w.add_key_value(key, value, vt, sub_type=sub)
    for name, a, qt in tensors:
        if qt in PLAIN_DTYPES and qt != Q.BF16:
            w.add_tensor(name, a)  # the numpy dtype gives the type, the array shape the numpy shape
        else:
            # uint8 block bytes: GGUFWriter converts the BYTE shape to the element shape itself
            w.add_tensor(name, a, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ------------------------------------------------------------------------------------------------
# Reading back
# ------------------------------------------------------------------------------------------------

def read_st(path: Path) -> tuple[dict[str, tuple[str, list[int], bytes]], dict[str, str]]:
    """safetensors file -> ({name: (dtype, shape, bytes)}, __metadata__), parsed byte-wise (numpy has no
    bfloat16, so safetensors.numpy cannot load BF16) and cross-checked with the safetensors library."""
    buf = path.read_bytes()
    n = struct.unpack("<Q", buf[:8])[0]
    header = json.loads(buf[8:8 + n])
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out = {}
    for k, v in header.items():
        s, e = v["data_offsets"]
        data = buf[base + s:base + e]
        assert len(data) == math.prod(v["shape"]) * ST_ITEMSIZE[v["dtype"]], f"{path.name}: {k}: size"
        out[k] = (v["dtype"], list(v["shape"]), data)
    with safe_open(str(path), "numpy") as f:
        assert (f.metadata() or {}) == meta, f"{path.name}: metadata differs from safetensors'"
        assert sorted(f.keys()) == sorted(out), f"{path.name}: keys differ from safetensors'"
        for k, (dt, shape, data) in out.items():
            if dt != "BF16":
                t = f.get_tensor(k)
                assert list(t.shape) == shape and t.tobytes() == data, f"{path.name}: {k} differs from safetensors'"
    return out, meta


class Expected:
    """What gguf-py makes of the GGUF file: per tensor its type, numpy shape, stored bytes, and (block
    types) gguf.quants.dequantize of the stored blocks."""

    def __init__(self, path: Path):
        self.reader = GGUFReader(path)
        self.tensors: dict[str, dict] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for rt in self.reader.tensors:
                qt = Q(rt.tensor_type)
                shape = [int(x) for x in reversed(rt.shape.tolist())]
                e = {"type": qt, "shape": shape, "raw": np.ascontiguousarray(rt.data).tobytes(),
                     "info_offset": int(rt.field.offset)}
                assert len(e["raw"]) == rt.n_bytes, rt.name
                if qt in BLOCK_TYPES:
                    block, tsize = GGML_QUANT_SIZES[qt]
                    deq = dequantize(rt.data, qt)
                    assert deq.dtype == np.float32 and list(deq.shape) == shape, f"{rt.name}: dequantize gave " \
                                                                                 f"{deq.dtype} {deq.shape}"
                    e["deq"] = np.ascontiguousarray(deq)
                    e["rows"] = math.prod(shape[:-1])
                    e["row_bytes"] = shape[-1] // block * tsize
                self.tensors[rt.name] = e


def type_field_offset(buf: bytes, info_offset: int) -> int:
    """Byte offset of a tensor info's u32 ggml type: name (u64 length + bytes), n_dims u32, ne u64 × n."""
    name_len = struct.unpack_from("<Q", buf, info_offset)[0]
    pos = info_offset + 8 + name_len
    n_dims = struct.unpack_from("<I", buf, pos)[0]
    return pos + 4 + 8 * n_dims


def bits_hex(a: np.ndarray) -> str:
    w = a.dtype.itemsize
    return f"0x{int(a.reshape(1).view({2: np.uint16, 4: np.uint32, 8: np.uint64}[w])[0]):0{2 * w}x}"


def compare_f32(name: str, qt: Q, got: bytes, want: np.ndarray) -> list[str]:
    g = np.frombuffer(got, dtype=np.uint32).reshape(want.shape)
    w = want.view(np.uint32)
    bad = np.argwhere(g != w)
    if len(bad) == 0:
        return []
    i = tuple(int(v) for v in bad[0])
    return [f"{name} ({qt.name}, shape {list(want.shape)}): {len(bad)} of {w.size} elements differ; first at "
            f"{list(i)}: ckptkit {int(g[i]):#010x} ({np.uint32(g[i]).view(np.float32)!r}), gguf-py dequantize "
            f"{int(w[i]):#010x} ({want[i]!r})"]


def compare_plain(exp: Expected, got: dict[str, tuple[str, list[int], bytes]]) -> tuple[list[str], int]:
    """Step 2's comparison: ckptkit's --to plain output against gguf-py."""
    problems = []
    if set(got) != set(exp.tensors):
        problems.append(f"key set differs: missing {sorted(set(exp.tensors) - set(got))}, "
                        f"extra {sorted(set(got) - set(exp.tensors))}")
    nq = 0
    for name, e in exp.tensors.items():
        if name not in got:
            continue
        dt, shape, data = got[name]
        qt = e["type"]
        if qt in BLOCK_TYPES:
            nq += 1
            if (dt, shape) != ("F32", e["shape"]):
                problems.append(f"{name} ({qt.name}): {dt} {shape}, want F32 {e['shape']}")
                continue
            problems += compare_f32(name, qt, data, e["deq"])
        else:
            if (dt, shape) != (PLAIN_DTYPES[qt], e["shape"]):
                problems.append(f"{name} ({qt.name}): {dt} {shape}, want {PLAIN_DTYPES[qt]} {e['shape']}")
            elif data != e["raw"]:
                k = next(i for i in range(len(data)) if data[i] != e["raw"][i])
                problems.append(f"{name} ({qt.name}): bytes differ from the GGUF's, first at byte {k}")
    return problems, nq


def compare_outputs(a: dict, b: dict) -> list[str]:
    problems = []
    if set(a) != set(b):
        problems.append(f"key sets differ: {sorted(set(a) ^ set(b))}")
    for k in sorted(set(a) & set(b)):
        if a[k][:2] != b[k][:2]:
            problems.append(f"{k}: {a[k][0]} {a[k][1]} vs {b[k][0]} {b[k][1]}")
        elif a[k][2] != b[k][2]:
            d = np.flatnonzero(np.frombuffer(a[k][2], np.uint8) != np.frombuffer(b[k][2], np.uint8))
            problems.append(f"{k} ({a[k][0]} {a[k][1]}): {d.size} bytes differ, first at byte {int(d[0])}")
    return problems


def json_value_problem(vt: VT, want, got, sub: VT | None) -> str | None:
    """None when ckptkit's JSON `got` is the value `want` of GGUF type vt; else what is wrong."""
    if vt == VT.ARRAY:
        if not isinstance(got, dict) or got.get("type") != "array" or got.get("elem") != VT_NAME[sub]:
            return f"array header {json.dumps(got)[:120]}, want type array, elem {VT_NAME[sub]}"
        items = got.get("value")
        if not isinstance(items, list) or len(items) != len(want):
            return f"array of {len(items) if isinstance(items, list) else items!r} items, want {len(want)}"
        for i, (w, g) in enumerate(zip(want, items)):
            p = json_value_problem(sub, w, g, None)
            if p:
                return f"[{i}]: {p}"
        return None
    if vt in (VT.FLOAT32, VT.FLOAT64):
        x = float(want)
        if math.isnan(x):
            return None if got == "nan" else f"{got!r}, want \"nan\""
        if math.isinf(x):
            s = "inf" if x > 0 else "-inf"
            return None if got == s else f"{got!r}, want {s!r}"
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            return f"{got!r}, want the number {x!r}"
        return None if struct.pack("<d", float(got)) == struct.pack("<d", x) else \
            f"{got!r} ({fx.f64_bits(float(got))}), want {x!r} ({fx.f64_bits(x)})"
    if vt == VT.BOOL:
        return None if got is want else f"{got!r}, want {want!r}"
    if vt == VT.STRING:
        return None if got == want else f"{got!r}, want {want!r}"
    return None if type(got) is int and got == want else f"{got!r}, want {want!r}"


def compare_kv(kvs: list[tuple], meta: dict, gguf_version: int) -> list[str]:
    s = meta.get("ckptkit.gguf.kv")
    if s is None:
        return ["no ckptkit.gguf.kv in __metadata__"]
    j = json.loads(s)
    problems = []
    if j.get("version") != 1 or j.get("gguf_version") != gguf_version:
        problems.append(f"version {j.get('version')!r}, gguf_version {j.get('gguf_version')!r} "
                        f"(want 1, {gguf_version})")
    got = j.get("kv", [])
    if [g.get("key") for g in got] != [k[0] for k in kvs]:
        problems.append(f"keys/order {[g.get('key') for g in got]}, want {[k[0] for k in kvs]}")
    for (key, vt, value, sub), g in zip(kvs, got):
        if g.get("key") != key:
            continue
        if g.get("type") != VT_NAME[vt]:
            problems.append(f"{key}: type {g.get('type')!r}, want {VT_NAME[vt]!r}")
            continue
        p = json_value_problem(vt, value, g.get("value"), sub)
        if p:
            problems.append(f"{key} ({VT_NAME[vt]}): {p}")
    return problems


def reader_kv_problems(r: GGUFReader, kvs: list[tuple]) -> list[str]:
    """The written KVs as GGUFReader reads them (a check of this script, not of ckptkit)."""
    fields = list(r.fields.items())[3:]
    if [n for n, _ in fields] != [k[0] for k in kvs]:
        return [f"GGUFReader keys {[n for n, _ in fields]} != written {[k[0] for k in kvs]}"]
    problems = []
    for (key, vt, value, sub), (_, f) in zip(kvs, fields):
        types = [vt] + ([sub] if vt == VT.ARRAY else [])
        got = f.contents()
        want = value
        if f.types != types or (vt == VT.ARRAY and len(got) != len(want)) or \
                not all(fx.same(a, b) or (isinstance(a, float) and math.isnan(a) and math.isnan(b))
                        for a, b in zip(got if vt == VT.ARRAY else [got], want if vt == VT.ARRAY else [want])):
            problems.append(f"GGUFReader reads {key} as {f.types} {got!r}, written {types} {want!r}")
    return problems


# ------------------------------------------------------------------------------------------------

class Migrate:
    def __init__(self, exe: str):
        self.exe = exe

    def run(self, *args: str, quiet: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([self.exe, *(["-q"] if quiet else []), *args], capture_output=True, text=True)

    def convert(self, src: Path, dst: Path, to: str) -> str | None:
        p = self.run("convert", str(src), str(dst), "--to", to)
        if p.returncode != 0:
            return f"migrate convert {src.name} {dst.name} --to {to}: exit {p.returncode}: {p.stderr.strip()[:800]}"
        return None


# ------------------------------------------------------------------------------------------------
# Writing GGUF (spec/gguf.md §4, spec/layouts.md §8): a float safetensors model --to gguf:TYPE, and the
# GGUF file above --to keep, into GGUF
# ------------------------------------------------------------------------------------------------

WRITER_ARCH = "live"
FLOATS = ("F32", "F16", "BF16")
ST_GGML = {v: k for k, v in PLAIN_DTYPES.items()}
CKPTKIT_KVS = ("ckptkit.gguf.tensors", "ckptkit.blake3")
GGUF_HEADER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")
BLAKE3_HEX = re.compile(r"[0-9a-f]{64}")


def widen(dtype: str, data: bytes, shape) -> np.ndarray:
    """F32 / F16 / BF16 bytes -> float32 array, exactly."""
    if dtype == "F32":
        a = np.frombuffer(data, "<f4")
    elif dtype == "F16":
        a = np.frombuffer(data, "<f2").astype(np.float32)
    else:
        a = (np.frombuffer(data, "<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)
    return a.reshape(shape)


def narrow(dtype: str, x: np.ndarray) -> bytes:
    """float32 -> the bytes of dtype: F16 numpy's astype (round to nearest even), BF16 gguf-py's
    (ggml_compute_fp32_to_bf16: round to nearest even)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "F32":
        return x.tobytes()
    if dtype == "F16":
        return x.astype(np.float16).tobytes()
    return quantize(x, Q.BF16).tobytes()


def is_quantizable(name: str, dtype: str, shape: list[int]) -> bool:
    """spec/layouts.md §8: a float `.weight` of 2 to 4 dims, > 1024 elements, whole 32-element rows."""
    return name.endswith(".weight") and dtype in FLOATS and 2 <= len(shape) <= 4 and math.prod(shape) > 1024 \
        and shape[-1] % 32 == 0


def tie_block(rng: np.random.Generator) -> np.ndarray:
    """32 multiples of s/2 (s a power of two) whose scale comes out exactly +-s for one legacy type
    (Q8_0: amax 127 s; Q4_0: amax 8 s; Q5_0: amax 16 s; Q4_1 / Q5_1: max - min = 15 s / 31 s), so x * id
    lands exactly on .5: the rounding ties.  Exact in F16 and BF16 (at most 8 significant bits)."""
    s = 2.0 ** int(rng.integers(-8, 5))
    kind = int(rng.integers(4))
    if kind < 3:
        a = (127, 8, 16)[kind]
        k = rng.integers(-2 * a, 2 * a + 1, size=32)
        k[int(rng.integers(32))] = 2 * a * (1 if rng.random() < 0.5 else -1)
        return k * s / 2
    span = (15, 31)[int(rng.integers(2))]
    k = rng.integers(0, 2 * span + 1, size=32)
    i, j = rng.choice(32, 2, replace=False)
    k[i], k[j] = 0, 2 * span
    return (int(rng.integers(-40, 10)) + k / 2) * s


def writer_values(rng: np.random.Generator, shape: tuple, dtype: str) -> np.ndarray:
    """N(0, sigma) with random sigma, some rows x1e-3 (F16 subnormals) and some x1e3; when the rows are whole
    blocks: rounding-tie blocks, sometimes a constant block and a block whose largest |x| appears with
    both signs, (F32) sometimes a block whose f16 scale overflows, and one all-zero block."""
    cols = shape[-1]
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 0.5)
    flat = x.reshape(-1, cols)
    rows = flat.shape[0]
    u = rng.random(rows)
    flat[u < 0.2] *= 1e-3
    flat[u > 0.8] *= 1e3
    if cols % 32 == 0:
        def block() -> np.ndarray:
            r, b = int(rng.integers(rows)), int(rng.integers(cols // 32))
            return flat[r, b * 32:(b + 1) * 32]
        for _ in range(int(rng.integers(1, 4))):
            block()[:] = tie_block(rng)
        if rng.random() < 0.5:
            block()[:] = rng.standard_normal()
        if rng.random() < 0.5:
            blk = block()
            i = int(np.argmax(np.abs(blk)))
            blk[(i + 1 + int(rng.integers(31))) % 32] = -blk[i]
        if dtype == "F32" and rng.random() < 0.25:
            block()[:] = rng.standard_normal(32) * 1e8
        block()[:] = 0.0
    return x.astype(np.float32)


def make_writer_model(rng: np.random.Generator) -> list[tuple[str, str, list[int], bytes]]:
    """(name, safetensors dtype, shape, bytes) of the float model that --to gguf:TYPE quantizes."""
    numbers = iter(int(i) for i in rng.permutation(40))  # blk.2 before blk.10: natural, not text order
    out: list[tuple[str, str, list[int], bytes]] = []

    def add(name: str, dtype: str, shape: tuple, values: np.ndarray | None = None) -> None:
        if values is None:
            values = writer_values(rng, shape, dtype)
        data = narrow(dtype, values) if dtype in FLOATS else np.ascontiguousarray(values).tobytes()
        out.append((name, dtype, [int(v) for v in shape], data))

    def draw(make, ok) -> tuple:
        while True:
            shape = make()
            if ok(math.prod(shape)):
                return shape

    def rint(lo: int, hi: int) -> int:
        return int(rng.integers(lo, hi + 1))

    def float_dtype() -> str:
        return FLOATS[int(rng.integers(3))]

    dtypes = list(FLOATS) + [float_dtype() for _ in range(rint(1, 3))]
    for k in rng.permutation(len(dtypes)):
        dt, i = dtypes[k], next(numbers)
        shape = draw(lambda: (rint(2, 40), 32 * rint(2, 16)), lambda n: n > 1024)
        add(f"blk.{i}.attn.weight", dt, shape)
        add(f"blk.{i}.attn.bias", dt, (shape[0],), rng.standard_normal(shape[0]).astype(np.float32))
    add(f"blk.{next(numbers)}.conv3.weight", float_dtype(),
        draw(lambda: (rint(2, 4), rint(2, 8), 32 * rint(1, 8)), lambda n: n > 1024))
    add(f"blk.{next(numbers)}.conv4.weight", float_dtype(),
        draw(lambda: (rint(1, 3), rint(2, 3), rint(2, 4), 32 * rint(1, 8)), lambda n: n > 1024))
    # not quantized: <= 1024 elements (exactly 1024, and fewer), rows of no whole blocks, 1-D, not a
    # `.weight`, not a float weight
    cols = 32 << rint(0, 5)
    add(f"blk.{next(numbers)}.small.weight", float_dtype(), (1024 // cols, cols))
    add(f"blk.{next(numbers)}.tiny.weight", float_dtype(),
        draw(lambda: (rint(2, 8), 32 * rint(1, 16)), lambda n: n <= 1024))
    add(f"blk.{next(numbers)}.odd.weight", float_dtype(),
        draw(lambda: (rint(2, 40), 32 * rint(2, 16) + rint(1, 31)), lambda n: n > 1024))
    add(f"blk.{next(numbers)}.norm.weight", float_dtype(), (32 * rint(33, 64),))
    add(f"blk.{next(numbers)}.pos.table", float_dtype(),
        draw(lambda: (rint(2, 40), 32 * rint(2, 16)), lambda n: n > 1024))
    shape = draw(lambda: (rint(2, 40), 32 * rint(2, 16)), lambda n: n > 1024)
    add(f"blk.{next(numbers)}.idx.weight", "I32", shape, rng.integers(-2**31, 2**31, size=shape, dtype=np.int32))
    shape = draw(lambda: (rint(2, 40), 32 * rint(2, 16)), lambda n: n > 1024)
    add(f"blk.{next(numbers)}.f64.weight", "F64", shape, rng.standard_normal(shape))
    return out


def write_st(path: Path, tensors: list[tuple[str, str, list[int], bytes]], rng: np.random.Generator) -> None:
    """A safetensors file by hand (numpy has no bfloat16), the data in random order."""
    header, chunks, off = {}, [], 0
    for k in rng.permutation(len(tensors)):
        name, dt, shape, data = tensors[k]
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        chunks.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(chunks))


def expected_gguf(model: list[tuple], qt: Q) -> dict[str, tuple[Q, list[int], bytes]]:
    """What --to gguf:TYPE must write: quantizable weights as gguf.quants.quantize of the f32 widening,
    every other tensor as the ggml type of its dtype, same bytes."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the quantizers' numpy warnings (f16 scale overflow)
        for name, dt, shape, data in model:
            if is_quantizable(name, dt, shape):
                out[name] = (qt, shape, quantize(widen(dt, data, shape), qt).tobytes())
            else:
                out[name] = (ST_GGML[dt], shape, data)
    return out


def read_gguf(path: Path) -> tuple[GGUFReader, dict[str, tuple[Q, list[int], bytes]], list[tuple]]:
    """GGUFReader's view: the reader, {name: (type, numpy shape, bytes)}, and the KVs as
    (key, types, serialized value bytes, contents) in file order."""
    r = GGUFReader(path)
    tensors = {rt.name: (Q(rt.tensor_type), [int(v) for v in reversed(rt.shape.tolist())],
                         np.ascontiguousarray(rt.data).tobytes()) for rt in r.tensors}
    assert len(tensors) == len(r.tensors), f"{path.name}: duplicate tensor names"
    kvs = [(k, list(f.types), b"".join(np.ascontiguousarray(p).tobytes() for p in f.parts[2:]), f.contents())
           for k, f in r.fields.items() if k not in GGUF_HEADER_FIELDS]
    return r, tensors, kvs


def elem_hex(b: bytes, itemsize: int) -> str:
    return "0x" + b[::-1].hex() if itemsize > 1 else f"0x{b[0]:02x}"


def bytes_diff(name: str, qt: Q, shape: list[int], got: bytes, want: bytes, src: np.ndarray | None) -> list[str]:
    """Where two tensors' bytes first differ: element (plain types) or block (block types), both in hex."""
    if len(got) != len(want):
        return [f"{name} ({qt.name}, shape {shape}): {len(got)} bytes, want {len(want)}"]
    d = np.flatnonzero(np.frombuffer(got, np.uint8) != np.frombuffer(want, np.uint8))
    k = int(d[0])
    if qt in BLOCK_TYPES:
        block, tsize = GGML_QUANT_SIZES[qt]
        b = k // tsize
        per_row = max(1, shape[-1] // block)
        g, w = got[b * tsize:(b + 1) * tsize], want[b * tsize:(b + 1) * tsize]
        out = [f"{name} ({qt.name}, shape {shape}): {d.size} of {len(want)} bytes differ; first at byte {k}: "
               f"block {b} (row {b // per_row}, elements {b % per_row * block}..{b % per_row * block + block - 1}), "
               f"byte {k % tsize} of the block: ckptkit 0x{got[k]:02x}, gguf-py 0x{want[k]:02x}",
               f"    ckptkit block {g.hex()}", f"    gguf-py block {w.hex()}"]
        if src is not None:
            v = np.ascontiguousarray(src, dtype=np.float32).reshape(-1)[b * block:(b + 1) * block]
            out.append("    f32 input " + " ".join(f"{int(u):08x}" for u in v.view(np.uint32)))
        return out
    size = {Q.F32: 4, Q.F16: 2, Q.BF16: 2, Q.F64: 8, Q.I8: 1, Q.I16: 2, Q.I32: 4, Q.I64: 8}[qt]
    i = k // size
    return [f"{name} ({qt.name}, shape {shape}): {d.size} of {len(want)} bytes differ; first at element {i}: "
            f"ckptkit {elem_hex(got[i * size:(i + 1) * size], size)}, "
            f"want {elem_hex(want[i * size:(i + 1) * size], size)}"]


def compare_gguf_tensors(got: dict, want: dict, src: dict | None = None) -> list[str]:
    problems = []
    if set(got) != set(want):
        problems.append(f"tensor names: missing {sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}")
    for name, (wt, ws, wb) in want.items():
        if name not in got:
            continue
        gt, gs, gb = got[name]
        if (gt, gs) != (wt, ws):
            problems.append(f"{name}: {gt.name} {gs}, want {wt.name} {ws}")
        elif gb != wb:
            problems += bytes_diff(name, wt, ws, gb, wb, (src or {}).get(name))
    return problems


def gguf_output_problems(r: GGUFReader, kvs: list[tuple], tensors: dict, want_tensors_kv: dict) -> list[str]:
    """What every GGUF ckptkit writes has: version 3, alignment 32 (every tensor's data aligned),
    `ckptkit.gguf.tensors` as expected, `ckptkit.blake3` naming every tensor with a lowercase hex digest."""
    problems = []
    if int(r.fields["GGUF.version"].contents()) != 3:
        problems.append(f"GGUF version {r.fields['GGUF.version'].contents()}, want 3")
    if int(r.alignment) != 32 or r.data_offset % 32 or any((rt.data_offset - r.data_offset) % 32 for rt in r.tensors):
        problems.append(f"alignment {r.alignment}, data at {r.data_offset}, tensors at "
                        f"{[rt.data_offset - r.data_offset for rt in r.tensors]}: want 32-aligned")
    kv = {k: (t, c) for k, t, _, c in kvs}
    for key in CKPTKIT_KVS:
        if kv.get(key, ([],))[0] != [VT.STRING]:
            problems.append(f"{key}: {kv.get(key)!r:.200}, want a string KV")
    if problems:
        return problems
    j = json.loads(kv["ckptkit.gguf.tensors"][1])
    want = {"version": 1, "tensors": want_tensors_kv}
    if j != want:
        problems.append(f"ckptkit.gguf.tensors {json.dumps(j)[:600]}, want {json.dumps(want)[:600]}")
    digests = json.loads(kv["ckptkit.blake3"][1])
    if not isinstance(digests, dict) or set(digests) != set(tensors) or \
            not all(isinstance(v, str) and BLAKE3_HEX.fullmatch(v) for v in digests.values()):
        problems.append(f"ckptkit.blake3 {json.dumps(digests)[:400]}: want every tensor -> 64 lowercase hex digits")
    return problems


def verify_problems(m: Migrate, path: Path, n: int) -> list[str]:
    """`migrate verify` exits 0 and reports all n tensors checked against their blake3."""
    p = m.run("verify", str(path), quiet=False)
    out = (p.stdout + p.stderr).strip()
    if p.returncode != 0:
        return [f"migrate verify {path.name}: exit {p.returncode}: {out[:400]}"]
    if not re.search(rf"\bok: {n} tensors\b.*verified", out) or "no recorded hash" in out:
        return [f"migrate verify {path.name}: {out[:400]!r}, want \"ok: {n} tensors ... verified\", none unchecked"]
    return []


def flipped_problems(m: Migrate, path: Path, rng: np.random.Generator) -> tuple[list[str], str]:
    """One bit of one tensor's data flipped in a copy: `migrate verify` and a conversion must fail, naming it."""
    r = GGUFReader(path)
    blocks = [rt for rt in r.tensors if Q(rt.tensor_type) in BLOCK_TYPES]
    pool = blocks if blocks and rng.random() < 0.5 else list(r.tensors)
    rt = pool[int(rng.integers(len(pool)))]
    k = int(rt.data_offset) + int(rng.integers(int(rt.n_bytes)))
    b = bytearray(path.read_bytes())
    b[k] ^= 1 << int(rng.integers(8))
    bad = path.with_name(path.stem + ".flipped.gguf")
    bad.write_bytes(bytes(b))
    problems = []
    p = m.run("verify", str(bad))
    if p.returncode == 0:
        problems.append(f"{bad.name}: a flipped bit in {rt.name} (file byte {k}) passed migrate verify (exit 0)")
    elif rt.name not in p.stderr:
        problems.append(f"{bad.name}: migrate verify exit {p.returncode} without naming {rt.name}: "
                        f"{p.stderr.strip()[:300]}")
    q = m.run("convert", str(bad), str(bad.with_suffix(".safetensors")), "--to", "plain")
    if q.returncode == 0:
        problems.append(f"{bad.name}: a flipped bit in {rt.name} (file byte {k}) passed migrate convert (exit 0)")
    return problems, f"{rt.name} byte {k}"


def plain_back_problems(got: dict, model: list[tuple], qt: Q, blocks: dict) -> list[str]:
    """--to plain of a gguf:TYPE output: quantized weights are gguf.quants.dequantize of the blocks written,
    rounded to the model's dtype, in that dtype; every other tensor unchanged."""
    problems = []
    names = {t[0] for t in model}
    if set(got) != names:
        problems.append(f"tensor names: missing {sorted(names - set(got))}, extra {sorted(set(got) - names)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, dt, shape, data in model:
            if name not in got:
                continue
            deq = None
            if is_quantizable(name, dt, shape):
                bt, _, bb = blocks[name]
                if bt != qt:
                    continue  # reported by the gguf:TYPE check
                deq = dequantize(np.frombuffer(bb, np.uint8).reshape(math.prod(shape[:-1]), -1), qt).reshape(shape)
                data = narrow(dt, deq)
            gdt, gshape, gdata = got[name]
            if (gdt, gshape) != (dt, shape):
                problems.append(f"{name}: {gdt} {gshape}, want {dt} {shape}")
            elif gdata != data:
                size = ST_ITEMSIZE[dt]
                d = np.flatnonzero(np.frombuffer(gdata, np.uint8) != np.frombuffer(data, np.uint8))
                i = int(d[0]) // size
                msg = (f"{name} ({dt} {shape}{', ' + qt.name + ' dequantized' if deq is not None else ''}): "
                       f"{d.size} bytes differ; first at element {i}: ckptkit "
                       f"{elem_hex(gdata[i * size:(i + 1) * size], size)}, "
                       f"want {elem_hex(data[i * size:(i + 1) * size], size)}")
                if deq is not None:
                    msg += f" (gguf-py dequantize {bits_hex(deq.reshape(-1)[i:i + 1])})"
                problems.append(msg)
    return problems


def kept_gguf_problems(tensors: dict, kvs: list[tuple], orig_tensors: dict, orig_kvs: list[tuple]) -> list[str]:
    """A GGUF written --to keep from the original: every tensor (by name) with its type, shape and bytes;
    every KV but general.alignment, typed, byte-identical value, in the original's relative order; besides
    them only ckptkit's two KVs (and general.alignment, if at all, as u32 32)."""
    problems = compare_gguf_tensors(tensors, orig_tensors)
    want = [kv for kv in orig_kvs if kv[0] != "general.alignment"]
    got = []
    for kv in kvs:
        if kv[0] in CKPTKIT_KVS:
            continue
        if kv[0] == "general.alignment" and (kv[1], kv[3]) == ([VT.UINT32], 32):
            continue
        got.append(kv)
    if [k[0] for k in got] != [k[0] for k in want]:
        problems.append(f"KV keys/order {[k[0] for k in got]}, want {[k[0] for k in want]}")
    g = {k[0]: k for k in got}
    for key, types, raw, contents in want:
        if key not in g:
            continue
        _, gtypes, graw, gcontents = g[key]
        if (gtypes, graw) != (types, raw):
            problems.append(f"KV {key}: {[t.name for t in gtypes]} {gcontents!r:.120} ({graw[:40].hex()}), "
                            f"want {[t.name for t in types]} {contents!r:.120} ({raw[:40].hex()})")
    return problems


def run_writer(rep: Report, seed: int, work: Path, m: Migrate, v3: Path, v2: Path) -> None:
    rng = np.random.default_rng([seed, 1])  # the model depends on the seed alone

    # ---- 8. a float safetensors model --to gguf:TYPE (W1, W2)
    model = make_writer_model(rng)
    st = work / "writer.safetensors"
    write_st(st, model, rng)
    problems = []
    try:
        back, _ = read_st(st)
        if back != {name: (dt, shape, data) for name, dt, shape, data in model}:
            problems.append("read back other tensors than written")
    except AssertionError as e:
        problems.append(f"the safetensors file: {e}")
    nq = sum(is_quantizable(n, dt, s) for n, dt, s, _ in model)
    counts = {dt: sum(is_quantizable(n, d, s) for n, d, s, _ in model if d == dt) for dt in FLOATS}
    rep.check("writer: the float safetensors model as intended (safetensors reads it back)", problems,
              f"{len(model)} tensors, {nq} quantizable ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    src = {n: widen(dt, data, s) for n, dt, s, data in model if is_quantizable(n, dt, s)}
    outs: list[tuple[Q, Path, dict]] = []
    selftest: dict = {}
    for qt in LEGACY:
        out = work / f"writer.{qt.name.lower()}.gguf"
        title = f"gguf:{qt.name}: quantizable weights byte-identical to gguf.quants.quantize, others kept"
        p = m.run("convert", str(st), str(out), "--to", f"gguf:{qt.name.lower()}", "--gguf-arch", WRITER_ARCH)
        if p.returncode != 0:
            rep.check(title, [f"migrate convert {st.name} {out.name} --to gguf:{qt.name.lower()} --gguf-arch "
                              f"{WRITER_ARCH}: exit {p.returncode}: {p.stderr.strip()[:800]}"])
            continue
        r, tensors, kvs = read_gguf(out)
        want = expected_gguf(model, qt)
        problems = compare_gguf_tensors(tensors, want, src)
        kv = {k: (t, c) for k, t, _, c in kvs}
        if not kvs or kvs[0][0] != "general.architecture" or kv["general.architecture"] != ([VT.STRING], WRITER_ARCH):
            problems.append(f"first KV {kvs[0][:2] if kvs else None}, general.architecture "
                            f"{kv.get('general.architecture')}: want the string {WRITER_ARCH!r} first")
        if kv.get("general.quantization_version") != ([VT.UINT32], 2):
            problems.append(f"general.quantization_version {kv.get('general.quantization_version')}, want u32 2")
        extra = set(kv) - {"general.architecture", "general.quantization_version", *CKPTKIT_KVS}
        if extra:
            problems.append(f"unexpected KVs {sorted(extra)}")
        problems += gguf_output_problems(r, kvs, tensors, {
            n: {"type": qt.name, "shape": s, **({"dtype": dt} if dt != "F32" else {})}
            for n, dt, s, _ in model if is_quantizable(n, dt, s)})
        rep.check(title, problems, f"{sum(t[0] == qt for t in tensors.values())} {qt.name}, "
                                   f"{sum(t[0] != qt for t in tensors.values())} kept")
        outs.append((qt, out, tensors))
        if not selftest:
            other = LEGACY[(LEGACY.index(qt) + 1) % len(LEGACY)]
            selftest = {"qt": qt, "tensors": tensors, "want": want, "other": expected_gguf(model, other)}

        # ---- 9. back --to plain (W3)
        plain = work / f"writer.{qt.name.lower()}.plain.safetensors"
        title = f"gguf:{qt.name} -> plain: dequantize rounded to the model dtype, others unchanged"
        err = m.convert(out, plain, "plain")
        if err:
            rep.check(title, [err])
            continue
        got, _ = read_st(plain)
        rep.check(title, plain_back_problems(got, model, qt, tensors), f"{len(got)} tensors")
        if "plain" not in selftest:
            selftest.update(plain=got, plain_qt=qt, plain_blocks=tensors)

    # ---- 10. verify the gguf:TYPE outputs; a flipped bit fails (W2 f)
    problems, flips = [], []
    for qt, out, tensors in outs:
        problems += verify_problems(m, out, len(tensors))
        p, where = flipped_problems(m, out, rng)
        problems += p
        flips.append(where)
    if not outs:
        problems.append("no gguf:TYPE output to verify")
    rep.check("verify: every gguf:TYPE output's tensors checked (blake3); a flipped bit fails verify and convert",
              problems, f"{len(outs)} files; flipped: {'; '.join(flips)}")

    # ---- 11. the GGUF file above --to keep into GGUF: through safetensors (W4), directly (W5), from v2
    _, orig_tensors, orig_kvs = read_gguf(v3)
    orig_tensor_kv = {n: {"type": t.name, "shape": s} for n, (t, s, _) in orig_tensors.items() if t in BLOCK_TYPES}
    x = work / "live-v3.keep2.safetensors"
    routes = [("gguf -> keep -> .safetensors -> keep -> .gguf", [(v3, x), (x, work / "live-v3.y.gguf")]),
              ("gguf -> keep -> .gguf", [(v3, work / "live-v3.z.gguf")]),
              ("gguf v2 -> keep -> .gguf", [(v2, work / "live-v2.z.gguf")])]
    for title, steps in routes:
        title += ": every tensor, KV (but general.alignment) as the original, in order; verify"
        err = next((e for a, b in steps if (e := m.convert(a, b, "keep"))), None)
        if err:
            rep.check(title, [err])
            continue
        out = steps[-1][1]
        r, tensors, kvs = read_gguf(out)
        problems = kept_gguf_problems(tensors, kvs, orig_tensors, orig_kvs)
        problems += gguf_output_problems(r, kvs, tensors, orig_tensor_kv)
        problems += verify_problems(m, out, len(tensors))
        rep.check(title, problems, f"{len(tensors)} tensors "
                                   f"({sum(t[0] in BLOCK_TYPES for t in tensors.values())} block), {len(kvs)} KVs")
        selftest.setdefault("kept", (tensors, kvs))

    # ---- 12. the new comparisons catch a wrong quantizer, a flipped bit, a changed KV
    problems = []
    if "want" in selftest:
        qname = next(n for n, (t, _, _) in selftest["want"].items() if t == selftest["qt"])
        if not compare_gguf_tensors(selftest["tensors"], selftest["other"]):
            problems.append("gguf:TYPE compared against another type's quantize went unnoticed")
        bad = dict(selftest["want"])
        t, s, b = bad[qname]
        k = int(rng.integers(len(b)))
        bad[qname] = (t, s, b[:k] + bytes([b[k] ^ (1 << int(rng.integers(8)))]) + b[k + 1:])
        if not compare_gguf_tensors(selftest["tensors"], bad):
            problems.append(f"a flipped bit in {qname}'s expected blocks (byte {k}) went unnoticed")
    if "plain" in selftest:
        qname = next(n for n, dt, s, _ in model if is_quantizable(n, dt, s))
        bad = dict(selftest["plain"])
        dt, s, b = bad[qname]
        k = int(rng.integers(len(b)))
        bad[qname] = (dt, s, b[:k] + bytes([b[k] ^ (1 << int(rng.integers(8)))]) + b[k + 1:])
        if not plain_back_problems(bad, model, selftest["plain_qt"], selftest["plain_blocks"]):
            problems.append(f"a flipped bit in the plain {qname} (byte {k}) went unnoticed")
    if "kept" in selftest:
        tensors, kvs = selftest["kept"]
        kname = next(n for n, (t, _, _) in orig_tensors.items() if t in K_FIELDS)
        bad = dict(tensors)
        t, s, b = bad[kname]
        k = int(rng.integers(len(b)))
        bad[kname] = (t, s, b[:k] + bytes([b[k] ^ (1 << int(rng.integers(8)))]) + b[k + 1:])
        if not kept_gguf_problems(bad, kvs, orig_tensors, orig_kvs):
            problems.append(f"a flipped bit in the kept {kname} (byte {k}) went unnoticed")
        i = next(i for i, kv in enumerate(kvs) if kv[1] == [VT.FLOAT64])
        bad_kvs = list(kvs)
        key, types, raw, contents = kvs[i]
        bad_kvs[i] = (key, types, raw[:-1] + bytes([raw[-1] ^ 1]), contents)
        if not kept_gguf_problems(tensors, bad_kvs, orig_tensors, orig_kvs):
            problems.append(f"a changed f64 KV ({key}) went unnoticed")
        if not kept_gguf_problems(tensors, kvs[1:2] + kvs[:1] + kvs[2:], orig_tensors, orig_kvs):
            problems.append("two swapped KVs went unnoticed")
    if len(selftest) < 3:
        problems.append("not every comparison had an output to test with")
    rep.check("writer checker self-test (a wrong quantizer, flipped bits, a changed KV are caught)", problems)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--migrate", required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--seed", type=int, required=True)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rep = Report()
    t0 = time.time()
    try:
        run(rep, args.seed, args.work, Migrate(args.migrate))
    except Exception:  # an output that cannot be read, a crash of this script: a failure, with the trace
        traceback.print_exc(file=sys.stdout)
        rep.check("the checks ran to the end", ["unexpected exception (above)"])
    print(f"({time.time() - t0:.1f} s)")
    print(f"live gguf interop (seed {args.seed}): {rep.passed} passed, {rep.failed} failed")
    return 0 if rep.failed == 0 and rep.passed > 0 else 1


def run(rep: Report, seed: int, work: Path, m: Migrate) -> None:

    # ---- 1. the GGUF files
    rng = np.random.default_rng(seed)
    align64 = bool(rng.integers(2))
    kvs_written = make_kvs(rng, align64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warnings of the quantizers on zero blocks
        tensors = make_tensors(rng)
    v3 = work / "live-v3.gguf"
    write_gguf(v3, kvs_written, tensors)
    kvs = [("general.architecture", VT.STRING, ARCH, None)] + kvs_written
    buf = v3.read_bytes()
    v2 = work / "live-v2.gguf"
    v2.write_bytes(buf[:4] + struct.pack("<I", 2) + buf[8:])
    exp = Expected(v3)
    types = sorted({e["type"].name for e in exp.tensors.values()})
    print(f"seed {seed}: {len(exp.tensors)} tensors ({', '.join(types)}), {len(kvs)} KVs, alignment "
          f"{int(exp.reader.alignment)}, {len(buf)} bytes")
    # the file as written (the script's own precondition): the independent parser and GGUFReader agree,
    # GGUFReader sees the KVs and the tensor bytes that were written
    problems = []
    try:
        parsed = fx.parse_gguf(buf)
        fx.crosscheck(v3, parsed)
    except fx.Mismatch as e:
        problems.append(f"gguf-py and the independent parser disagree: {e}")
        parsed = None
    problems += reader_kv_problems(exp.reader, kvs)
    for (name, a, qt), rt in zip(tensors, exp.reader.tensors):
        if rt.name != name or Q(rt.tensor_type) != qt or exp.tensors[name]["raw"] != np.ascontiguousarray(a).tobytes():
            problems.append(f"{name}: GGUFReader reads {rt.name} {Q(rt.tensor_type).name}, other bytes")
    if int(exp.reader.alignment) != (64 if align64 else 32):
        problems.append(f"alignment {exp.reader.alignment}")
    rep.check("gguf-py wrote the file as intended (GGUFReader, independent parser)", problems,
              f"alignment {int(exp.reader.alignment)}")

    # ---- 2. --to plain
    plain = work / "live-v3.plain.safetensors"
    err = m.convert(v3, plain, "plain")
    got_plain = meta_plain = None
    if err:
        rep.check("plain: --to plain bit-identical to gguf.quants.dequantize", [err])
    else:
        got_plain, meta_plain = read_st(plain)
        problems, nq = compare_plain(exp, got_plain)
        rep.check("plain: --to plain bit-identical to gguf.quants.dequantize", problems,
                  f"{len(got_plain)} tensors, {nq} dequantized bit-identical, {len(got_plain) - nq} byte-identical")
        problems = compare_kv(kvs, meta_plain, 3)
        if "ckptkit.gguf.tensors" in meta_plain:
            problems.append("ckptkit.gguf.tensors present in a plain output (no layer is kept as blocks)")
        rep.check("plain: __metadata__ ckptkit.gguf.kv (and no ckptkit.gguf.tensors)", problems)

        # the comparison itself must catch one flipped bit (a quantized and a plain tensor)
        problems = []
        for want_type in (BLOCK_TYPES, set(PLAIN_DTYPES)):
            name = next(n for n, e in exp.tensors.items() if e["type"] in want_type)
            dt, shape, data = got_plain[name]
            k = int(rng.integers(len(data)))
            bad = dict(got_plain)
            bad[name] = (dt, shape, data[:k] + bytes([data[k] ^ (1 << int(rng.integers(8)))]) + data[k + 1:])
            if not compare_plain(exp, bad)[0]:
                problems.append(f"a flipped bit in {name} (byte {k}) went unnoticed")
            if not compare_outputs(got_plain, bad):
                problems.append(f"compare_outputs missed a flipped bit in {name}")
        bad_kvs = list(kvs)
        i = next(i for i, k in enumerate(kvs) if k[1] == VT.UINT64)
        bad_kvs[i] = (kvs[i][0], VT.UINT64, kvs[i][2] ^ 1, None)
        if not compare_kv(bad_kvs, meta_plain, 3):
            problems.append("a changed u64 KV went unnoticed")
        rep.check("checker self-test (flipped bits are caught)", problems)

    # ---- 3. --to keep
    keep = work / "live-v3.keep.safetensors"
    err = m.convert(v3, keep, "keep")
    if err:
        rep.check("keep: raw blocks byte-identical + ckptkit.gguf.tensors", [err])
        rep.check("keep: ckptkit.gguf.kv (every KV, in order, typed, exact)", [err])
    else:
        got_keep, meta_keep = read_st(keep)
        problems = []
        if set(got_keep) != set(exp.tensors):
            problems.append(f"key set differs: {sorted(set(got_keep) ^ set(exp.tensors))}")
        want_entry = {}
        for name, e in exp.tensors.items():
            if name not in got_keep:
                continue
            dt, shape, data = got_keep[name]
            qt = e["type"]
            if qt in BLOCK_TYPES:
                want_entry[name] = {"type": qt.name, "shape": e["shape"]}
                want = ("U8", [e["rows"], e["row_bytes"]])
            else:
                want = (PLAIN_DTYPES[qt], e["shape"])
            if (dt, shape) != want:
                problems.append(f"{name} ({qt.name}): {dt} {shape}, want {want[0]} {want[1]}")
            elif data != e["raw"]:
                k = next(i for i in range(len(data)) if data[i] != e["raw"][i])
                problems.append(f"{name} ({qt.name}): bytes differ from the GGUF's, first at byte {k}")
        s = meta_keep.get("ckptkit.gguf.tensors")
        if s is None:
            problems.append("no ckptkit.gguf.tensors in __metadata__")
        else:
            j = json.loads(s)
            if j.get("version") != 1 or set(j) != {"version", "tensors"}:
                problems.append(f"ckptkit.gguf.tensors: keys {sorted(j)}, version {j.get('version')!r}")
            entry = j.get("tensors", {})
            for name in sorted(set(entry) | set(want_entry)):
                if entry.get(name) != want_entry.get(name):
                    problems.append(f"ckptkit.gguf.tensors[{name!r}] = {entry.get(name)}, want {want_entry.get(name)}")
        rep.check("keep: raw blocks byte-identical + ckptkit.gguf.tensors", problems,
                  f"{len(want_entry)} block tensors, {len(got_keep) - len(want_entry)} plain")
        rep.check("keep: ckptkit.gguf.kv (every KV, in order, typed, exact)", compare_kv(kvs, meta_keep, 3),
                  f"{len(kvs)} KVs")

        # ---- 4. keep -> plain
        plain2 = work / "live-v3.keep.plain.safetensors"
        err = m.convert(keep, plain2, "plain")
        if err:
            rep.check("keep -> plain equals gguf -> plain", [err])
        elif got_plain is None:
            rep.check("keep -> plain equals gguf -> plain", ["no gguf -> plain output to compare with"])
        else:
            got2, meta2 = read_st(plain2)
            problems = compare_outputs(got_plain, got2)
            problems += [f"kv: {p}" for p in compare_kv(kvs, meta2, 3)]
            rep.check("keep -> plain equals gguf -> plain", problems, f"{len(got2)} tensors")

    # ---- 5. v2
    plain_v2 = work / "live-v2.plain.safetensors"
    err = m.convert(v2, plain_v2, "plain")
    if err:
        rep.check("v2: same plain output as v3", [err])
    elif got_plain is None:
        rep.check("v2: same plain output as v3", ["no v3 plain output to compare with"])
    else:
        got_v2, meta_v2 = read_st(plain_v2)
        problems = compare_outputs(got_plain, got_v2) + [f"kv: {p}" for p in compare_kv(kvs, meta_v2, 2)]
        rep.check("v2: same plain output as v3", problems, "gguf_version 2 recorded")

    # ---- 6. refusal of an unsupported type (IQ4_NL: 32-element blocks of 18 bytes, as Q4_0)
    victim = next(n for n, e in exp.tensors.items() if e["type"] == Q.Q4_0)
    off = type_field_offset(buf, exp.tensors[victim]["info_offset"])
    problems, msg = [], ""
    if struct.unpack_from("<I", buf, off)[0] != int(Q.Q4_0):
        problems.append(f"type field of {victim} not found at {off}")
    if parsed is not None:
        info = next(t for t in parsed["tensors"] if t["name"] == victim)
        if off != info["info_end"] - 12:
            problems.append(f"type field offset {off} != independent parser's {info['info_end'] - 12}")
    bad = work / "iq4_nl.gguf"
    bb = bytearray(buf)
    struct.pack_into("<I", bb, off, IQ4_NL)
    bad.write_bytes(bytes(bb))
    rt = next(t for t in GGUFReader(bad).tensors if t.name == victim)
    if Q(rt.tensor_type) != Q.IQ4_NL or np.ascontiguousarray(rt.data).tobytes() != exp.tensors[victim]["raw"]:
        problems.append(f"GGUFReader reads the patched {victim} as {Q(rt.tensor_type).name}, other bytes")
    if not problems:
        for to in ("plain", "keep"):
            p = m.run("convert", str(bad), str(work / f"iq4_nl.{to}.safetensors"), "--to", to)
            if p.returncode == 0:
                problems.append(f"--to {to}: ckptkit converted a file with an IQ4_NL tensor (exit 0)")
            elif "unsupported GGUF tensor type" not in p.stderr or victim not in p.stderr:
                problems.append(f"--to {to}: exit {p.returncode}, but stderr lacks \"unsupported GGUF tensor type\" "
                                f"or {victim!r}: {p.stderr.strip()[:400]}")
            elif to == "plain":
                msg = p.stderr.strip().replace("\n", " ")[:200]
    rep.check(f"refusal: {victim} patched to IQ4_NL (20)", problems, msg)

    # ---- 7. verify, inspect
    problems = []
    for f in (v3, v2, plain, keep):
        if not f.exists():
            continue
        p = m.run("verify", str(f))
        if p.returncode != 0:
            problems.append(f"migrate verify {f.name}: exit {p.returncode}: {(p.stdout + p.stderr).strip()[:400]}")
    rep.check("verify: exit 0 on the v3 and v2 files and on the plain and keep outputs", problems)

    p = m.run("inspect", "--json", str(v3))
    problems = []
    if p.returncode != 0:
        problems.append(f"migrate inspect --json: exit {p.returncode}: {p.stderr.strip()[:400]}")
    else:
        layers = {layer["path"]: layer for layer in json.loads(p.stdout)["layers"]}
        for name, e in exp.tensors.items():
            module = name.rsplit(".", 1)[0]
            layer = layers.get(module)
            if layer is None:
                problems.append(f"module {module} not listed")
            elif e["type"] in BLOCK_TYPES:
                want = ("gguf:" + e["type"].name, [["weight", "F32", e["shape"]]])
                if (layer.get("layout"), layer.get("tensors")) != want:
                    problems.append(f"{module}: {layer.get('layout')} {layer.get('tensors')}, want {want}")
        if set(layers) != {n.rsplit(".", 1)[0] for n in exp.tensors}:
            problems.append(f"modules differ: {sorted(set(layers) ^ {n.rsplit('.', 1)[0] for n in exp.tensors})}")
    rep.check("inspect: every quantized module listed as gguf:<TYPE> with its shape", problems)

    run_writer(rep, seed, work, m, v3, v2)
    run_orig_shape(rep, rng, work, m)


# ------------------------------------------------------------------------------------------------
# ComfyUI-GGUF's comfy.gguf.orig_shape entries (spec/gguf.md §3, §4)
# ------------------------------------------------------------------------------------------------

ORIG = "comfy.gguf.orig_shape."


def orig_field_problems(r: GGUFReader, name: str, want: list[int]) -> list[str]:
    """ComfyUI-GGUF's loader.get_orig_shape: the field must be ARRAY of INT32, holding the shape."""
    f = r.get_field(ORIG + name)
    if f is None:
        return [f"{name}: no {ORIG}{name} field"]
    if list(f.types) != [VT.ARRAY, VT.INT32]:
        return [f"{name}: field types {list(f.types)}, ComfyUI-GGUF needs [ARRAY, INT32]"]
    got = [int(f.parts[i][0]) for i in f.data]
    return [] if got == want else [f"{name}: orig shape {got}, want {want}"]


def run_orig_shape(rep: Report, rng: np.random.Generator, work: Path, m: Migrate) -> None:
    # ---- a file as ComfyUI-GGUF's converter writes SD convolutions (convert.py shape_fix): the
    # row-major data reshaped to (n/256, 256), then quantized or raw K-quant rows of 256, with an
    # ARRAY of INT32 entry holding the torch shape; one 2-D tensor without an entry
    c_in = int(rng.choice([2, 4, 8, 16]))
    convs = []
    for qt in (Q.F32, Q.F16, Q.Q8_0, Q.Q4_1, Q.Q5_0, Q.Q4_K, Q.Q6_K):
        c_out = (256 // c_in) * int(rng.integers(1, 3))
        shape = [c_out, c_in, 3, 3]
        n = math.prod(shape)
        if qt in K_FIELDS:
            stored = k_quant_raw(rng, qt, n // 256, 256)
        else:
            x = (rng.standard_normal(n) * 0.05).astype(np.float32).reshape(n // 256, 256)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                stored = x.astype(np.float16) if qt == Q.F16 else x if qt == Q.F32 else quantize(x, qt)
        convs.append((f"input_blocks.{len(convs)}.0.{qt.name.lower()}.weight", qt, shape, stored))
    src = work / "sd-orig.gguf"
    w = GGUFWriter(src, "sd1")
    for name, _, shape, _ in convs:
        w.add_array(ORIG + name, shape)
    for name, qt, _, stored in convs:
        if qt in (Q.F32, Q.F16):
            w.add_tensor(name, stored)
        else:
            w.add_tensor(name, stored, raw_dtype=qt)
    w.add_tensor("out.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    plain = work / "sd-orig-plain.safetensors"
    problems = [e for e in [m.convert(src, plain, "plain")] if e]
    if not problems:
        got, _ = read_st(plain)
        for name, qt, shape, stored in convs:
            # plain keeps F32 and F16 tensors as they are
            want = stored if qt in (Q.F32, Q.F16) else dequantize(stored, qt)
            want_dt = "F16" if qt == Q.F16 else "F32"
            dt, sh, data = got[name]
            if (dt, sh) != (want_dt, shape):
                problems.append(f"{name}: {dt} {sh}, want {want_dt} {shape}")
            elif data != np.ascontiguousarray(want.reshape(shape)).tobytes():
                problems.append(f"{name}: values differ from gguf-py's, reshaped to {shape}")
        if got["out.weight"][1] != [2, 32]:
            problems.append(f"out.weight: shape {got['out.weight'][1]}, want [2, 32]")
    rep.check("orig shape: ComfyUI-GGUF's reshaped SD convolutions read (--to plain) in their torch "
              "shape, values as gguf-py's (F32, F16, Q8_0, Q4_1, Q5_0, Q4_K, Q6_K)", problems)

    # ---- GGUF -> GGUF (directly and through a kept safetensors file): the same stored blocks and
    # entries, as ComfyUI-GGUF's loader reads them; F32/F16 tensors are written in their torch shape
    # (ggml holds it: no entry needed), with the same bytes
    problems = []
    _, orig_tensors, _ = read_gguf(src)
    plain_convs = {c[0]: c[2] for c in convs if c[1] in (Q.F32, Q.F16)}
    orig_tensors = {k: (qt, plain_convs.get(k, sh), b) for k, (qt, sh, b) in orig_tensors.items()}
    kept = work / "sd-orig-keep.safetensors"
    outs = [work / "sd-orig-again.gguf", work / "sd-orig-via-st.gguf"]
    for err in (m.convert(src, outs[0], "keep"), m.convert(src, kept, "keep"),
                None if not kept.exists() else m.convert(kept, outs[1], "keep")):
        if err:
            problems.append(err)
    for out in outs:
        if problems or not out.exists():
            break
        r, tensors, _ = read_gguf(out)
        if tensors != orig_tensors:
            problems.append(f"{out.name}: tensors differ from the input's (type, ne, bytes)")
        for name, _, shape, _ in convs:
            if name not in plain_convs:
                problems += [f"{out.name}: {p}" for p in orig_field_problems(r, name, shape)]
        blocks = {c[0] for c in convs if c[0] not in plain_convs}
        extra = [k for k in r.fields if k.startswith(ORIG) and k[len(ORIG):] not in blocks]
        if extra:
            problems.append(f"{out.name}: unexpected entries {extra}")
    rep.check("orig shape: GGUF -> GGUF and GGUF -> safetensors -> GGUF keep every stored block tensor "
              "and write its entry as ComfyUI-GGUF's loader reads it (ARRAY of INT32); F32/F16 in their "
              "torch shape", problems)

    # ---- ckptkit writes tensors of more than 4 dimensions (Wan's Conv3d patch embedding) as 2-D rows
    # with the entry; ComfyUI-GGUF's loader views the data in that shape
    problems = []
    dims = [int(rng.integers(1, 6)) for _ in range(5)]
    x = rng.standard_normal(math.prod(dims)).astype(np.float32)
    st5 = work / "five.safetensors"
    write_st(st5, [("patch_embedding.weight", "F32", dims, x.tobytes()),
                   ("blocks.0.weight", "F32", [2, 3], x[:6].tobytes())], rng)
    out5 = work / "five.gguf"
    p = m.run("convert", str(st5), str(out5), "--to", "keep", "--gguf-arch", "wan")
    if p.returncode != 0:
        problems.append(f"convert five: exit {p.returncode}: {p.stderr.strip()[:400]}")
    else:
        r = GGUFReader(out5)
        t = {rt.name: rt for rt in r.tensors}["patch_embedding.weight"]
        if len(t.shape) > 4:
            problems.append(f"patch_embedding.weight: {len(t.shape)} dims in the file, ggml holds 4")
        problems += orig_field_problems(r, "patch_embedding.weight", dims)
        if np.ascontiguousarray(t.data).reshape(dims).tobytes() != x.tobytes():
            problems.append("patch_embedding.weight: the data viewed in its orig shape differs")
        if r.get_field(ORIG + "blocks.0.weight") is not None:
            problems.append("blocks.0.weight: an entry for a 2-D tensor")
        back = work / "five-back.safetensors"
        err = m.convert(out5, back, "keep")
        if err:
            problems.append(err)
        elif read_st(back)[0]["patch_embedding.weight"][1:] != (dims, x.tobytes()):
            problems.append(f"five.gguf -> safetensors: not the {dims} tensor it came from")
    rep.check(f"orig shape: a 5-D tensor {dims} is written as 2-D rows with its entry, read back 5-D "
              "(GGUFReader and ckptkit)", problems)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Golden GGUF fixtures made by the reference gguf-py (PyPI gguf==0.19.0), for ckptkit's GGUF reader.

    venv="$(tests/interop/gguf/setup_venv.sh | tail -n1)"
    "$venv/bin/python" tests/interop/gguf/gen_gguf_fixtures.py [--out DIR] [--seed N]

Defaults: --out tests/fixtures/gguf, --seed 20261202.  Deterministic: two runs give identical
trees (`diff -r`).  Every .gguf is written by gguf.GGUFWriter (types-v2.gguf is types-v3.gguf with
the version field patched), read back by gguf.GGUFReader AND by the independent byte-level parser
below; any disagreement aborts.  The README.md in the output directory is generated too (file list,
sizes, the verified layout facts and the gguf-py behaviours probed at the end of this script).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import math
import shutil
import struct
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "gguf"
DEFAULT_SEED = 20261202
PINNED = ("gguf", "numpy", "safetensors")


def check_versions() -> dict[str, str]:
    """The fixtures are only golden for the pinned versions: refuse to run with others."""
    pins = {}
    for line in (HERE / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            pins[name.strip().lower()] = ver.strip()
    got = {}
    for name in PINNED:
        try:
            got[name] = md.version(name)
        except md.PackageNotFoundError:
            sys.exit(f"error: {name} is not installed; run tests/interop/gguf/setup_venv.sh and use that venv")
        if got[name] != pins.get(name):
            sys.exit(f"error: {name} {got[name]} is installed but requirements.txt pins {pins.get(name)}; "
                     f"run tests/interop/gguf/setup_venv.sh and use that venv")
    return got


VERSIONS = check_versions()

import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402
from gguf import GGUFReader, GGUFWriter  # noqa: E402
from gguf.constants import (GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGUF_DEFAULT_ALIGNMENT,  # noqa: E402
                            GGUF_MAGIC, GGUF_VERSION, GGMLQuantizationType as Q, GGUFValueType as VT)
from gguf.quants import dequantize, quantize  # noqa: E402

ARCH = "ckptkit-test"


class Mismatch(Exception):
    pass


def require(cond: bool, what: str) -> None:
    if not cond:
        raise Mismatch(what)


def align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def sub_rng(seed: int, label: str) -> np.random.Generator:
    """One independent stream per tensor/row, so adding a fixture never shifts the others."""
    return np.random.default_rng([seed, zlib.crc32(label.encode())])


# ------------------------------------------------------------------------------------------------
# Independent GGUF parser (little-endian only; written from the spec, not from gguf-py)
# ------------------------------------------------------------------------------------------------

SCALAR_FMT = {
    VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
    VT.FLOAT32: "<f", VT.BOOL: "<B", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d",
}


class GArray:
    """A GGUF array value: element type + items (items may be GArrays for nested arrays)."""

    def __init__(self, item_type: VT, items: list):
        self.item_type = item_type
        self.items = items


class Cursor:
    def __init__(self, buf: bytes, pos: int = 0):
        self.buf = buf
        self.pos = pos

    def take(self, n: int) -> bytes:
        require(0 <= n and self.pos + n <= len(self.buf), f"read of {n} bytes at {self.pos} past end {len(self.buf)}")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def u32(self) -> int:
        return self.unpack("<I")

    def u64(self) -> int:
        return self.unpack("<Q")

    def string(self) -> str:
        n = self.u64()
        return self.take(n).decode("utf-8")


def parse_value(cur: Cursor, vtype: VT):
    if vtype == VT.STRING:
        return cur.string()
    if vtype == VT.ARRAY:
        itype = VT(cur.u32())
        n = cur.u64()
        return GArray(itype, [parse_value(cur, itype) for _ in range(n)])
    v = cur.unpack(SCALAR_FMT[vtype])
    if vtype == VT.BOOL:
        require(v in (0, 1), f"bool byte {v}")
        return bool(v)
    return v


def parse_gguf(buf: bytes) -> dict:
    cur = Cursor(buf)
    require(cur.take(4) == b"GGUF", "magic")
    version = cur.u32()
    require(version in (2, 3), f"version {version}")
    n_tensors, n_kv = cur.u64(), cur.u64()
    require(cur.pos == 24, "header size")
    kvs = []
    for _ in range(n_kv):
        off = cur.pos
        key = cur.string()
        vtype = VT(cur.u32())
        value = parse_value(cur, vtype)
        kvs.append({"key": key, "vtype": vtype, "value": value, "offset": off, "end": cur.pos})
    keys = [kv["key"] for kv in kvs]
    require(len(set(keys)) == len(keys), "duplicate keys")
    alignment, source = GGUF_DEFAULT_ALIGNMENT, "default"
    for kv in kvs:
        if kv["key"] == "general.alignment":
            require(kv["vtype"] == VT.UINT32, "general.alignment must be u32")
            alignment, source = kv["value"], "general.alignment"
    require(alignment > 0 and alignment & (alignment - 1) == 0, "alignment power of two")
    kv_end = cur.pos
    infos = []
    for _ in range(n_tensors):
        off = cur.pos
        name = cur.string()
        n_dims = cur.u32()
        ne = [cur.u64() for _ in range(n_dims)]
        ttype = Q(cur.u32())
        toff = cur.u64()
        infos.append({"name": name, "ne": ne, "type": ttype, "offset": toff, "info_offset": off, "info_end": cur.pos})
    require(len({t["name"] for t in infos}) == len(infos), "duplicate tensor names")
    ti_end = cur.pos
    data_start = align_up(ti_end, alignment)
    require(buf[ti_end:data_start] == bytes(data_start - ti_end), "non-zero header padding")
    running = 0
    for t in infos:
        block, tsize = GGML_QUANT_SIZES[t["type"]]
        require(t["ne"][0] % block == 0, f"{t['name']}: ne[0] not a multiple of the block size")
        n_el = math.prod(t["ne"])
        t["n_elements"] = n_el
        t["n_bytes"] = n_el // block * tsize
        t["block_size"], t["type_size"] = block, tsize
        # ggml's gguf.cpp requires exactly this (offset == running sum of padded sizes);
        # it implies offset % alignment == 0
        require(t["offset"] == running, f"{t['name']}: offset {t['offset']} != running padded sum {running}")
        t["offset_abs"] = data_start + t["offset"]
        end = t["offset_abs"] + t["n_bytes"]
        padded_end = data_start + align_up(t["offset"] + t["n_bytes"], alignment)
        require(padded_end <= len(buf), f"{t['name']}: data past end of file")
        require(buf[end:padded_end] == bytes(padded_end - end), f"{t['name']}: non-zero tensor padding")
        t["padded_bytes"] = padded_end - t["offset_abs"]
        running = align_up(t["offset"] + t["n_bytes"], alignment)
    require(len(buf) == data_start + running, f"file size {len(buf)} != data_start + padded data {data_start + running}")
    return {"version": version, "n_tensors": n_tensors, "n_kv": n_kv, "kvs": kvs, "kv_end": kv_end,
            "alignment": alignment, "alignment_source": source, "ti_start": kv_end, "ti_end": ti_end,
            "data_start": data_start, "tensors": infos, "size": len(buf)}


# ------------------------------------------------------------------------------------------------
# Cross-check against gguf.GGUFReader
# ------------------------------------------------------------------------------------------------

def type_chain(vtype: VT, value) -> list[VT]:
    """What GGUFReader puts in ReaderField.types: the type, then (arrays) the chain of the FIRST item."""
    if vtype != VT.ARRAY:
        return [vtype]
    chain = [VT.ARRAY]
    if value.item_type == VT.ARRAY:
        return chain + type_chain(VT.ARRAY, value.items[0]) if value.items else chain + [VT.ARRAY]
    return chain + [value.item_type]


def leaves(value) -> list:
    if isinstance(value, GArray):
        return [x for item in value.items for x in leaves(item)]
    return [value]


def leaf_types(vtype: VT, value) -> set:
    if vtype != VT.ARRAY:
        return {vtype}
    if value.item_type == VT.ARRAY:
        return set().union(*(leaf_types(VT.ARRAY, it) for it in value.items))
    return {value.item_type}


def same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return struct.pack("<d", float(a)) == struct.pack("<d", float(b))
    return type(a) is type(b) and a == b


def crosscheck(path: Path, p: dict) -> GGUFReader:
    """Abort unless GGUFReader sees exactly what parse_gguf saw."""
    r = GGUFReader(path)
    buf = path.read_bytes()
    fields = list(r.fields.items())
    require([n for n, _ in fields[:3]] == ["GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"], "pseudo fields")
    require(fields[0][1].contents() == p["version"], "version")
    require(fields[1][1].contents() == p["n_tensors"], "tensor_count")
    require(fields[2][1].contents() == p["n_kv"], "kv_count")
    kv_fields = fields[3:]
    require(len(kv_fields) == p["n_kv"], "kv count vs fields")
    for (name, f), kv in zip(kv_fields, p["kvs"]):
        require(name == kv["key"] and f.name == kv["key"], f"key {name} != {kv['key']}")
        require(f.offset == kv["offset"], f"{name}: offset {f.offset} != {kv['offset']}")
        require(sum(int(x.nbytes) for x in f.parts) == kv["end"] - kv["offset"], f"{name}: encoded size")
        require(f.types == type_chain(kv["vtype"], kv["value"]), f"{name}: types {f.types}")
        if len(leaf_types(kv["vtype"], kv["value"])) == 1:  # mixed nested arrays: GGUFReader can't decode
            got = f.contents()
            want = leaves(kv["value"]) if kv["vtype"] == VT.ARRAY else kv["value"]
            if kv["vtype"] == VT.ARRAY:
                require(len(got) == len(want) and all(same(a, b) for a, b in zip(got, want)), f"{name}: {got} != {want}")
            else:
                require(same(got, want), f"{name}: {got!r} != {want!r}")
    require(int(r.alignment) == p["alignment"], "alignment")
    require(r.data_offset == p["data_start"], f"data start {r.data_offset} != {p['data_start']}")
    require(len(r.tensors) == p["n_tensors"], "tensor count")
    for rt, t in zip(r.tensors, p["tensors"]):
        require(rt.name == t["name"], "tensor name")
        require(rt.tensor_type == t["type"], f"{t['name']}: type")
        require([int(x) for x in rt.shape] == t["ne"], f"{t['name']}: ne {rt.shape} != {t['ne']}")
        require(rt.n_elements == t["n_elements"] and rt.n_bytes == t["n_bytes"], f"{t['name']}: sizes")
        require(rt.data_offset == t["offset_abs"], f"{t['name']}: data offset")
        require(int(rt.field.parts[-1][0]) == t["offset"], f"{t['name']}: stored offset")
        require(rt.field.offset == t["info_offset"], f"{t['name']}: info offset")
        require(rt.data.tobytes() == buf[t["offset_abs"]:t["offset_abs"] + t["n_bytes"]], f"{t['name']}: bytes")
        require(tuple(rt.data.shape) == reader_data_shape(t), f"{t['name']}: data shape {rt.data.shape}")
    return r


def np_shape(t: dict) -> list[int]:
    return list(reversed(t["ne"]))


def reader_data_shape(t: dict) -> tuple:
    if t["type"] in (Q.F32, Q.F16, Q.F64, Q.I8, Q.I16, Q.I32, Q.I64):
        return tuple(np_shape(t))
    return (*np_shape(t)[:-1], t["ne"][0] // t["block_size"] * t["type_size"])


# ------------------------------------------------------------------------------------------------
# JSON descriptions
# ------------------------------------------------------------------------------------------------

def f32_bits(x: float) -> str:
    return "0x%08x" % struct.unpack("<I", struct.pack("<f", x))[0]


def f64_bits(x: float) -> str:
    return "0x%016x" % struct.unpack("<Q", struct.pack("<d", x))[0]


def value_json(vtype: VT, value) -> dict:
    d: dict = {"type": vtype.name, "type_id": int(vtype)}
    if vtype == VT.ARRAY:
        d["item_type"] = value.item_type.name
        d["item_type_id"] = int(value.item_type)
        d["len"] = len(value.items)
        if value.item_type == VT.ARRAY:
            d["value"] = [value_json(VT.ARRAY, it) for it in value.items]
        else:
            d["value"] = list(value.items)
            if value.item_type == VT.FLOAT32:
                d["bits"] = [f32_bits(x) for x in value.items]
            elif value.item_type == VT.FLOAT64:
                d["bits"] = [f64_bits(x) for x in value.items]
    else:
        d["value"] = value
        if vtype == VT.FLOAT32:
            d["bits"] = f32_bits(value)
        elif vtype == VT.FLOAT64:
            d["bits"] = f64_bits(value)
    return d


def describe(path: Path, p: dict, r: GGUFReader, raw_keys: set[str], extra: dict | None = None) -> dict:
    buf = path.read_bytes()
    kv_list = []
    for kv, (_, f) in zip(p["kvs"], list(r.fields.items())[3:]):
        e = {"key": kv["key"], "offset": kv["offset"], "n_bytes": kv["end"] - kv["offset"]}
        e.update(value_json(kv["vtype"], kv["value"]))
        if kv["vtype"] == VT.ARRAY and kv["value"].item_type == VT.ARRAY:
            # what gguf-py's reader makes of it (flattened; see README)
            e["gguf_py_reader"] = {"types": [t.name for t in f.types], "contents": f.contents()}
        kv_list.append(e)
    tensors = []
    for rt, t in zip(r.tensors, p["tensors"]):
        tensors.append({
            "name": rt.name,
            "ggml_type": rt.tensor_type.name,
            "ggml_type_id": int(rt.tensor_type),
            "block_size": t["block_size"],
            "type_size": t["type_size"],
            "n_dims": len(rt.shape),
            "ne": [int(x) for x in rt.shape],
            "shape": np_shape(t),
            "n_elements": int(rt.n_elements),
            "n_bytes": int(rt.n_bytes),
            "padded_bytes": t["padded_bytes"],
            "offset": int(rt.field.parts[-1][0]),
            "offset_abs": int(rt.data_offset),
            "info_offset": int(rt.field.offset),
            "sha256": sha256(buf[rt.data_offset:rt.data_offset + rt.n_bytes]),
            "expected_key": rt.name,
            "raw_key": rt.name + ".raw" if rt.name + ".raw" in raw_keys else None,
        })
    d = {
        "file": path.name,
        "file_size": len(buf),
        "sha256": sha256(buf),
        "written_by": f"gguf-py {VERSIONS['gguf']} GGUFWriter (numpy {VERSIONS['numpy']})",
        "magic": "GGUF",
        "magic_u32_le": "0x%08x" % GGUF_MAGIC,
        "version": p["version"],
        "tensor_count": p["n_tensors"],
        "kv_count": p["n_kv"],
        "alignment": int(r.alignment),
        "alignment_source": p["alignment_source"],
        "kv_start": 24,
        "kv_end": p["kv_end"],
        "tensor_info_start": p["ti_start"],
        "tensor_info_end": p["ti_end"],
        "header_padding": p["data_start"] - p["ti_end"],
        "data_start": int(r.data_offset),
        "data_size": len(buf) - int(r.data_offset),
        "kv": kv_list,
        "tensors": tensors,
    }
    if extra:
        d.update(extra)
    return d


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")


def save_st(path: Path, tensors: dict, meta: dict) -> None:
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    data = safetensors.numpy.save(arrays, metadata=meta)
    # safetensors 0.8.0 serializes __metadata__ from a Rust HashMap: with more than one entry the
    # key order (and so the file) changes from run to run.  st_meta() therefore has ONE entry;
    # a second serialization must give the same bytes.
    require(safetensors.numpy.save(arrays, metadata=meta) == data, f"{path.name}: safetensors not deterministic")
    path.write_bytes(data)


def st_meta(seed: int, what: str) -> dict:
    return {"contents": f"{what} | generator tests/interop/gguf/gen_gguf_fixtures.py, seed {seed}, "
                        f"gguf {VERSIONS['gguf']}, numpy {VERSIONS['numpy']}"}


def write_gguf(path: Path, build) -> None:
    w = GGUFWriter(path, ARCH)
    build(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ------------------------------------------------------------------------------------------------
# Tensor contents
# ------------------------------------------------------------------------------------------------

def from_bits(bits: list[int]) -> np.ndarray:
    return np.array(bits, dtype=np.uint32).view(np.float32)


# Special values placed at the start of the last row of the float tensors; stored bits are recorded.
F32_SPECIALS = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F7FFFFF, 0x00000001, 0x800116C2]
F16_SPECIALS = [0.0, -0.0, math.inf, -math.inf, math.nan,
                65504.0,        # max finite f16
                65519.0,        # rounds down to 65504
                65520.0,        # exact tie between 65504 and 65536 -> even -> inf
                2.0 ** -24,     # smallest f16 subnormal
                2.0 ** -25,     # tie between 0 and 2^-24 -> even -> 0
                3 * 2.0 ** -25,  # tie between 2^-24 and 2^-23 -> even -> 2^-23
                2049.0,         # tie -> 2048
                2051.0]         # tie -> 2052
BF16_SPECIALS = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000,
                 0x7FC00000,  # quiet NaN
                 0x7F800001,  # signalling NaN: gguf-py forces quiet -> 0x7fc0
                 0xFFC00001,  # negative NaN with payload -> 0xffc0
                 0x3F808000,  # tie, even below -> 0x3f80
                 0x3F818000,  # tie, odd below -> 0x3f82
                 0x3F808001,  # just above tie -> 0x3f81
                 0x7F7FFFFF,  # FLT_MAX rounds to +inf in bf16
                 0x00000001]  # f32 subnormal -> 0


def float_source(seed: int, name: str, shape: tuple, specials: np.ndarray | None) -> np.ndarray:
    x = sub_rng(seed, name).standard_normal(shape).astype(np.float32)
    if specials is not None:
        flat = x.reshape(-1, shape[-1])
        flat[-1, :len(specials)] = specials
    return x


# (name, type, numpy shape, scale) for the tensors quantized by gguf.quants.quantize
LEGACY_QUANTS = [
    ("q4_0", Q.Q4_0, (4, 64), 1.0),
    ("q4_1", Q.Q4_1, (3, 96), 0.5),
    ("q5_0", Q.Q5_0, (2, 128), 2.0),
    ("q5_1", Q.Q5_1, (5, 32), 0.1),
    ("q8_0", Q.Q8_0, (4, 64), 1.0),
    ("q8_0_3d", Q.Q8_0, (2, 3, 64), 0.25),
]

# K-quants: byte offsets of the f16 super-block scale d and (where present) dmin inside one block,
# read off gguf/quants.py's dequantize_blocks (and ggml-common.h's block_qN_K structs).
K_QUANTS = [
    ("q2_k", Q.Q2_K, {"d": 80, "dmin": 82}),   # scales[16] qs[64] d dmin
    ("q3_k", Q.Q3_K, {"d": 108}),              # hmask[32] qs[64] scales[12] d
    ("q4_k", Q.Q4_K, {"d": 0, "dmin": 2}),     # d dmin scales[12] qs[128]
    ("q5_k", Q.Q5_K, {"d": 0, "dmin": 2}),     # d dmin scales[12] qh[32] qs[128]
    ("q6_k", Q.Q6_K, {"d": 208}),              # ql[128] qh[64] scales[16] d
]
K_ROWS, K_COLS = 2, 512


def k_quant_raw(seed: int, name: str, qt: Q, fields: dict) -> np.ndarray:
    """Random block bytes with sane f16 d/dmin: 2^u, u ~ U[-10, -4], positive, rounded to f16."""
    block, tsize = GGML_QUANT_SIZES[qt]
    nb = K_COLS // block
    rng = sub_rng(seed, name)
    raw = rng.integers(0, 256, size=(K_ROWS, nb, tsize), dtype=np.uint8)
    for off in fields.values():
        d = np.exp2(rng.uniform(-10, -4, size=(K_ROWS, nb))).astype(np.float16)
        raw[:, :, off:off + 2] = d.view(np.uint8).reshape(K_ROWS, nb, 2)
    # Check the field positions empirically: with every d/dmin zeroed, a block must dequantize to 0.
    zeroed = raw.copy()
    for off in fields.values():
        zeroed[:, :, off:off + 2] = 0
    require(np.all(dequantize(zeroed.reshape(K_ROWS, nb * tsize), qt) == 0), f"{name}: d/dmin offsets")
    raw = raw.reshape(K_ROWS, nb * tsize)
    deq = dequantize(raw, qt)
    require(bool(np.all(np.isfinite(deq))) and float(np.abs(deq).max()) < 1024.0, f"{name}: dequant not sane")
    return raw


def raw_rows(a: np.ndarray) -> np.ndarray:
    """Raw stored bytes as U8 [rows, row_bytes] (leading dims flattened)."""
    b = np.ascontiguousarray(a).view(np.uint8)
    return b.reshape(-1, b.shape[-1])


# ------------------------------------------------------------------------------------------------
# types-v3.gguf / types-v2.gguf
# ------------------------------------------------------------------------------------------------

def add_type_kvs(w: GGUFWriter) -> None:
    w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_uint8("ckptkit.test.u8", 200)
    w.add_int8("ckptkit.test.i8", -100)
    w.add_uint16("ckptkit.test.u16", 60000)
    w.add_int16("ckptkit.test.i16", -30000)
    w.add_uint32("ckptkit.test.u32", 4000000000)
    w.add_int32("ckptkit.test.i32", -2000000000)
    w.add_float32("ckptkit.test.f32", 3.14159)
    w.add_bool("ckptkit.test.bool_true", True)
    w.add_bool("ckptkit.test.bool_false", False)
    w.add_string("ckptkit.test.string", "hello, gguf")
    w.add_string("ckptkit.test.string_utf8", "h\u00e9llo \u2713 \u4e16\u754c")
    # add_string("") silently writes nothing; add_key_value does write an empty string
    w.add_key_value("ckptkit.test.string_empty", "", VT.STRING)
    w.add_uint64("ckptkit.test.u64", 2**63 + 12345)
    w.add_int64("ckptkit.test.i64", -(2**62) - 7)
    w.add_float64("ckptkit.test.f64", 2.718281828459045)
    w.add_float64("ckptkit.test.f64_tiny", -1e-300)
    w.add_array("ckptkit.test.array_i32", [1, -2, 3, 2147483647, -2147483648])  # ints default to INT32
    w.add_array("ckptkit.test.array_str", ["alpha", "", "\u00fcn\u00efc\u00f6d\u00e9", "tab\there"])
    w.add_array("ckptkit.test.array_bool", [True, False, True])
    w.add_array("ckptkit.test.array_f32", [0.5, -1.25, 1e-3])  # floats default to FLOAT32
    for key, sub, vals in [
        ("array_u8", VT.UINT8, [0, 1, 255]),
        ("array_i8", VT.INT8, [-128, 0, 127]),
        ("array_u16", VT.UINT16, [0, 65535]),
        ("array_i16", VT.INT16, [-32768, 32767]),
        ("array_u32", VT.UINT32, [0, 4294967295]),
        ("array_u64", VT.UINT64, [0, 2**64 - 1]),
        ("array_i64", VT.INT64, [-(2**63), 2**63 - 1]),
        ("array_f64", VT.FLOAT64, [1.0 / 3.0, -0.0, 1e308]),
    ]:
        w.add_key_value(f"ckptkit.test.{key}", vals, VT.ARRAY, sub_type=sub)


def type_tensors(seed: int) -> tuple[dict[str, tuple[np.ndarray, Q]], dict]:
    """The tensors of types-v3.gguf, in file order: name -> (stored array as written, type), plus the
    special-value description.  Built once and shared with model-v3.gguf (same bytes, other names)."""
    arrays: dict[str, tuple[np.ndarray, Q]] = {}  # name -> (stored array as written, type)
    specials: dict[str, list] = {}

    f32 = float_source(seed, "f32", (4, 64), from_bits(F32_SPECIALS))
    arrays["f32"] = (quantize(f32, Q.F32), Q.F32)
    arrays["f32_1d"] = (quantize(float_source(seed, "f32_1d", (64,), None), Q.F32), Q.F32)
    f16_src = float_source(seed, "f16", (4, 64), np.array(F16_SPECIALS, dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overflow in cast (65520 -> inf) is intended
        arrays["f16"] = (quantize(f16_src, Q.F16), Q.F16)
    bf16_src = float_source(seed, "bf16", (4, 64), from_bits(BF16_SPECIALS))
    arrays["bf16"] = (quantize(bf16_src, Q.BF16), Q.BF16)
    for name, src, stored in [("f32", f32, arrays["f32"][0]), ("f16", f16_src, arrays["f16"][0]),
                              ("bf16", bf16_src, arrays["bf16"][0])]:
        n = {"f32": len(F32_SPECIALS), "f16": len(F16_SPECIALS), "bf16": len(BF16_SPECIALS)}[name]
        last_in = src.reshape(-1, src.shape[-1])[-1, :n].view(np.uint32)
        width = 4 if name == "f32" else 2
        last_out = raw_rows(stored)[-1, :n * width].view(np.uint32 if width == 4 else np.uint16)
        specials[name] = {"row": src.shape[0] - 1, "columns": f"0..{n}",
                          "f32_input_bits": ["0x%08x" % v for v in last_in],
                          "stored_bits": [("0x%08x" if width == 4 else "0x%04x") % v for v in last_out]}
    for name, qt, shape, scale in LEGACY_QUANTS:
        src = float_source(seed, name, shape, None) * np.float32(scale)
        arrays[name] = (quantize(src, qt), qt)
    for name, qt, fields in K_QUANTS:
        arrays[name] = (k_quant_raw(seed, name, qt, fields), qt)
    return arrays, specials


def add_tensors(w: GGUFWriter, arrays: dict[str, tuple[np.ndarray, Q]]) -> None:
    for name, (a, qt) in arrays.items():
        if qt in (Q.F32, Q.F16):
            w.add_tensor(name, a)  # dtype float32/float16 -> F32/F16, shape taken from the array
        else:
            # uint8 block bytes: GGUFWriter converts the BYTE shape to the element shape itself
            # (quant_shape_from_byte_shape); raw_shape must not be the element shape here.
            w.add_tensor(name, a, raw_dtype=qt)


def expected_tensors(r: GGUFReader, arrays: dict[str, tuple[np.ndarray, Q]]) -> tuple[dict, set[str]]:
    """<name> = dequantize(stored) as F32 in numpy shape; <name>.raw = stored bytes (every type but F32).
    Checks the file's tensors against the in-memory arrays they were written from."""
    expected, raw_keys = {}, set()
    require([rt.name for rt in r.tensors] == list(arrays), "tensor order")
    for rt in r.tensors:
        a, qt = arrays[rt.name]
        require(rt.tensor_type == qt, f"{rt.name}: type")
        require(rt.data.tobytes() == np.ascontiguousarray(a).tobytes(), f"{rt.name}: file bytes != written array")
        deq = dequantize(rt.data, qt).astype(np.float32, copy=False)
        require(list(deq.shape) == list(reversed([int(x) for x in rt.shape])), f"{rt.name}: dequant shape")
        deq2 = dequantize(a, qt).astype(np.float32, copy=False)
        require(deq.tobytes() == deq2.tobytes(), f"{rt.name}: dequant(file) != dequant(memory)")
        expected[rt.name] = deq
        if qt != Q.F32:
            expected[rt.name + ".raw"] = raw_rows(rt.data)
            raw_keys.add(rt.name + ".raw")
    return expected, raw_keys


def build_types(out: Path, seed: int, arrays: dict[str, tuple[np.ndarray, Q]], specials: dict) -> dict:
    path = out / "types-v3.gguf"

    def build(w: GGUFWriter) -> None:
        add_type_kvs(w)
        add_tensors(w, arrays)

    write_gguf(path, build)
    buf = path.read_bytes()
    p = parse_gguf(buf)
    r = crosscheck(path, p)

    expected, raw_keys = expected_tensors(r, arrays)
    save_st(out / "types-v3.expected.safetensors", expected,
            st_meta(seed, "types-v3.gguf: <name> = gguf.quants.dequantize(stored, type) as F32 in numpy shape; "
                          "<name>.raw = stored bytes as U8 [rows, row_bytes] (every type but F32)"))

    # ---- v2: identical bytes except the version field
    v2 = bytearray(buf)
    v2[4:8] = struct.pack("<I", 2)
    v2_path = out / "types-v2.gguf"
    v2_path.write_bytes(bytes(v2))
    p2 = parse_gguf(bytes(v2))
    r2 = crosscheck(v2_path, p2)
    require(int(r2.fields["GGUF.version"].contents()) == 2, "v2 version")
    for (n1, f1), (n2, f2) in zip(list(r.fields.items())[1:], list(r2.fields.items())[1:]):
        require(n1 == n2 and f1.offset == f2.offset and f1.types == f2.types, f"v2 field {n1}")
        require(all(a.tobytes() == b.tobytes() for a, b in zip(f1.parts, f2.parts)), f"v2 field {n1} parts")
    for t1, t2 in zip(r.tensors, r2.tensors):
        require((t1.name, t1.tensor_type, t1.data_offset, t1.n_bytes) == (t2.name, t2.tensor_type, t2.data_offset,
                                                                           t2.n_bytes), "v2 tensor")
        require(t1.data.tobytes() == t2.data.tobytes() and t1.data.shape == t2.data.shape, "v2 tensor data")
        require(dequantize(t2.data, t2.tensor_type).tobytes() == expected[t1.name].tobytes(), "v2 dequant")
    diff = [i for i in range(len(buf)) if buf[i] != v2[i]]
    require(diff == [4], f"v2 differs at {diff}")

    desc = describe(path, p, r, raw_keys, {
        "special_values": specials,
        "k_quant_raw": {name: {"method": "seeded random block bytes; f16 fields at these byte offsets in each "
                                         "block replaced by 2^U(-10,-4) rounded to f16",
                               "f16_field_offsets": fields} for name, _, fields in K_QUANTS},
        "v2_variant": {"file": "types-v2.gguf", "version": 2, "differs_only_at_byte_offsets": [4],
                       "sha256": sha256(bytes(v2)),
                       "note": "same KVs, tensor infos, offsets, data_start and tensor bytes as this file"},
    })
    write_json(out / "types-v3.json", desc)
    return {"desc": desc, "reader": r, "parsed": p, "expected": expected}


# ------------------------------------------------------------------------------------------------
# model-v3.gguf: the types-v3 tensors under model-like names
# ------------------------------------------------------------------------------------------------

# SentencePiece-style vocabulary; 4 entries = the 4 rows of token_embd.weight ([n_vocab, n_embd] = [4, 64])
MODEL_TOKENS = ["<unk>", "<s>", "</s>", "\u2581h\u00e9llo"]


def model_name(index: int, types_name: str, qt: Q) -> str:
    """types-v3 tensor -> model-v3 name: the two F32 ones become token_embd/output_norm, every other
    tensor becomes its own module blk.<index in types-v3>.<lower-case type name>.weight."""
    if types_name == "f32":
        return "token_embd.weight"
    if types_name == "f32_1d":
        return "output_norm.weight"
    return f"blk.{index}.{qt.name.lower()}.weight"


def add_model_kvs(w: GGUFWriter, n_blocks: int) -> None:
    # general.architecture comes first (GGUFWriter's constructor); no general.alignment (default 32)
    w.add_name("ckptkit tiny test model")
    w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_context_length(512)                 # ckptkit-test.context_length (u32)
    w.add_embedding_length(64)                # ckptkit-test.embedding_length (u32)
    w.add_block_count(n_blocks)               # ckptkit-test.block_count (u32)
    w.add_layer_norm_rms_eps(1e-5)            # ckptkit-test.attention.layer_norm_rms_epsilon (f32)
    w.add_tokenizer_model("llama")            # tokenizer.ggml.model (string)
    w.add_token_list(MODEL_TOKENS)            # tokenizer.ggml.tokens (ARRAY of STRING)


def build_model(out: Path, seed: int, arrays: dict[str, tuple[np.ndarray, Q]], v3: dict) -> dict:
    path = out / "model-v3.gguf"
    names = {tname: model_name(i, tname, qt) for i, (tname, (_, qt)) in enumerate(arrays.items())}
    require(len(set(names.values())) == len(names), "model-v3 names unique")
    # the very same array objects, renamed (same order as types-v3.gguf)
    marrays = {names[tname]: arrays[tname] for tname in arrays}
    n_blocks = max(int(n.split(".")[1]) for n in marrays if n.startswith("blk.")) + 1

    def build(w: GGUFWriter) -> None:
        add_model_kvs(w, n_blocks)
        add_tensors(w, marrays)

    write_gguf(path, build)
    buf = path.read_bytes()
    p = parse_gguf(buf)
    r = crosscheck(path, p)
    require(p["alignment_source"] == "default" and p["alignment"] == GGUF_DEFAULT_ALIGNMENT, "model-v3 alignment")
    require([kv["key"] for kv in p["kvs"]][:1] == ["general.architecture"] and p["kvs"][0]["value"] == ARCH,
            "model-v3 architecture")
    tok = next(kv for kv in p["kvs"] if kv["key"] == "tokenizer.ggml.tokens")
    require(tok["vtype"] == VT.ARRAY and tok["value"].item_type == VT.STRING and tok["value"].items == MODEL_TOKENS,
            "model-v3 tokens")

    expected, raw_keys = expected_tensors(r, marrays)
    # same data as types-v3.gguf, tensor by tensor, and so the same data section byte for byte
    pv3 = v3["parsed"]
    v3buf = (out / "types-v3.gguf").read_bytes()
    require(len(p["tensors"]) == len(pv3["tensors"]), "model-v3 tensor count")
    for t, tv3 in zip(p["tensors"], pv3["tensors"]):
        require(t["name"] == names[tv3["name"]], f"{t['name']}: order")
        require((t["type"], t["ne"], t["offset"], t["n_bytes"]) == (tv3["type"], tv3["ne"], tv3["offset"], tv3["n_bytes"]),
                f"{t['name']}: info differs from types-v3 {tv3['name']}")
        require(buf[t["offset_abs"]:t["offset_abs"] + t["n_bytes"]]
                == v3buf[tv3["offset_abs"]:tv3["offset_abs"] + tv3["n_bytes"]], f"{t['name']}: bytes differ from types-v3")
    require(buf[p["data_start"]:] == v3buf[pv3["data_start"]:], "model-v3 data section != types-v3 data section")
    for tname, mname in names.items():
        for suffix in ("", ".raw"):
            if tname + suffix in v3["expected"]:
                require(expected[mname + suffix].tobytes() == v3["expected"][tname + suffix].tobytes()
                        and expected[mname + suffix].dtype == v3["expected"][tname + suffix].dtype
                        and expected[mname + suffix].shape == v3["expected"][tname + suffix].shape,
                        f"{mname}{suffix}: expected differs from types-v3 {tname}{suffix}")
            else:
                require(mname + suffix not in expected, f"{mname}{suffix}: unexpected key")
    save_st(out / "model-v3.expected.safetensors", expected,
            st_meta(seed, "model-v3.gguf: <name> = gguf.quants.dequantize(stored, type) as F32 in numpy shape; "
                          "<name>.raw = stored bytes as U8 [rows, row_bytes] (every type but F32); "
                          "same values as types-v3.expected.safetensors under the model-v3 names"))
    desc = describe(path, p, r, raw_keys, {
        "same_data_as": {
            "file": "types-v3.gguf",
            "rule": "types-v3 tensor i of type T -> blk.<i>.<lower-case T>.weight; "
                    "f32 [4,64] -> token_embd.weight, f32_1d [64] -> output_norm.weight; same order, types, "
                    "shapes, offsets and bytes (the data sections of the two files are identical)",
            "tensor_names": {mname: tname for tname, mname in names.items()},
            "data_section_sha256": sha256(buf[p["data_start"]:]),
        },
    })
    write_json(out / "model-v3.json", desc)
    return {"desc": desc}


# ------------------------------------------------------------------------------------------------
# nested-array.gguf
# ------------------------------------------------------------------------------------------------

def build_nested(out: Path) -> dict:
    path = out / "nested-array.gguf"

    def build(w: GGUFWriter) -> None:
        w.add_array("ckptkit.test.nested_i32", [[1, 2, 3], [-4, 5]])
        w.add_array("ckptkit.test.nested_str", [["a", "bc"], ["", "d\u00e9f"]])
        w.add_array("ckptkit.test.nested_mixed", [[1, 2], ["x", "yz"]])
        w.add_array("ckptkit.test.nested_deep", [[[1], [2, 3]], [[4]]])
        w.add_uint32("ckptkit.test.after_nested", 0xDEADBEEF)
        w.add_tensor("t.f32", np.arange(4, dtype=np.float32))

    write_gguf(path, build)
    p = parse_gguf(path.read_bytes())
    r = crosscheck(path, p)
    mixed = r.fields["ckptkit.test.nested_mixed"]
    require(mixed.contents() == [1, 2, ord("x"), ord("y"), ord("z")], f"nested_mixed read as {mixed.contents()}")
    require(r.tensors[0].data.tolist() == [0.0, 1.0, 2.0, 3.0], "nested t.f32")
    desc = describe(path, p, r, set(), {"tensor_values": {"t.f32": [0.0, 1.0, 2.0, 3.0]}})
    write_json(out / "nested-array.json", desc)
    return {"desc": desc}


# ------------------------------------------------------------------------------------------------
# align64.gguf
# ------------------------------------------------------------------------------------------------

def build_align64(out: Path, seed: int) -> dict:
    path = out / "align64.gguf"
    a = float_source(seed, "align64.a", (3, 7), None).astype(np.float16)      # 42 bytes
    b = sub_rng(seed, "align64.b").integers(-128, 128, size=(5,), dtype=np.int8)  # 5 bytes (odd)
    c = quantize(float_source(seed, "align64.c", (1, 64), None), Q.Q8_0)         # 68 bytes (> 64)

    def builder(filler: int):
        def build(w: GGUFWriter) -> None:
            w.add_string("ckptkit.test.filler", "f" * filler)
            w.add_custom_alignment(64)  # the LAST KV: a reader must read every KV before locating data
            w.add_tensor("a.f16", a)
            w.add_tensor("b.i8", b)
            w.add_tensor("c.q8_0", c, raw_dtype=Q.Q8_0)
        return build

    # Pick the filler length so that the tensor infos end at 1..32 (mod 64): then padding to 32
    # (the default) and to 64 give different data starts, so a reader ignoring general.alignment fails.
    for filler in range(1, 65):
        write_gguf(path, builder(filler))
        p = parse_gguf(path.read_bytes())
        if 1 <= p["ti_end"] % 64 <= 32:
            break
    else:
        raise Mismatch("no filler length works")
    require(align_up(p["ti_end"], 32) != p["data_start"], "data start would be the same with alignment 32")
    r = crosscheck(path, p)
    require(int(r.alignment) == 64 and p["data_start"] % 64 == 0, "alignment 64")
    require([t["offset"] for t in p["tensors"]] == [0, 64, 128], f"offsets {[t['offset'] for t in p['tensors']]}")
    expected = {
        "a.f16": dequantize(r.tensors[0].data, Q.F16),
        "a.f16.raw": raw_rows(r.tensors[0].data),
        "b.i8": np.array(r.tensors[1].data),  # I8 has no dequantization: the stored values, dtype I8
        "c.q8_0": dequantize(r.tensors[2].data, Q.Q8_0),
        "c.q8_0.raw": raw_rows(r.tensors[2].data),
    }
    require(r.tensors[1].data.tobytes() == b.tobytes() and r.tensors[2].data.tobytes() == c.tobytes(), "align64 bytes")
    save_st(out / "align64.expected.safetensors", expected,
            st_meta(seed, "align64.gguf: F16/Q8_0 dequantized to F32; I8 as stored (I8); <name>.raw = stored bytes"))
    desc = describe(path, p, r, {"a.f16.raw", "c.q8_0.raw"}, {
        "data_start_if_alignment_ignored": align_up(p["ti_end"], 32),
        "offsets_if_alignment_were_32": [0, 64, 96],
    })
    write_json(out / "align64.json", desc)
    return {"desc": desc}


# ------------------------------------------------------------------------------------------------
# quant-roundtrip/
# ------------------------------------------------------------------------------------------------

RT_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
RT_ROWS = [
    "all zeros",
    "tiny: N(0,1) * 1e-30 (f16 scales underflow to 0)",
    "huge: N(0,1) * 1e30 (f16 scales overflow to inf)",
    "Q8_0 ties: half-integers in [-127, 127], every 32-block holds +-127 (d = 1, x*id = k + 0.5 exactly)",
    "Q4_0/Q5_0 sign ties: integers in [-7, 7] plus both +8 and -8 in every 32-block, alternating which comes first",
    "constant 32-blocks (max == min: d = 0 for Q4_1/Q5_1), values -3.5, 0, 0.375, 1e-3, ...",
    "N(0,1)",
    "N(0,0.02) with x50 outliers every 37th element",
]


def roundtrip_input(seed: int) -> np.ndarray:
    x = np.zeros((8, 256), dtype=np.float32)
    x[1] = sub_rng(seed, "rt.1").standard_normal(256) * np.float32(1e-30)
    x[2] = sub_rng(seed, "rt.2").standard_normal(256) * np.float32(1e30)
    r3 = sub_rng(seed, "rt.3")
    row = r3.integers(-254, 255, size=256).astype(np.float32) / 2
    for blk in range(8):
        row[blk * 32 + int(r3.integers(0, 32))] = 127.0 if blk % 2 == 0 else -127.0
    x[3] = row
    r4 = sub_rng(seed, "rt.4")
    row = r4.integers(-7, 8, size=256).astype(np.float32)
    for blk in range(8):
        i, j = sorted(r4.choice(32, size=2, replace=False).tolist())
        first = 8.0 if blk % 2 == 0 else -8.0
        row[blk * 32 + i], row[blk * 32 + j] = first, -first
    x[4] = row
    x[5] = np.repeat(np.array([-3.5, 0.0, 0.375, 1e-3, 100.0, -1e-5, 7.0, -0.25], dtype=np.float32), 32)
    x[6] = sub_rng(seed, "rt.6").standard_normal(256)
    row = sub_rng(seed, "rt.7").standard_normal(256).astype(np.float32) * np.float32(0.02)
    row[::37] *= 50
    x[7] = row
    return x.astype(np.float32)


def build_roundtrip(out: Path, seed: int) -> dict:
    d = out / "quant-roundtrip"
    d.mkdir()
    x = roundtrip_input(seed)
    save_st(d / "input.safetensors", {"input": x}, st_meta(seed, "float32 [8, 256] quantizer input; rows in rows.json"))
    info = {"seed": seed, "input": "input.safetensors key 'input', float32 [8, 256]",
            "rows": [{"row": i, "content": c} for i, c in enumerate(RT_ROWS)], "types": {}}
    for qt in RT_TYPES:
        with warnings.catch_warnings(record=True) as caught_q:
            warnings.simplefilter("always")
            q = quantize(x, qt)
        with warnings.catch_warnings(record=True) as caught_dq:
            warnings.simplefilter("always")
            deq = dequantize(q, qt)
        msgs_q = sorted({f"{w.category.__name__}: {w.message}" for w in caught_q})
        msgs_dq = sorted({f"{w.category.__name__}: {w.message}" for w in caught_dq})
        # row-at-a-time must give the same bytes as the whole tensor (quantize groups rows by 16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_row = np.concatenate([quantize(x[i:i + 1], qt) for i in range(8)])
            again = quantize(x, qt)
        require(per_row.tobytes() == q.tobytes() and again.tobytes() == q.tobytes(), f"{qt.name}: not row-local")
        block, tsize = GGML_QUANT_SIZES[qt]
        require(q.dtype == np.uint8 and q.shape == (8, 256 // block * tsize), f"{qt.name}: shape {q.shape}")
        (d / f"{qt.name}.bin").write_bytes(q.tobytes())
        save_st(d / f"{qt.name}.dequant.safetensors", {"dequant": deq.astype(np.float32)},
                st_meta(seed, f"gguf.quants.dequantize({qt.name}.bin) as float32 [8, 256]"))
        blocks = q.reshape(8, 256 // block, tsize)
        scales = blocks[:, :, 0:2].copy().view(np.float16).reshape(8, -1)  # d is the first field in all five
        per_row_info = []
        for i in range(8):
            r = deq[i]
            per_row_info.append({
                "row": i,
                "d_f16_bits": ["0x%04x" % v for v in scales[i].view(np.uint16)],
                "dequant_inf": int(np.isinf(r).sum()), "dequant_nan": int(np.isnan(r).sum()),
                "max_abs_err": None if not np.all(np.isfinite(r)) else float(np.abs(r - x[i]).max()),
            })
        info["types"][qt.name] = {
            "block_size": block, "type_size": tsize, "row_bytes": 256 // block * tsize,
            "bin": f"{qt.name}.bin", "bin_bytes": int(q.nbytes), "bin_sha256": sha256(q.tobytes()),
            "dequant": f"{qt.name}.dequant.safetensors (key 'dequant')",
            "numpy_warnings_quantize": msgs_q, "numpy_warnings_dequantize": msgs_dq, "rows": per_row_info,
        }
    # facts the README states, checked here
    q40 = quantize(x[4:5], Q.Q4_0).reshape(8, 18)
    dq40 = dequantize(quantize(x[4:5], Q.Q4_0), Q.Q4_0).reshape(8, 32)
    xr = x[4].reshape(8, 32)
    for blk in range(8):
        first = xr[blk][np.abs(xr[blk]) == 8][0]
        require(float(q40[blk, :2].copy().view(np.float16)[0]) == -first / 8, "Q4_0 d = max/-8 with max's sign")
        require(np.all(dq40[blk][xr[blk] == -first] == -first * 7 / 8), "Q4_0 clips -max to q=15")
    dq80 = dequantize(quantize(x[3:4], Q.Q8_0), Q.Q8_0)[0]
    require(np.array_equal(dq80, np.sign(x[3]) * np.floor(np.abs(x[3]) + 0.5)), "Q8_0 rounds half away from zero")
    write_json(d / "rows.json", info)
    return info


# ------------------------------------------------------------------------------------------------
# Probes of gguf-py behaviour (nothing written to --out; results go into README.md)
# ------------------------------------------------------------------------------------------------

def try_read(path: Path) -> str:
    try:
        r = GGUFReader(path)
        _ = [t.data for t in r.tensors]
        return "accepted"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def probes(tmp: Path, types_v3: Path, align64: Path, v3desc: dict, a64desc: dict) -> dict:
    res = {}
    v3 = types_v3.read_bytes()

    def variant(name: str, data: bytes) -> str:
        p = tmp / name
        p.write_bytes(data)
        return try_read(p)

    for v in (0, 1, 4):
        b = bytearray(v3)
        b[4:8] = struct.pack("<I", v)
        res[f"version {v}"] = variant(f"v{v}.gguf", bytes(b))
    res["truncated inside the data section (last 100 bytes cut)"] = variant("trunc.gguf", v3[:-100])
    res["truncated inside the KV section (first 200 bytes only)"] = variant("trunc2.gguf", v3[:200])
    res["64 junk bytes appended after the data"] = variant("junk.gguf", v3 + b"\xAA" * 64)
    i8key = b"ckptkit.test.i8"
    require(v3.count(i8key) == 1, "i8 key unique")
    res["duplicate KV key (i8 renamed to u8)"] = variant("dupkey.gguf", v3.replace(i8key, b"ckptkit.test.u8"))
    bt = next(k for k in v3desc["kv"] if k["key"] == "ckptkit.test.bool_true")
    b = bytearray(v3)
    b[bt["offset"] + bt["n_bytes"] - 1] = 2
    p = tmp / "bool2.gguf"
    p.write_bytes(bytes(b))
    rb = GGUFReader(p).fields["ckptkit.test.bool_true"].contents()
    res["bool KV stored as byte 2"] = f"accepted, contents() = {rb!r}"
    # unaligned / non-contiguous tensor offset: shift the 2nd tensor of align64.gguf by +1
    a64 = bytearray(align64.read_bytes())
    t1 = a64desc["tensors"][1]
    name_len = 8 + len(t1["name"].encode())
    off_pos = t1["info_offset"] + name_len + 4 + 8 * t1["n_dims"] + 4
    require(struct.unpack_from("<Q", a64, off_pos)[0] == t1["offset"], "offset field position")
    struct.pack_into("<Q", a64, off_pos, t1["offset"] + 1)
    res["tensor offset not a multiple of the alignment (align64 b.i8: 64 -> 65)"] = variant("unaligned.gguf", bytes(a64))

    def writer_probe(label: str, build) -> None:
        p = tmp / "w.gguf"
        try:
            write_gguf(p, build)
        except Exception as e:  # noqa: BLE001
            res[label] = f"writer raises {type(e).__name__}: {e}"
            return
        verdict = try_read(p)
        if verdict == "accepted":
            keys = [k for k in GGUFReader(p).fields if not k.startswith("GGUF.")]
            res[label] = f"written; GGUFReader accepts it; KV keys = {keys}"
        else:
            res[label] = f"written; GGUFReader: {verdict}"

    for qt in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        try:
            quantize(np.zeros((1, 256), np.float32), qt)
            res[f"gguf.quants.quantize(x, {qt.name})"] = "returns bytes"
        except Exception as e:  # noqa: BLE001
            res[f"gguf.quants.quantize(x, {qt.name})"] = f"{type(e).__name__}: {e}"
    writer_probe("GGUFWriter.add_string(k, '')", lambda w: w.add_string("k.empty", ""))
    writer_probe("GGUFWriter.add_array(k, [])", lambda w: w.add_array("k.empty", []))
    writer_probe("GGUFWriter.add_key_value(k, [], ARRAY)", lambda w: w.add_key_value("k.empty", [], VT.ARRAY))
    writer_probe("general.alignment written as u64",
                 lambda w: (w.add_uint64("general.alignment", 64), w.add_tensor("t", np.zeros(3, np.float32))))
    writer_probe("general.alignment = 48 (u32, not a power of two)",
                 lambda w: (w.add_uint32("general.alignment", 48), w.add_tensor("t", np.zeros(3, np.float32))))
    writer_probe("add_tensor(uint8 Q2_K bytes [2, 168], raw_shape=[2, 512] (element shape))",
                 lambda w: w.add_tensor("t", np.zeros((2, 168), np.uint8), raw_shape=[2, 512], raw_dtype=Q.Q2_K))
    writer_probe("add_tensor(uint8 Q2_K bytes [2, 168], raw_shape=[2, 168] (byte shape))",
                 lambda w: w.add_tensor("t", np.zeros((2, 168), np.uint8), raw_shape=[2, 168], raw_dtype=Q.Q2_K))
    return res


# ------------------------------------------------------------------------------------------------
# README
# ------------------------------------------------------------------------------------------------

README = """\
# GGUF golden fixtures (made by the reference gguf-py)

Generated by `tests/interop/gguf/gen_gguf_fixtures.py`; do not edit by hand (README.md included).

```sh
venv="$(tests/interop/gguf/setup_venv.sh | tail -n1)"        # target/gguf-venv, pinned requirements.txt
"$venv/bin/python" tests/interop/gguf/gen_gguf_fixtures.py --out tests/fixtures/gguf --seed {seed}
```

Versions: gguf-py (PyPI `gguf`) {gguf}, numpy {numpy}, safetensors {safetensors} (expected-value files are
written with `safetensors.numpy.save`); Python {python}.  Seed {seed}; every tensor/row has its own
stream `numpy.random.default_rng([seed, crc32(label)])`.  Deterministic: two runs give identical trees (`diff -r`).
safetensors files carry ONE `__metadata__` entry (`contents`): safetensors 0.8.0 writes the metadata map in
Rust HashMap order, so with several entries the bytes change from run to run (found the hard way; the
generator now serializes every file twice and compares).
Every `.gguf` is written by `gguf.GGUFWriter` (`types-v2.gguf` is `types-v3.gguf` with one byte patched),
then read back by `gguf.GGUFReader` **and** by an independent byte-level parser in the generator; the
generator aborts on any disagreement (magic, version, counts, every KV's offset/size/type/value, every
tensor info, header padding, offsets, tensor padding, file size, tensor bytes).  The JSON numbers
(offsets, `n_bytes`, `ne`, data start, alignment) are taken from `GGUFReader` after that check.

## Files

| file | bytes | sha256 (first 16) | what |
| --- | ---: | --- | --- |
{files}

Total: {total} bytes.

* `types-v3.gguf` (arch `ckptkit-test`, default alignment 32): one tensor per type
  F32 `[4,64]`, F32 1-D `[64]`, F16 `[4,64]`, BF16 `[4,64]`, Q4_0 `[4,64]`, Q4_1 `[3,96]`, Q5_0 `[2,128]`,
  Q5_1 `[5,32]`, Q8_0 `[4,64]`, Q8_0 3-D `[2,3,64]` (all quantized from seeded float32 data with
  `gguf.quants.quantize`), and Q2_K, Q3_K, Q4_K, Q5_K, Q6_K `[2,512]` (raw blocks, see below).  Shapes are
  numpy (torch) order; the file stores `ne` reversed.  The last row of F32/F16/BF16 starts with special
  values (signed zeros, infinities, NaNs, subnormals, rounding ties, overflow); their input and stored
  bits are in `types-v3.json` → `special_values`.  KVs: every scalar type (u8, i8, u16, i16, u32, i32,
  f32, bool ×2, string ×3 incl. UTF-8 and empty, u64, i64, f64 ×2), arrays of every scalar element type
  and of strings (incl. an empty string element), plus `general.architecture` and
  `general.quantization_version` = {qv}.
* `types-v3.expected.safetensors`: `<name>` = `gguf.quants.dequantize(stored, type)` as F32 in numpy
  shape; `<name>.raw` = the stored bytes as U8 `[rows, row_bytes]` (leading dims flattened) for every
  type except F32.  Compare **bit-exactly**: it contains NaN, ±inf and -0.0 on purpose.
* `types-v3.json`: header fields, section boundaries, data start, alignment, every KV (offset, encoded
  size, type + id, value; f32/f64 also as bits) and every tensor (type name + id, `ne` as stored, numpy
  `shape`, `offset` relative to the data section, `offset_abs`, `n_bytes`, `padded_bytes`, info offset,
  sha256 of its bytes).
* `types-v2.gguf`: the same file as GGUF **v2** — byte 4 is `02` instead of `03`, nothing else differs
  (recorded in `types-v3.json` → `v2_variant`).  Use `types-v3.json`/`.expected.safetensors` for it.
* `model-v3.gguf` + `model-v3.json` + `model-v3.expected.safetensors`: the `types-v3.gguf` tensors (same
  order, types, shapes, offsets and bytes: the two data sections are identical) under model-like names,
  one quantized tensor per module.  Naming rule: the `types-v3` tensor at index i of type T is
  `blk.<i>.<lower-case T>.weight`, except the 2-D F32 one (`token_embd.weight`) and the 1-D F32 one
  (`output_norm.weight`); `model-v3.json` → `same_data_as.tensor_names` maps each name back.  Tensors:
{model_tensors}
  KVs in file order (realistic LLM metadata; no `general.alignment`, so the default alignment 32;
  `block_count` = highest block index + 1, although `blk.0`/`blk.1` hold no tensor):
{model_kvs}
  Tensor infos end at {model_ti_end}, data starts at {model_start}.  The expected file follows the
  `types-v3.expected.safetensors` convention (same values and bits, model-v3 names).
* `nested-array.gguf` + `nested-array.json`: arrays of arrays (written by `GGUFWriter.add_array`, see
  below), a u32 KV after them (`0xdeadbeef`, to check the reader skipped them correctly) and one
  F32 `[4]` tensor `t.f32` = `[0, 1, 2, 3]`.
* `align64.gguf` + `align64.json` + `align64.expected.safetensors`: `general.alignment` = 64 (u32) as the
  **last** KV, tensors `a.f16` F16 `[3,7]` (42 bytes), `b.i8` I8 `[5]` (5 bytes), `c.q8_0` Q8_0 `[1,64]`
  (68 bytes) at offsets 0, 64, 128.  A filler string KV makes the tensor infos end at {a64_ti_end}
  ({a64_mod} mod 64), so a reader that ignores `general.alignment` computes data start {a64_wrong}
  instead of {a64_start}.  Expected: F16/Q8_0 dequantized to F32, `b.i8` as stored (I8, no dequantization).
* `quant-roundtrip/`: `input.safetensors` (key `input`, F32 `[8,256]`), and for Q8_0, Q4_0, Q4_1, Q5_0,
  Q5_1: `<TYPE>.bin` = the exact bytes of `gguf.quants.quantize(input, TYPE)` (`[8, row_bytes]`
  row-major, no header), `<TYPE>.dequant.safetensors` (key `dequant`, F32 `[8,256]`) =
  `gguf.quants.dequantize` of those bytes.  `rows.json` describes the rows and, per type and row, the
  stored f16 scales `d` (bits) and the inf/NaN counts of the dequantization.  Rows:
{rows}

## Layout facts verified on every file

* Header (24 bytes): magic `GGUF` (bytes `47 47 55 46`, u32 LE `0x46554747`), u32 version, u64
  tensor_count, u64 kv_count.  All little-endian.
* KV: key = GGUF string (u64 byte length + UTF-8 bytes, no NUL), u32 value type, value.  Type ids:
  u8=0 i8=1 u16=2 i16=3 u32=4 i32=5 f32=6 bool=7 string=8 array=9 u64=10 i64=11 f64=12.  Scalars are
  packed with no alignment; bool is one byte 0/1; an array is u32 element type + u64 element count +
  the elements back to back (each string with its own u64 length; each nested array with its own
  type + count).  Nothing in the metadata is aligned or padded.
* Tensor info: GGUF string name, u32 n_dims, n_dims × u64 `ne`, u32 ggml type, u64 offset.  `ne[0]` is the
  innermost (contiguous) dimension = the LAST numpy dimension: `ne` = reversed numpy shape
  (`[2,3,64]` is stored as `ne = [64,3,2]`).  `ne[0]` must be a multiple of the type's block size;
  `n_bytes = n_elements / block_size * type_size`.
* Alignment = `general.alignment` if present (must be **u32** and a power of two; GGUFReader and ggml both
  insist on u32), else 32.  It may be any KV, including the last, so all KVs must be read first.
* Data start = end of tensor infos rounded up to the alignment, padding bytes are `00`
  (`types-v3.gguf`: infos end at {v3_ti_end}, data starts at {v3_start}).
* Tensor offsets are relative to the data start.  GGUFWriter lays tensors out in insertion order with
  `offset[i] = Σ_(j<i) align_up(n_bytes[j], alignment)` and writes `00` padding after **every** tensor,
  the last one included, so `file size = data_start + Σ align_up(n_bytes, alignment)`.  ggml's loader
  (`ggml/src/gguf.cpp`) rejects a file whose offsets are not exactly that running sum
  ("tensor '...' has offset X, expected Y"); GGUFReader does not check offsets at all (probe below).
* Block layouts read back from `gguf/quants.py` (all little-endian, `d`/`dmin`/`m` are f16):
  Q4_0 = d + 16 B nibbles (18 B/32); Q4_1 = d, m + 16 B (20 B/32); Q5_0 = d + u32 qh + 16 B (22 B/32);
  Q5_1 = d, m + qh + 16 B (24 B/32); Q8_0 = d + 32 × i8 (34 B/32); BF16 = upper 16 bits of the f32.
  K-quants per 256: Q2_K = scales[16] qs[64] d dmin (84 B); Q3_K = hmask[32] qs[64] scales[12] d (110 B);
  Q4_K = d dmin scales[12] qs[128] (144 B); Q5_K = d dmin scales[12] qh[32] qs[128] (176 B);
  Q6_K = ql[128] qh[64] scales[16] (i8) d (210 B).

## GGUF v2 vs v3

`types-v2.gguf` is `types-v3.gguf` with the version u32 set to 2, and that is a faithful v2 file because
the v2 → v3 change did not touch the little-endian layout:

* Spec (`ggml-org/ggml` `docs/gguf.md`, "Version History"): "v3: Adds big-endian support."
  "v2: Most countable values (lengths, etc) were changed from `uint32` to `uint64`"; v1 is the
  u32 version.  v2 also introduced the u64/i64/f64 value types (llama.cpp PR #2821 "gguf : add 64-bit
  support (GGUF v2)"; candle PR #725), so these KVs are legal in a v2 file.
* The v3 bump was llama.cpp PR #3552 ("Enable llama.cpp on s390x big endian platform"): a big-endian
  file is the same layout with every value byte-swapped (spec: "all values (including metadata values
  and tensors) will also be big-endian"); readers detect it by the version field reading as
  `0x03000000`.  No field was added, removed or resized; downstream readers treated v3 as a pure
  version-number bump on little-endian (gpt4all PR #1582: "I don't think GGUFv3 is actually a
  different format on little-endian CPUs"; iree PR #17319 accepts 2 and 3 with one code path).
* gguf-py {gguf}: `GGUFReader` accepts `READER_SUPPORTED_VERSIONS = [2, 3]` and has no other version
  branch; `GGUFWriter` only writes `GGUF_VERSION` = 3.  ggml's `gguf.cpp` rejects 0, 1 ("GGUFv1 is no
  longer supported") and > 3, and otherwise parses v2 and v3 identically (it also writes the version it
  read back out unchanged).
* Checked by the generator: GGUFReader reads `types-v2.gguf` with identical fields (offsets, types, raw
  parts), tensor infos, data start, tensor bytes and dequantizations; the two files differ only at byte 4.
* Caveat: BF16 (type 30) and the newer K/IQ types were added to ggml without a version bump, so a real
  v2-era writer would never have produced them; the layout is nevertheless the same.  A reader should
  not gate tensor types on the file version.

## Nested arrays

The spec allows them ("Arrays can be nested").  `GGUFWriter.add_array` writes them (element type
inferred per inner list: `[[1,2],["x","yz"]]` is ARRAY of (ARRAY of INT32, ARRAY of STRING)).  They are
kept out of `types-v3.gguf` on purpose, in `nested-array.gguf`, because **ggml's loader rejects the whole
file** when any array's element type is ARRAY (`gguf.cpp`: "key '...' has invalid GGUF type 9"), so a
reader mirroring ggml may legitimately reject this file while it must accept `types-v3.gguf`.
GGUFReader reads them but only approximately: `ReaderField.types` holds the chain of the FIRST element
only (`[ARRAY, ARRAY, INT32]`), and `contents()` flattens every leaf, decoded with that first element's
type — for `nested_mixed` it returns {mixed} (the string bytes as integers).  `nested-array.json` gives
the true nested structure and, per nested KV, what gguf-py's reader returns (`gguf_py_reader`).

## K-quant tensors (raw blocks)

gguf-py {gguf} has no Q2_K..Q6_K quantizer (`quantize` raises NotImplementedError, probe below), only
dequantizers.
So each `[2,512]` K-quant tensor is 2 rows × 2 blocks of seeded random bytes in which the f16 super-block
scale `d` (and `dmin` for Q2_K/Q4_K/Q5_K) of every block is overwritten with `2^u`, `u ~ U[-10,-4]`,
rounded to f16 (offsets in `types-v3.json` → `k_quant_raw`).  The generator checks the offsets by
zeroing those fields (the block must then dequantize to all zeros) and that the dequantization is finite.
They are written with `GGUFWriter.add_tensor(name, uint8 array [2, 2*type_size], raw_dtype=TYPE)` and
**no** `raw_shape`: for a uint8 array GGUFWriter treats the array shape (or `raw_shape`, if given) as a
BYTE shape and converts it with `quant_shape_from_byte_shape`; passing the element shape `[2,512]` as
`raw_shape` fails (probe below).

## gguf-py {gguf} behaviours found (checked by the generator)

Quantizers (`gguf/quants.py`, all float32 numpy arithmetic):

* The f16 scale is computed in f32 and only rounded to f16 for storage; the quantization itself uses
  the unrounded `id = 1/d` (as ggml's reference C does).  f32 → f16 is numpy's round-to-nearest-even.
* Q8_0: `d = max|x| / 127`, `q = round(x * id)` rounding half **away from zero** (`np_roundf`; row 3 checks it).
* Q4_0 / Q5_0: `max` = the element of largest |x| (the first one on ties) **with its sign**,
  `d = max / -8` (`/ -16`), `q = min(15, trunc(x*id + 8.5))` (`31`, `16.5`).  The element equal to
  `-max` therefore clips: it dequantizes to `-max * 7/8` (row 4 checks it).
* Q4_1 / Q5_1: `d = (max - min) / 15` (`/ 31`), `m = min`, `q = trunc((x - min) * id + 0.5)`.  A
  constant block gives `d = 0`, `id = 0`, all `q = 0` and dequantizes exactly to `m` (row 5).
* Row 1 (|x| ~ 1e-30): every `d` underflows to f16 ±0, the dequantization is ±0 (signed zeros matter
  bit-exactly).  Row 2 (|x| ~ 1e30): every `d` (and Q4_1/Q5_1 `m`) overflows to f16 ±inf; gguf-py does
  not clamp.  Dequantized non-finite counts (row 2, of 256): {huge}.
  numpy warnings (any row) during quantize: {warns}; during dequantize: {dwarns}.
  (Inputs whose `d` is an f32 subnormal would make `1/d` overflow and the uint8 cast undefined;
  not exercised.)
* `quantize` is row-local: quantizing row by row gives the same bytes (checked).
* F16: `quantize(x, F16)` is `x.astype(float16)`: ties to even, 65520 → inf, 2^-25 → 0.  BF16: ties to
  even, NaN forced quiet keeping sign (`0x7f800001` → `0x7fc0`, `0xffc00001` → `0xffc0`), FLT_MAX → +inf.

GGUFReader / GGUFWriter (probes on modified copies of the fixtures; nothing here is written out):

{probes}

Also: `ReaderTensor.shape` is `ne` (ggml order), while `ReaderTensor.data` has the numpy shape (for
block-quantized types and BF16 it is the uint8 BYTE shape `[..., row_bytes]`).  `add_array` infers
Python ints as INT32 and floats as FLOAT32; other element types need `add_key_value(k, v, ARRAY,
sub_type=...)`.  `add_key_value` with an existing key only logs a warning and overwrites.
"""


def render_readme(out: Path, seed: int, v3: dict, model: dict, a64: dict, rt: dict, probe_res: dict) -> str:
    what = {
        "types-v3.gguf": "all tensor and KV types (v3)",
        "types-v3.json": "layout + KVs + tensors of types-v3.gguf",
        "types-v3.expected.safetensors": "dequantized F32 + raw bytes per tensor",
        "types-v2.gguf": "types-v3.gguf as version 2",
        "model-v3.gguf": "types-v3 tensors under model-like names",
        "model-v3.json": "layout + KVs + tensors of model-v3.gguf",
        "model-v3.expected.safetensors": "expected tensors of model-v3.gguf",
        "nested-array.gguf": "arrays of arrays",
        "nested-array.json": "layout + KVs of nested-array.gguf",
        "align64.gguf": "general.alignment = 64",
        "align64.json": "layout + KVs + tensors of align64.gguf",
        "align64.expected.safetensors": "expected tensors of align64.gguf",
        "quant-roundtrip/input.safetensors": "quantizer input F32 [8,256]",
        "quant-roundtrip/rows.json": "row contents, scales, non-finite counts",
    }
    for qt in RT_TYPES:
        what[f"quant-roundtrip/{qt.name}.bin"] = f"gguf.quants.quantize bytes, {qt.name}"
        what[f"quant-roundtrip/{qt.name}.dequant.safetensors"] = f"dequantized {qt.name}.bin"
    rows, total = [], 0
    for rel in sorted(what, key=lambda s: ("/" in s, s)):
        data = (out / rel).read_bytes()
        total += len(data)
        rows.append(f"| `{rel}` | {len(data)} | `{sha256(data)[:16]}` | {what[rel]} |")
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "README.md")
    require(on_disk == sorted(what), f"unexpected files in {out}: {sorted(set(on_disk) ^ set(what))}")
    huge = ", ".join(f"{k} {v['rows'][2]['dequant_inf']} inf + {v['rows'][2]['dequant_nan']} NaN"
                     for k, v in rt["types"].items())
    warns = sorted({m for v in rt["types"].values() for m in v["numpy_warnings_quantize"]})
    dwarns = sorted({m for v in rt["types"].values() for m in v["numpy_warnings_dequantize"]})
    a = a64["desc"]
    m = model["desc"]
    back = m["same_data_as"]["tensor_names"]
    model_tensors = "\n".join(
        f"  {i}. `{t['name']}` {t['ggml_type']} `[{','.join(map(str, t['shape']))}]` (types-v3 `{back[t['name']]}`)"
        for i, t in enumerate(m["tensors"]))

    def kv_text(kv: dict) -> str:
        if kv["type"] == "ARRAY":
            return f"`{kv['key']}` = ARRAY of {kv['item_type']} {json.dumps(kv['value'], ensure_ascii=False)}"
        v = json.dumps(kv["value"], ensure_ascii=False) if kv["type"] == "STRING" else repr(kv["value"])
        bits = f", bits {kv['bits']}" if "bits" in kv else ""
        return f"`{kv['key']}` = {v} ({kv['type']}{bits})"

    return README.format(
        model_tensors=model_tensors, model_kvs="\n".join(f"  * {kv_text(kv)}" for kv in m["kv"]),
        model_ti_end=m["tensor_info_end"], model_start=m["data_start"],
        seed=seed, python=".".join(map(str, sys.version_info[:3])), qv=GGML_QUANT_VERSION, **VERSIONS,
        files="\n".join(rows), total=total,
        rows="\n".join(f"  {i}. {c}" for i, c in enumerate(RT_ROWS)),
        a64_ti_end=a["tensor_info_end"], a64_mod=a["tensor_info_end"] % 64,
        a64_wrong=a["data_start_if_alignment_ignored"], a64_start=a["data_start"],
        v3_ti_end=v3["desc"]["tensor_info_end"], v3_start=v3["desc"]["data_start"],
        mixed="`[1, 2, 120, 121, 122]`", huge=huge,
        warns="; ".join(f"`{w}`" for w in warns) if warns else "none",
        dwarns="; ".join(f"`{w}`" for w in dwarns) if dwarns else "none",
        probes="\n".join(f"* {k}: `{v}`" for k, v in probe_res.items()),
    )


# ------------------------------------------------------------------------------------------------

OWNED = ["README.md", "types-v3.gguf", "types-v3.json", "types-v3.expected.safetensors", "types-v2.gguf",
         "model-v3.gguf", "model-v3.json", "model-v3.expected.safetensors",
         "nested-array.gguf", "nested-array.json", "align64.gguf", "align64.json", "align64.expected.safetensors"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = ap.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OWNED:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "quant-roundtrip", ignore_errors=True)

    try:
        arrays, specials = type_tensors(args.seed)
        v3 = build_types(out, args.seed, arrays, specials)
        model = build_model(out, args.seed, arrays, v3)
        build_nested(out)
        a64 = build_align64(out, args.seed)
        rt = build_roundtrip(out, args.seed)
        with tempfile.TemporaryDirectory() as tmp:
            probe_res = probes(Path(tmp), out / "types-v3.gguf", out / "align64.gguf", v3["desc"], a64["desc"])
        # expectations the README states about gguf-py's reader
        require(probe_res["version 1"].startswith("ValueError"), "v1 rejected")
        for qt in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
            require(probe_res[f"gguf.quants.quantize(x, {qt})"].startswith("NotImplementedError"), f"{qt} quantizer")
        require(probe_res["version 4"].startswith("ValueError"), "v4 rejected")
        require(probe_res["tensor offset not a multiple of the alignment (align64 b.i8: 64 -> 65)"] == "accepted",
                "GGUFReader does not check offsets")
        require(probe_res["add_tensor(uint8 Q2_K bytes [2, 168], raw_shape=[2, 512] (element shape))"]
                .startswith("writer raises ValueError"), "element raw_shape rejected")
        (out / "README.md").write_text(render_readme(out, args.seed, v3, model, a64, rt, probe_res), encoding="utf-8")
    except Mismatch as e:
        sys.exit(f"error: gguf-py and the independent parser disagree (or a stated fact failed): {e}")
    for f in out.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total} bytes; gguf {VERSIONS['gguf']}, numpy {VERSIONS['numpy']}, seed {args.seed})")


if __name__ == "__main__":
    main()

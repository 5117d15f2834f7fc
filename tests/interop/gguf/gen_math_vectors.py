#!/usr/bin/env python3
"""Test vectors for src/layout/gguf/math_tests.rs that the fixtures (gen_gguf_fixtures.py) do not reach:
dequantizations of blocks with NaN / infinite f16 scales (payload propagation, default NaNs, numpy's operand
order for a one-block Q4_1/Q5_1 tensor) and quantizations of edge inputs (scales whose reciprocal overflows,
ranges that overflow f32, f32 subnormals, signed-zero ties), each made by gguf-py 0.19.0's numpy code.

    venv="$(bash tests/interop/gguf/setup_venv.sh | tail -n1)"
    "$venv/bin/python" tests/interop/gguf/gen_math_vectors.py > src/layout/gguf/math_vectors.rs

Deterministic (seed 20261202).  Run on x86-64: numpy's NaN results, signed-zero reductions and float->uint8
casts there are what the vectors record (src/layout/gguf/math.rs says which).
"""
import numpy as np, gguf, warnings
warnings.simplefilter('ignore')
from gguf.quants import dequantize, quantize
T=gguf.GGMLQuantizationType
rng=np.random.default_rng(20261202)
def h16(v): return np.array([v],dtype=np.uint16).view(np.uint8)
def enc(out):
    bits=[int(v) for v in out.view(np.uint32).ravel()]
    vals=[]
    for b in bits:
        if b not in vals: vals.append(b)
    assert len(vals)<=62, len(vals)
    alpha='0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'
    return vals, ''.join(alpha[vals.index(b)] for b in bits)
cases=[]
def deq_case(label, tname, blocks):
    t=getattr(T,tname)
    data=np.concatenate(blocks).astype(np.uint8)
    out=dequantize(data.reshape(1,-1), t)
    vals,idx=enc(out)
    cases.append((label,tname,data.tobytes().hex(),vals,idx))
NAN_A=0x7d01 # f16 sNaN payload
NAN_B=0x7e05 # qNaN
NAN_C=0xfe77 # negative qNaN
INF=0x7c00; NINF=0xfc00
def rb(n): return rng.integers(0,256,n).astype(np.uint8)
# legacy types
for d,m in [(NAN_A,NAN_B),(INF,NAN_C),(NINF,INF),(INF,INF),(NAN_C,0x3c00),(0x3c00,NAN_A),(INF,0x0000)]:
    for nb in [1,2]:
        q41=[np.concatenate([h16(d),h16(m),rb(16)]) for _ in range(nb)]
        deq_case(f"Q4_1 d={d:#06x} m={m:#06x} blocks={nb}","Q4_1",q41)
        q51=[np.concatenate([h16(d),h16(m),rb(4),rb(16)]) for _ in range(nb)]
        deq_case(f"Q5_1 d={d:#06x} m={m:#06x} blocks={nb}","Q5_1",q51)
for d in [NAN_A,NAN_C,INF,NINF]:
    deq_case(f"Q4_0 d={d:#06x}","Q4_0",[np.concatenate([h16(d),rb(16)]), np.concatenate([h16(0x3555),rb(16)])])
    deq_case(f"Q5_0 d={d:#06x}","Q5_0",[np.concatenate([h16(d),rb(4),rb(16)])])
    deq_case(f"Q8_0 d={d:#06x}","Q8_0",[np.concatenate([h16(d),rb(32)]), np.concatenate([h16(0x0001),rb(32)])])
# K-quants: (d, dmin) scenarios
for d,m in [(NAN_A,NAN_B),(INF,NAN_C),(0x2000,NINF),(NAN_C,0x2000)]:
    deq_case(f"Q2_K d={d:#06x} dmin={m:#06x}","Q2_K",[np.concatenate([rb(16),rb(64),h16(d),h16(m)])])
    deq_case(f"Q4_K d={d:#06x} dmin={m:#06x}","Q4_K",[np.concatenate([h16(d),h16(m),rb(12),rb(128)])])
    deq_case(f"Q5_K d={d:#06x} dmin={m:#06x}","Q5_K",[np.concatenate([h16(d),h16(m),rb(12),rb(32),rb(128)])])
for d in [NAN_A,INF]:
    deq_case(f"Q3_K d={d:#06x}","Q3_K",[np.concatenate([rb(32),rb(64),rb(12),h16(d)])])
    deq_case(f"Q6_K d={d:#06x}","Q6_K",[np.concatenate([rb(128),rb(64),rb(16),h16(d)])])
qcases=[]
def q_case(label, tname, x):
    x=np.asarray(x,dtype=np.float32).reshape(1,-1)
    b=quantize(x, getattr(T,tname))
    qcases.append((label,tname,''.join(f"{int(v):08x}" for v in x.view(np.uint32).ravel()), b.tobytes().hex()))
def zmix(base, p):
    z=np.where(rng.random(32)<0.5,np.float32(0.0),np.float32(-0.0))
    return np.where(rng.random(32)<p, z, base).astype(np.float32)
for tn in ["Q8_0","Q4_0","Q4_1","Q5_0","Q5_1"]:
    # tiny: 1/d overflows (max |x| < 2^-125 or so)
    for s in [1e-38, 1e-44]:
        v=(rng.standard_normal(32)*s).astype(np.float32); v[3]=0.0; v[7]=-0.0
        q_case(f"{tn} tiny scale {s}", tn, v)
    # max-min overflows f32
    v=(rng.standard_normal(32)*1e38).astype(np.float32); v[0]=3e38; v[1]=-3e38
    q_case(f"{tn} range overflow", tn, v)
    # f32 subnormals with a normal max
    v=np.array([f*1e-40 for f in rng.standard_normal(32)],dtype=np.float32); v[5]=1e-3
    q_case(f"{tn} subnormal elements", tn, v)
    # zeros of both signs
    q_case(f"{tn} +0 first", tn, np.array([0.0]+[-0.0]*31,dtype=np.float32))
    q_case(f"{tn} -0 first", tn, np.array([-0.0]+[0.0]*31,dtype=np.float32))
    for k in range(3 if tn in ("Q4_1","Q5_1") else 0):
        q_case(f"{tn} mixed zeros, max 0 #{k}", tn, zmix(-np.abs(rng.standard_normal(32)), 0.4))
        q_case(f"{tn} mixed zeros, min 0 #{k}", tn, zmix(np.abs(rng.standard_normal(32)), 0.4))
        q_case(f"{tn} all zeros mixed #{k}", tn, zmix(np.zeros(32), 1.0))
    # ties of the largest |x| with opposite signs
    if tn in ("Q4_0","Q5_0"):
      v=rng.integers(-3,4,32).astype(np.float32); v[9]=5; v[20]=-5
      q_case(f"{tn} +-max tie", tn, v)
      v=-v; q_case(f"{tn} -+max tie", tn, v)
    # f16 boundary scales
    v=rng.standard_normal(32).astype(np.float32); v[0]=65504.0*127
    q_case(f"{tn} large scale", tn, v)
# signed-zero ties decided among positions 0..16 (where numpy's order differs from first/last)
for tn in ["Q4_1","Q5_1"]:
    for k in range(6):
        v=np.abs(rng.standard_normal(32)).astype(np.float32)+np.float32(0.1)
        z=np.where(rng.random(17)<0.5,np.float32(0.0),np.float32(-0.0))
        v[:17]=np.where(rng.random(17)<0.5, z, v[:17])
        q_case(f"{tn} zero ties in 0..17 #{k}", tn, v)
import importlib.metadata as _md
print(f"// Generated by tests/interop/gguf/gen_math_vectors.py (gguf {_md.version('gguf')}, numpy {np.__version__}, "
      "x86-64); do not edit.")
print("// Included by math_tests.rs; the structs are defined there.")
print("const DEQ_CASES: &[DeqCase] = &[")
for label,t,data,vals,idx in cases:
    print(f'    DeqCase {{ label: "{label}", ty: "{t}", data: "{data}", values: &[{", ".join(f"0x{v:08x}" for v in vals)}], index: "{idx}" }},')
print("];")
print("const QUANT_CASES: &[QuantCase] = &[")
for label,t,x,b in qcases:
    print(f'    QuantCase {{ label: "{label}", ty: "{t}", input: "{x}", bytes: "{b}" }},')
print("];")

#!/usr/bin/env python3
"""Checks and times every sparsemoe CUDA kernel on one GPU, against float64 PyTorch references.

Run through kernels/gpu-check.sh on the GPU machine (nvcc 13.0, PyTorch, CuPy; no Rust). Each
kernel runs on fresh random inputs with its outputs poisoned first; a check passes when every
output was written and the relative L2 error ||out - ref|| / ||ref|| is within the bound of the
output's dtype (f32: 1e-5, bf16 outputs: 8e-3); discrete outputs (indices, routing) must match
exactly, except where the reference itself has a near-tie. Timings are CUDA-event medians against
PyTorch peers, next to the measured copy bandwidth and bf16 matmul rate.

The work is a list of steps (--list-steps): every kernel's checks first, then the timings, the
issue's goal kernels (sparse MLA decode, indexer + top-k, grouped GEMM) first among them. Each
step's inputs come from --seed and the step's name, so `--steps NAME --seed N` repeats one. After
every step gpu-check.md (the table), gpu-check.json (also the steps' state) are rewritten under
--out, and each check and timing is printed as it is measured: a fault or a kill keeps what was
done. A step that leaves the CUDA context broken ends the process with exit status 3; `--resume`
then runs the steps left in a fresh process, adding to the same results (gpu-check.sh does this).

Kernels: a .cu whose cubin kernels/gpu-build.sh prebuilt (target/gpu-check/cubins, --prebuild)
from the same sources and flags is loaded as it is; the others are compiled here with nvcc, in
parallel (NVRTC through CuPy where nvcc fails). A file that does not compile fails its own
kernels' checks, not the others'. ptxas's register and spill report goes to the log.

    python3 kernels/gpu_check.py --out DIR [--quick] [--steps A,B | --skip A,B] [--seed N] [--resume]
    python3 kernels/gpu_check.py --cpu-selftest      # the references alone, on the CPU
    python3 kernels/gpu_check.py --prebuild DIR      # the cubins, with nvcc; no GPU, torch or numpy
    python3 kernels/gpu_check.py --check-cubins      # whether target/gpu-check/cubins is current
    python3 kernels/gpu_check.py --emulate target/cuda-emu/libsparsemoe_kernels_emu.so --out DIR
                                                     # the checks on the CPU emulator (kernels/emu)
    python3 kernels/gpu_check.py --emulate LIB --smoke --out DIR
                                                     # the timing steps' code on the emulator at
                                                     # tiny shapes, one launch a timing
"""
import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zlib

try:
    import numpy as np
    import torch
except ImportError:  # --prebuild, --check-cubins and --list-steps need neither
    np = torch = None

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_DIR = os.path.join(HERE, "cuda")
SOURCES = ["norm.cu", "rope.cu", "activation.cu", "indexer.cu", "topk.cu", "mla_sparse.cu",
           "mla_dense.cu", "moe.cu", "fp8.cu", "grouped_gemm.cu", "engine.cu"]
F32_BOUND, BF16_BOUND = 1e-5, 8e-3
# float32 in and out with bf16 operands on the tensor cores (queries, keys, probabilities each
# rounded once): on the emulator the engine's attention measures 0.8e-3 to 2.0e-3 in
# engine/tests/cuda.rs and 1.3e-3 to 2.4e-3 here (the indexer's scores 1.5e-3 to 2.6e-3), over two
# runs' fresh random inputs
TC_BOUND = 5e-3
# fp8 codes through mma.sync e4m3 (Ada's fp8 tensor cores; on Hopper converted to fp16 for the
# fp16 ones): every product exact, each instruction's 32 summed by the tensor cores (at worst
# about 14 bits kept, DeepSeek-V3's report's figure for Hopper's fp8 wgmma: a part in 1e4 of a
# sum's largest product) and added in float32; 8e-8 on the emulator, which sums in double
FP8_TC_BOUND = 1e-3
FLT_MIN = -3.4028234663852886e38
INDEXER_KEYS, MLA_HEADS_PER_BLOCK, MLA_TILE = 64, 16, 32

# nvcc's flags for every .cu, the same for the cubins kernels/gpu-build.sh prebuilds and for a
# compile on the GPU machine: SASS for sm_90a (the H200) only, and ptxas's report (-Xptxas=-v:
# registers, shared memory and spills of each kernel).
NVCC_FLAGS = ["-std=c++17", "-O3", "-cubin", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas=-v"]
PREBUILT = os.path.join(os.path.dirname(HERE), "target", "gpu-check", "cubins")
MANIFEST = "manifest.json"  # beside the cubins: {file: {"hash": source_hash, "ptxas": report}}

# The steps, in the order they run: every kernel's checks, then the timings (the ceilings first,
# which the others' notes divide by; then the issue's goal kernels).
CHECK_STEPS = ["norm_rope_act", "engine_f32", "fp8", "fp8_linear", "moe", "indexer_topk", "indexer_fp8", "mla"]
TIME_STEPS = ["ceilings", "time_mla", "time_indexer_topk", "time_grouped", "time_engine_attention",
              "time_indexer_fp8", "time_linear"]
STEPS = CHECK_STEPS + TIME_STEPS


def source_hash(src):
    """What a cubin of kernels/cuda/src is made from: nvcc's flags, src and every header there."""
    h = hashlib.sha256(" ".join(NVCC_FLAGS).encode())
    for name in [src] + sorted(f for f in os.listdir(CUDA_DIR) if f.endswith((".cuh", ".h"))):
        h.update(name.encode() + b"\0")
        with open(os.path.join(CUDA_DIR, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def nvcc_compile(nvcc, src, cubin):
    """kernels/cuda/src -> cubin with NVCC_FLAGS. Returns (ok, what nvcc printed: ptxas's report,
    or the errors)."""
    cmd = [nvcc, *NVCC_FLAGS, "-I", CUDA_DIR, os.path.join(CUDA_DIR, src), "-o", cubin]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{' '.join(cmd)}: {type(e).__name__}: {e}"
    text = (r.stdout + r.stderr).strip()
    return r.returncode == 0, text if r.returncode == 0 else f"{' '.join(cmd)}: exit {r.returncode}\n{text}"


def ptxas_report(text):
    """ptxas -v's output as one line a kernel (registers, spills, stack, shared memory), any other
    line (warnings) as it is."""
    lines, fn, frame = [], None, ""
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            fn = m.group(1)
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            frame = f"stack {m.group(1)} B, spills {m.group(2)}/{m.group(3)} B (st/ld)"
        elif (m := re.search(r"Used (\d+) registers(.*)", line)) and fn:
            extra = ", ".join(p.strip() for p in m.group(2).split(",") if "smem" in p)
            lines.append(f"  {fn}: {m.group(1)} registers, {frame}{', ' + extra if extra else ''}")
            fn, frame = None, ""
        elif not re.search(r"Function properties|Compile time|bytes gmem|^\s*$|^ptxas info", line):
            lines.append("  " + line.strip())
    return "\n".join(lines)


def compile_all(nvcc, build, sources, workers=None):
    """Compiles every file of `sources` into build/, in parallel; records each one's hash and
    ptxas report in build/manifest.json. Returns {file: (ok, report or errors)}."""
    os.makedirs(build, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 4) as pool:
        jobs = {src: pool.submit(nvcc_compile, nvcc, src, os.path.join(build, src.replace(".cu", ".cubin")))
                for src in sources}
        results = {src: job.result() for src, job in jobs.items()}
    manifest_path = os.path.join(build, MANIFEST)
    try:
        manifest = json.load(open(manifest_path))
    except (OSError, ValueError):
        manifest = {}
    for src, (ok, text) in results.items():
        if ok:
            manifest[src] = {"hash": source_hash(src), "ptxas": ptxas_report(text)}
        else:
            manifest.pop(src, None)
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)
    return results


def prebuild(dest, nvcc):
    """kernels/gpu-build.sh: every .cu's cubin into dest with its manifest, on the build machine."""
    t = time.time()
    results = compile_all(nvcc, dest, SOURCES)
    for src, (ok, text) in results.items():
        print(f"{src}: {'compiled' if ok else 'FAILED'}")
        print(ptxas_report(text) if ok else text)
    bad = [src for src, (ok, _) in results.items() if not ok]
    print(f"prebuilt {len(SOURCES) - len(bad)} of {len(SOURCES)} cubins into {dest} in {time.time() - t:.0f} s"
          + (f"; FAILED: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


def cubin_of(src, dirs):
    """(path, ptxas report) of a cubin of src built from these sources with these flags in one of
    dirs (their manifests say), or None."""
    want = source_hash(src)
    for d in dirs:
        try:
            entry = json.load(open(os.path.join(d, MANIFEST))).get(src)
        except (OSError, ValueError):
            continue
        path = os.path.join(d, src.replace(".cu", ".cubin"))
        if entry and entry.get("hash") == want and os.path.exists(path):
            return path, entry.get("ptxas", "")
    return None


def kernel_names(src):
    """The extern "C" __global__ entry points of kernels/cuda/src."""
    names = []
    for raw in open(os.path.join(CUDA_DIR, src)).read().split('extern "C" __global__')[1:]:
        head = raw.split("(", 2)
        names.append((head[1].split(")")[1] if "__launch_bounds__" in head[0] else head[0]).split()[-1])
    return names


# ----------------------------------------------------------------------------- references (float64)
def ref_rms_norm(x, w, eps):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def ref_cos_sin(positions, inv_freq, factor):
    angle = positions.float()[:, None] * inv_freq.float()[None, :]  # float32, as the engine
    return torch.cos(angle.double()) * factor, torch.sin(angle.double()) * factor


def ref_rope(x, cos, sin, offset, dim, interleaved):
    """x [n, heads, width]; rotates x[..., offset:offset+dim] in float64."""
    y = x.double().clone()
    half = dim // 2
    c, s = cos[:, None, :], sin[:, None, :]
    if interleaved:
        a, b = offset + 2 * torch.arange(half), offset + 2 * torch.arange(half) + 1
    else:
        a, b = offset + torch.arange(half), offset + half + torch.arange(half)
    xa, xb = y[..., a].clone(), y[..., b].clone()
    y[..., a] = xa * c - xb * s
    y[..., b] = xb * c + xa * s
    return y


def ref_silu_and_mul(x):
    x = x.double()
    cols = x.shape[-1] // 2
    g, u = x[..., :cols], x[..., cols:]
    return g / (1 + torch.exp(-g)) * u


def ref_indexer(q, keys, w, key_start, n_visible, n_keys, scale):
    """q [T,H,D], keys [S_total,D], w [T,H] -> [T, n_keys] with FLT_MIN where s >= n_visible."""
    out = torch.full((q.shape[0], n_keys), FLT_MIN, dtype=torch.float64, device=q.device)
    for t in range(q.shape[0]):
        v = min(int(n_visible[t]), n_keys)
        k = keys[int(key_start[t]): int(key_start[t]) + v].double()
        dots = torch.relu(scale * (q[t].double() @ k.T))  # [H, v]
        out[t, :v] = (w[t].double()[:, None] * dots).sum(0)
    return out


def divided(x, d):
    """x / d as an IEEE division, element by element, as the kernels divide: PyTorch's CUDA
    division by a Python number multiplies by its reciprocal instead, which is one ulp off in
    about half the cases (a 0-dim tensor on the same device is divided for real)."""
    return x / torch.tensor(d, dtype=x.dtype, device=x.device)


def fp8_block_scale(amax, ue8m0):
    """The scale of an fp8 block whose largest magnitude is amax, as the kernels' kv_fp8_scale
    (the engine's fp8_scale): max(amax, 1e-4) / 448 divided for real, with ue8m0 the power of two
    at or above it (exact: a float32's exponent, one up when it has a mantissa)."""
    s = divided(amax.clamp_min(1e-4), 448.0)
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s.double()))).float()
    return s


def ref_quant_fp8(x, pow2):
    """x [rows, dim] -> (e4m3 codes as uint8, float32 scale per row), as indexer_quant_fp8: scale =
    max(amax, 1e-4) / 448 (rounded up to a power of two if pow2), codes = e4m3(x / scale)."""
    xf = x.float()
    scale = fp8_block_scale(xf.abs().amax(-1), pow2)
    codes = (xf / scale[:, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return codes.view(torch.uint8), scale


def ref_fp8_rows(codes, scale):
    """e4m3 codes [rows, dim] times a scale per row, in float64."""
    return codes.view(torch.float8_e4m3fn).double() * scale.double()[:, None]


def ref_mla(q, kv, slots, latent, scale):
    """q [R,H,dqk]; slots: list of LongTensors (valid cache slots per row). -> out [R,H,latent], lse [R,H]."""
    R, H, _ = q.shape
    out = torch.zeros(R, H, latent, dtype=torch.float64, device=q.device)
    lse = torch.full((R, H), -math.inf, dtype=torch.float64, device=q.device)
    for r in range(R):
        if len(slots[r]) == 0:
            continue
        k = kv[slots[r]].double()  # [n, dqk]
        s = (q[r].double() @ k.T) * scale  # [H, n]
        lse[r] = torch.logsumexp(s, -1)
        out[r] = torch.softmax(s, -1) @ k[:, :latent]
    return out, lse


def ref_route(logits, bias, top_k, n_group, topk_group, norm, rsf):
    """engine/src/moe.rs `route`, vectorised, float64. Returns ids (sorted), weights, and each
    token's smallest selection margin (group boundary and expert boundary) for tie detection."""
    T, E = logits.shape
    s = torch.sigmoid(logits.double())
    b = s + bias.double()
    margin = torch.full((T,), math.inf, dtype=torch.float64, device=logits.device)
    if n_group > 1:
        g = b.view(T, n_group, E // n_group).topk(2, -1).values.sum(-1)  # [T, G]
        order = g.sort(-1, descending=True).values
        if topk_group < n_group:
            margin = torch.minimum(margin, order[:, topk_group - 1] - order[:, topk_group])
        keep = torch.zeros_like(g, dtype=torch.bool)
        keep.scatter_(1, g.topk(topk_group, -1).indices, True)
        b = b.masked_fill(~keep.repeat_interleave(E // n_group, 1), -math.inf)
    top = b.topk(min(top_k + 1, E), -1)
    if top_k < E:
        gap = top.values[:, top_k - 1] - top.values[:, top_k]
        margin = torch.minimum(margin, torch.nan_to_num(gap, posinf=math.inf))
    ids = top.indices[:, :top_k].sort(-1).values
    w = s.gather(1, ids)
    if norm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return ids, w * rsf, margin


def ref_fp8(q_u8, scale_inv):
    rows, cols = q_u8.shape
    v = q_u8.view(torch.float8_e4m3fn).double()
    sc = scale_inv.double().repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    return v * sc


def ref_grouped_gemm(x, w, offsets):
    y = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64, device=x.device)
    for e in range(w.shape[0]):
        a, b = int(offsets[e]), int(offsets[e + 1])
        if b > a:
            y[a:b] = x[a:b].double() @ w[e].double().T
    return y


def topk_parts(rows, n, k, sms):
    """Parts the engine splits each of `rows` top-k rows of n scores into (launch::topk_parts):
    1 once the rows give every SM a block; else enough to fill them, at most 16 and sqrt(n / k)."""
    if k == 0 or rows >= sms:
        return 1
    return max(1, min(sms // max(rows, 1), math.isqrt(n // k), 16))


def topk_collected(row, k):
    """Entries of a row at or above the first 16 bits of its k-th largest (as topk.cu orders
    float bits): what topk_rows_f32 collects into shared memory when there are at most 4096."""
    b = row.float().view(torch.int32).long() & 0xFFFFFFFF
    u = torch.where(b >= 0x80000000, (~b) & 0xFFFFFFFF, b | 0x80000000)
    top16 = u >> 16
    return int((top16 >= u.topk(k).values[-1] >> 16).sum())


def rel_l2(out, ref):
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return math.inf
    den = torch.linalg.vector_norm(ref).item()
    num = torch.linalg.vector_norm(out - ref).item()
    return num / den if den > 0 else num


# ----------------------------------------------------------------------------- CPU self-test
def cpu_selftest():
    """The references against hand-worked cases (engine/src/moe.rs tests, rope identities)."""
    torch.manual_seed(0)
    ok = True

    def expect(cond, what):
        nonlocal ok
        print(("ok    " if cond else "FAIL  ") + what)
        ok &= bool(cond)

    lg = torch.tensor([[2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0]])
    bias = torch.zeros(8)
    bias[7] = 10.0
    ids, w, _ = ref_route(lg, bias, 2, 1, 1, True, 2.0)
    sg = lambda v: 1 / (1 + math.exp(-v))
    expect(ids.tolist() == [[0, 7]] and abs(w[0, 0].item() - 2 * sg(2) / (sg(2) + sg(-5))) < 1e-9,
           "route: bias picks, weights unbiased")
    lg = torch.tensor([[5.0, -5.0, 1.0, 1.0, -1.0, -1.0, -2.0, -2.0]])
    expect(ref_route(lg, torch.zeros(8), 2, 4, 1, True, 2.0)[0].tolist() == [[2, 3]], "route: group top-2 sum")
    ids, _, margin = ref_route(lg, torch.zeros(8), 2, 4, 2, True, 2.0)
    expect(ids.tolist() in ([[0, 2]], [[0, 3]]) and margin.item() == 0.0,
           "route: two groups; experts 2 and 3 tie (engine takes 2), margin 0 marks it ambiguous")
    x = torch.randn(5, 3, 24)
    pos = torch.arange(5)
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    c, s = ref_cos_sin(pos, inv, 1.0)
    for inter in (True, False):
        y = ref_rope(x, c, s, 16, 8, inter)
        expect(torch.allclose(y[0], x[0].double()) and torch.allclose(y.norm(dim=-1), x.double().norm(dim=-1)),
               f"rope interleaved={inter}: identity at 0, norm kept")
    qi, ki, wi = torch.randn(4, 3, 8), torch.randn(10, 8), torch.randn(4, 3)
    sc = ref_indexer(qi, ki, wi, torch.zeros(4), torch.tensor([1, 3, 10, 12]), 10, 0.5)
    manual = sum(wi[1, h].item() * max(0.0, 0.5 * float(qi[1, h] @ ki[2])) for h in range(3))
    expect(abs(sc[1, 2].item() - manual) < 1e-5 and sc[1, 3].item() == FLT_MIN and sc[0, 1].item() == FLT_MIN,
           "indexer: weighted ReLU sum, float32-min mask")
    xq = torch.tensor([[1.0, -448.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0 ** -12, 0.0, 0.0]])
    cq, sq = ref_quant_fp8(xq, False)
    deq = ref_fp8_rows(cq, sq)
    expect(sq[0].item() == 1.0 and deq[0].tolist() == [1.0, -448.0, 0.5, 3.0] and sq[1].item() == np.float32(1e-4) / np.float32(448)
           and deq[1].abs().sum().item() == 0 and ref_quant_fp8(xq, True)[1][2].item() == 2.0 ** -8,
           "fp8 quant: scale amax/448 (floor 1e-4), codes exact where representable, pow2 rounds the scale up")
    q, kv = torch.randn(2, 4, 12), torch.randn(20, 12)
    out, lse = ref_mla(q, kv, [torch.tensor([3, 5, 7]), torch.tensor([], dtype=torch.long)], 8, 0.3)
    p = torch.softmax(0.3 * q[0, 1].double() @ kv[[3, 5, 7]].double().T, -1)
    expect(torch.allclose(out[0, 1], p @ kv[[3, 5, 7], :8].double()) and lse[1, 0].item() == -math.inf
           and out[1].abs().sum().item() == 0, "mla: softmax over listed slots, empty row")
    qb = torch.tensor([[0x38, 0xB8, 0x7E, 0x01]], dtype=torch.uint8)
    expect(ref_fp8(qb, torch.tensor([[2.0]])).tolist() == [[2.0, -2.0, 896.0, 2 * 2.0 ** -9]], "fp8 e4m3fn decode x scale")
    xs = torch.randn(3, 10)
    expect(torch.allclose(ref_silu_and_mul(xs), torch.nn.functional.silu(xs[:, :5].double()) * xs[:, 5:].double()), "silu_and_mul")
    expect(torch.allclose(ref_rms_norm(xs, torch.ones(10), 0.0).pow(2).mean(-1), torch.ones(3, dtype=torch.float64)), "rms_norm")
    xg, wg = torch.randn(7, 6), torch.randn(3, 4, 6)
    off = torch.tensor([0, 2, 2, 7])
    yg = ref_grouped_gemm(xg, wg, off)
    expect(torch.allclose(yg[3], xg[3].double() @ wg[2].double().T), "grouped gemm: row 3 belongs to expert 2")
    print("cpu self-test:", "passed" if ok else "FAILED")
    return 0 if ok else 1


# ----------------------------------------------------------------------------- GPU harness
class Harness:
    def __init__(self, out_dir, quick, build_dir, cubin_dirs):
        import cupy  # only on the GPU machine

        self.cp = cupy
        self.init_results(out_dir, quick)
        self.on_gpu, self.smoke = True, False  # EmuHarness: no GPU; smoke: the timings at tiny shapes
        self.dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(0)
        self.sms = props.multi_processor_count
        self.card = f"{props.name}, {props.multi_processor_count} SMs"
        self.load_modules(build_dir, cubin_dirs)

    def init_results(self, out_dir, quick):
        self.out_dir = out_dir
        self.quick = quick
        self.rows = []  # (check, status, detail)
        self.timings = []  # (what, ours_ms, peer, peer_ms, note)
        self.steps = {}  # name -> {"status", "seconds", "failed"}, in the order they ran
        self.seeds = []  # one a process (--resume adds one)
        self.failed = 0
        self.kernels = {}
        self.smem_raised = {}
        self.copy_gbs = self.mm_tflops = float("nan")  # until the ceilings step measures them
        self.started = time.time()
        self.earlier_s = 0.0  # earlier processes' run time, with --resume

    def load_modules(self, build, cubin_dirs):
        """Every .cu's kernels: a prebuilt cubin of these sources where one of cubin_dirs has one,
        else compiled with nvcc (in parallel, into build), else NVRTC through CuPy. A file that
        fails is reported (a FAIL row and its errors) and its kernels stay missing: the checks
        that launch them fail, the others run."""
        cp = self.cp
        nvcc = os.environ.get("NVCC") or "nvcc"
        t = time.time()
        os.makedirs(build, exist_ok=True)
        found = {src: cubin_of(src, cubin_dirs) for src in SOURCES}
        todo = [src for src in SOURCES if not found[src]]
        compiled = compile_all(nvcc, build, todo) if todo else {}
        print(f"kernels: cubins of these sources found for {len(SOURCES) - len(todo)} files; {len(todo)} compiled "
              f"here with {nvcc}, {sum(ok for ok, _ in compiled.values())} of them without errors, "
              f"in {time.time() - t:.1f} s", flush=True)
        self.module_errors = {}
        for src in SOURCES:
            t = time.time()
            cubin = os.path.join(build, src.replace(".cu", ".cubin"))
            if found[src]:
                first = os.path.abspath(os.path.dirname(found[src][0])) == os.path.abspath(cubin_dirs[0])
                where = "prebuilt" if first else "compiled earlier"
                attempts = [(f"cubin ({where})", found[src][0], found[src][1])]
            elif compiled[src][0]:
                attempts = [("cubin (nvcc here)", cubin, ptxas_report(compiled[src][1]))]
            else:
                attempts = []
            errors = [] if attempts else [f"nvcc: {compiled[src][1]}"]
            if found[src]:
                attempts.append(("nvcc here", None, None))  # a prebuilt cubin the driver refuses
            attempts.append(("NVRTC (CuPy)", None, ""))
            mod = None
            for how, path, report in attempts:
                try:
                    if how == "nvcc here":
                        ok, text = nvcc_compile(nvcc, src, cubin)
                        if not ok:
                            raise RuntimeError(text)
                        path, report = cubin, ptxas_report(text)
                    if path:
                        mod = cp.RawModule(path=path)
                    else:
                        mod = cp.RawModule(code=open(os.path.join(CUDA_DIR, src)).read(), backend="nvrtc",
                                           options=("-std=c++17", f"-I{CUDA_DIR}", "--gpu-architecture=sm_90a"))
                    for name in kernel_names(src):
                        self.kernels[name] = mod.get_function(name)
                    break
                except Exception as e:  # a cubin the driver refuses, nvcc's or NVRTC's errors
                    errors.append(f"{how}: {type(e).__name__}: {e}")
                    mod = None
            if mod is None:
                detail = " | ".join(" ".join(e.split()) for e in errors)[:600]
                self.module_errors[src] = detail
                print(f"{src}: FAILED to load, its kernels' checks will fail:\n" + "\n".join(errors), flush=True)
                continue
            if errors:
                print(f"{src}: " + "\n".join(errors), flush=True)
            print(f"{src}: loaded from {how} in {time.time() - t:.1f} s" + (f"; ptxas:\n{report}" if report else ""),
                  flush=True)

    def record_module_errors(self):
        """A FAIL row a file that did not load (once, also across --resume)."""
        for src, detail in getattr(self, "module_errors", {}).items():
            if not any(r[0] == f"compile {src}" for r in self.rows):
                self.record_bool(f"compile {src}", False, detail)

    def launch(self, name, grid, block, args, smem=0):
        conv = []
        for a in args:
            if isinstance(a, torch.Tensor):
                conv.append(np.uint64(a.data_ptr()))
            elif isinstance(a, tuple):
                conv.append({"i": np.int32, "l": np.int64, "f": np.float32, "p": np.uint64}[a[0]](a[1]))
            else:
                raise TypeError(a)
        if name not in self.kernels:
            raise RuntimeError(f"kernel {name} is not loaded (its file did not compile or load: see the log)")
        k = self.kernels[name]
        if smem > 48 * 1024 and self.smem_raised.get(name, 0) < smem:
            k.max_dynamic_shared_size_bytes = smem  # opt in above 48 KB, once per kernel and size
            self.smem_raised[name] = smem
        k(tuple(int(g) for g in grid), (int(block),), tuple(conv), shared_mem=int(smem))

    def record(self, check, err, bound, extra=""):
        ok = err <= bound
        self.failed += 0 if ok else 1
        self.rows.append((check, "pass" if ok else "FAIL", f"rel L2 {err:.2e} (bound {bound:.0e}) {extra}".strip()))
        print(f"{'pass' if ok else 'FAIL'}  {check}: rel L2 {err:.3e} bound {bound:.0e} {extra}", flush=True)

    def record_bool(self, check, ok, detail):
        self.failed += 0 if ok else 1
        self.rows.append((check, "pass" if ok else "FAIL", detail))
        print(f"{'pass' if ok else 'FAIL'}  {check}: {detail}", flush=True)

    def add_timing(self, what, ours_ms, peer, peer_ms, note):
        """A timing row, printed as it is measured (and in the results written after its step)."""
        self.timings.append((what, ours_ms, peer, peer_ms, note))
        print(f"time  {what}: ours {ours_ms:.3f} ms, {peer} {peer_ms:.3f} ms; {note}", flush=True)

    def sz(self, real, tiny):
        """A timing's shape: `real` on a GPU, `tiny` in the emulator's smoke run of the timings."""
        return tiny if self.smoke else real

    def sync(self):
        if self.on_gpu:
            torch.cuda.synchronize()

    def context_ok(self):
        """Whether the CUDA context still works after a step raised (an illegal address or a
        launch failure leaves it broken for the rest of the process)."""
        try:
            torch.cuda.synchronize()
            ok = torch.ones(4, device=self.dev).sum().item() == 4.0
            self.cp.cuda.Device().synchronize()
            return ok
        except Exception as e:
            print(f"the CUDA context is broken: {type(e).__name__}: {e}", flush=True)
            return False

    def time_ms(self, fn, reps=20):
        if not self.on_gpu:  # the emulator's smoke run: the code once, its time meaningless
            t = time.perf_counter()
            fn()
            return max((time.perf_counter() - t) * 1e3, 1e-3)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return float(np.median(times))

    def bf16(self, *shape, scale=1.0):
        return (torch.randn(*shape, device=self.dev) * scale).to(torch.bfloat16)

    # ------------------------------------------------------------------ ceilings
    def ceilings(self):
        n = self.sz(1 << 30, 1 << 16)  # 1 Gi floats = 4 GiB
        a = torch.randn(n // 4, device=self.dev).repeat(4)
        b = torch.empty_like(a)
        ms = self.time_ms(lambda: b.copy_(a), reps=10)
        self.copy_gbs = 2 * a.numel() * 4 / ms / 1e6
        del a, b
        m = self.sz(8192, 64)
        x, y = self.bf16(m, m), self.bf16(m, m)
        ms = self.time_ms(lambda: x @ y, reps=10)
        self.mm_tflops = 2 * m ** 3 / ms / 1e9
        print(f"ceilings: copy {self.copy_gbs:.0f} GB/s (read + write), bf16 matmul {self.mm_tflops:.0f} TFLOP/s", flush=True)

    # ------------------------------------------------------------------ checks
    def check_norm_rope_act(self):
        rows, cols = 512, 7168
        x, w = self.bf16(rows, cols), self.bf16(cols, scale=0.2) + 1
        out = torch.full((rows, cols), float("nan"), device=self.dev).to(torch.bfloat16)
        self.launch("rms_norm_bf16", (rows,), 256, [out, x, w, ("i", cols), ("f", 1e-6)])
        self.record("rms_norm_bf16 512x7168", rel_l2(out, ref_rms_norm(x, w, 1e-6)), BF16_BOUND)
        res = torch.randn(rows, cols, device=self.dev)
        res0 = res.clone()
        out.fill_(float("nan"))
        self.launch("fused_add_rms_norm_bf16", (rows,), 256, [out, res, x, w, ("i", cols), ("f", 1e-6)])
        summed = res0.double() + x.double()
        self.record("fused_add_rms_norm_bf16 residual", rel_l2(res, summed), F32_BOUND)
        self.record("fused_add_rms_norm_bf16 out", rel_l2(out, ref_rms_norm(summed, w, 1e-6)), BF16_BOUND)

        n, half = 256, 32
        pos = torch.randint(0, 163840, (n,), device=self.dev, dtype=torch.int32)
        inv = (1.0 / (10000 ** (torch.arange(0, 2 * half, 2, device=self.dev).float() / (2 * half)))).float()
        cos = torch.full((n, half), float("nan"), device=self.dev)
        sin = cos.clone()
        self.launch("rope_cos_sin_f32", ((n * half + 255) // 256,), 256, [cos, sin, pos, inv, ("i", n), ("i", half), ("f", 1.0253)])
        rc, rs = ref_cos_sin(pos, inv, 1.0253)
        self.record("rope_cos_sin_f32 (YaRN factor 1.0253)", max(rel_l2(cos, rc), rel_l2(sin, rs)), F32_BOUND)
        for heads, width, offset, inter, what in ((128, 192, 128, 1, "MLA q interleaved"), (64, 128, 0, 0, "indexer q half-split")):
            x = self.bf16(n, heads, width)
            ref = ref_rope(x, rc, rs, offset, 2 * half, inter)
            self.launch("rope_apply_bf16", (n, heads), 64, [x, cos, sin, ("i", half), ("l", heads * width), ("i", width), ("i", offset), ("i", inter)])
            self.record(f"rope_apply_bf16 {what}", rel_l2(x, ref), BF16_BOUND)

        rows, cols = 1024, 2048
        x = self.bf16(rows, 2 * cols)
        out = torch.full((rows, cols), float("nan"), device=self.dev).to(torch.bfloat16)
        self.launch("silu_and_mul_bf16", ((cols + 255) // 256, rows), 256, [out, x, ("i", cols)])
        self.record("silu_and_mul_bf16", rel_l2(out, ref_silu_and_mul(x)), BF16_BOUND)
        xf = x.float()
        out.fill_(float("nan"))
        self.launch("silu_and_mul_f32", ((cols + 255) // 256, rows), 256, [out, xf, ("i", cols)])
        self.record("silu_and_mul_f32", rel_l2(out, ref_silu_and_mul(xf)), BF16_BOUND)

    def check_engine_f32(self):
        """The engine CUDA backend's float32 kernels (engine.cu), each against float64."""
        d, nan = self.dev, float("nan")
        rows, cols = 300, 1000
        src = torch.randn(500, cols, device=d)
        slots = torch.randperm(500, device=d)[:rows].int()
        out = torch.full((rows, cols), nan, device=d)
        self.launch("gather_rows_f32", (rows,), 256, [out, src, slots, ("i", cols)])
        self.record_bool("gather_rows_f32", torch.equal(out, src[slots.long()]), "rows copied exactly")
        dst = torch.randn(500, cols, device=d)
        want = dst.clone()
        want[slots.long()] = out
        self.launch("scatter_rows_f32", (rows,), 256, [dst, out, slots, ("i", cols)])
        self.record_bool("scatter_rows_f32", torch.equal(dst, want), "rows written exactly, the others untouched")
        acc, wts = torch.randn(500, cols, device=d), torch.randn(rows, device=d)
        ref = acc.double().clone()
        ref[slots.long()] += wts.double()[:, None] * out.double()
        self.launch("scatter_add_rows_f32", (rows,), 256, [acc, out, slots, wts, ("i", cols)])
        self.record("scatter_add_rows_f32", rel_l2(acc, ref), F32_BOUND)
        table = self.bf16(500, cols)
        out.fill_(nan)
        self.launch("gather_rows_bf16_bits_f32", (rows,), 256, [out, table, slots, ("i", cols)])
        self.record_bool("gather_rows_bf16_bits_f32", torch.equal(out, table[slots.long()].float()),
                         "bf16 rows widened exactly")
        # A KV cache kept in bf16: rows rounded to nearest-even as written, the others untouched.
        kv, fresh = self.bf16(500, cols), torch.randn(rows, cols, device=d) * 100
        want = kv.clone()
        want[slots.long()] = fresh.to(torch.bfloat16)
        self.launch("scatter_rows_f32_to_bf16_bits", (rows,), 256, [kv, fresh, slots, ("i", cols)])
        self.record_bool("scatter_rows_f32_to_bf16_bits",
                         torch.equal(kv.view(torch.int16), want.view(torch.int16)),
                         "rows rounded as torch rounds to bf16, the others untouched")
        # A KV cache kept in fp8: per 128 values of a row a scale max(amax, 1e-4) / 448 (with
        # ue8m0 the power of two at or above it) and e4m3 codes of x / scale (torch's cast, after
        # the clamp the kernel saturates to); a 300-wide row has a partial last block, and an
        # all-zero row takes the scale's floor.
        fc = 300
        fresh = torch.randn(rows, fc, device=d) * torch.rand(rows, 1, device=d) * 50
        fresh[7] = 0
        nb = (fc + 127) // 128
        for ue8m0 in (0, 1):
            label = "scatter_rows_f32_to_fp8" + (" ue8m0" if ue8m0 else "")
            codes = torch.full((500, fc), 0x55, dtype=torch.uint8, device=d)
            scales = torch.full((500, nb), -1.0, device=d)
            want_c, want_s = codes.clone(), scales.clone()
            for b in range(nb):
                blk = fresh[:, 128 * b:128 * (b + 1)]
                sc = fp8_block_scale(blk.abs().amax(-1), ue8m0)
                want_s[slots.long(), b] = sc
                want_c[slots.long(), 128 * b:128 * (b + 1)] = (blk / sc[:, None]).clamp(-448.0, 448.0) \
                    .to(torch.float8_e4m3fn).view(torch.uint8)
            self.launch("scatter_rows_f32_to_fp8", (rows,), 256,
                        [codes, scales, fresh, slots, ("i", fc), ("i", ue8m0)])
            self.record_bool(label, torch.equal(codes, want_c) and torch.equal(scales, want_s),
                             "codes and scales bit-exact with torch's e4m3 cast; other slots untouched")
        back = torch.full((rows, fc), nan, device=d)
        self.launch("gather_rows_fp8_f32", (rows,), 256, [back, codes, scales, slots, ("i", fc)])
        ref = (want_c[slots.long()].view(torch.float8_e4m3fn).double()
               * want_s[slots.long()].double().repeat_interleave(128, 1)[:, :fc])
        self.record("gather_rows_fp8_f32", rel_l2(back, ref), F32_BOUND)
        # float32 -> bf16 bits, ties to even: against torch's rounding on random values, exact
        # ties, the edges of the range, infinities and NaN.
        x = torch.cat([torch.randn(100000, device=d) * 1e3,
                       torch.randn(1000, device=d).to(torch.bfloat16).float() * (1 + 2 ** -8),
                       torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3.3895e38, 3.4e38, -3.4e38, 1.0 + 2 ** -8,
                                     1.0 + 3 * 2 ** -8, math.inf, -math.inf, nan], device=d)])
        b = torch.zeros(x.numel(), dtype=torch.bfloat16, device=d)
        self.launch("f32_to_bf16_bits", ((x.numel() + 255) // 256,), 256, [b, x, ("l", x.numel())])
        want, nan_in = x.to(torch.bfloat16), torch.isnan(x)
        same = torch.equal(b[~nan_in].view(torch.int16), want[~nan_in].view(torch.int16))
        self.record_bool("f32_to_bf16_bits", same and bool(torch.isnan(b[nan_in]).all()),
                         "bit-exact with torch's round-to-nearest-even; NaN stays NaN")
        # fp8 e4m3 codes (all 256, NaNs included) times per-row block scales -> bf16 bits.
        fr, fc = 300, 1000
        codes = torch.randint(0, 256, (fr, fc), dtype=torch.uint8, device=d)
        codes[0, :256] = torch.arange(256, dtype=torch.uint8, device=d)
        row_scales = torch.rand(fr, (fc + 127) // 128, device=d) * 4
        deq = torch.zeros(fr, fc, dtype=torch.bfloat16, device=d)
        self.launch("fp8_dequant_bf16_bits", ((fr * fc + 255) // 256,), 256,
                    [deq, codes, row_scales, ("l", fr * fc), ("i", fc), ("i", row_scales.shape[1])])
        want = (codes.view(torch.float8_e4m3fn).float() * row_scales.repeat_interleave(128, 1)[:, :fc]).to(torch.bfloat16)
        nan_in = torch.isnan(want)
        same = torch.equal(deq[~nan_in].view(torch.int16), want[~nan_in].view(torch.int16))
        self.record_bool("fp8_dequant_bf16_bits", same and bool(torch.isnan(deq[nan_in]).all()),
                         "bit-exact with torch's float8_e4m3fn times the block scale, rounded to bf16")
        part = torch.full((rows, 100), nan, device=d)
        self.launch("copy_columns_f32", (rows,), 256, [part, src, ("i", cols), ("i", 37), ("i", 100)])
        self.record_bool("copy_columns_f32", torch.equal(part, src[:rows, 37:137]), "columns 37..137 exactly")

        x = torch.randn(rows, 7168, device=d)
        w, b = torch.randn(7168, device=d) * 0.2 + 1, torch.randn(7168, device=d)
        o = torch.full_like(x, nan)
        self.launch("rms_norm_f32", (rows,), 256, [o, x, w, ("i", 7168), ("f", 1e-6)])
        self.record("rms_norm_f32 300x7168", rel_l2(o, ref_rms_norm(x, w, 1e-6)), F32_BOUND)
        o.fill_(nan)
        self.launch("layer_norm_f32", (rows,), 256, [o, x, w, b, ("i", 7168), ("f", 1e-6)])
        xd = x.double()
        mu = xd.mean(-1, keepdim=True)
        ref = (xd - mu) / torch.sqrt(((xd - mu) ** 2).mean(-1, keepdim=True) + 1e-6) * w.double() + b.double()
        self.record("layer_norm_f32 300x7168", rel_l2(o, ref), F32_BOUND)
        y, x0 = torch.randn_like(x), x.double().clone()
        self.launch("add_f32", ((x.numel() + 255) // 256,), 256, [x, y, ("l", x.numel())])
        self.record("add_f32", rel_l2(x, x0 + y.double()), F32_BOUND)
        g = torch.randn(rows, 2048, device=d)
        u, g0 = torch.randn_like(g), g.double().clone()
        self.launch("silu_mul_f32", ((g.numel() + 255) // 256,), 256, [g, u, ("l", g.numel())])
        self.record("silu_mul_f32", rel_l2(g, g0 / (1 + torch.exp(-g0)) * u.double()), F32_BOUND)
        gb, ub = g0.to(torch.bfloat16), u.to(torch.bfloat16)
        hb = torch.full_like(gb, float("nan"))
        self.launch("silu_mul_bf16_bits", ((gb.numel() + 255) // 256,), 256, [hb, gb, ub, ("l", gb.numel())])
        ref = gb.double() / (1 + torch.exp(-gb.double())) * ub.double()
        self.record("silu_mul_bf16_bits", rel_l2(hb, ref), BF16_BOUND)
        # The grouped experts' combine: each row adds its pairs' weighted outputs, in list order.
        out_rows, pairs_n, cols = 40, 300, 700
        row_of = torch.randint(0, out_rows - 3, (pairs_n,), device=d)  # the last 3 rows get none
        order = torch.argsort(row_of, stable=True)
        counts = torch.bincount(row_of, minlength=out_rows)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=d), counts.cumsum(0)]).int()
        y, wts = torch.randn(pairs_n, cols, device=d), torch.randn(pairs_n, device=d)
        for name, yy in (("combine_rows_f32", y), ("combine_rows_bf16_bits_f32", y.to(torch.bfloat16))):
            acc = torch.randn(out_rows, cols, device=d)
            ref = acc.double().index_add(0, row_of, wts.double()[:, None] * yy.double())
            self.launch(name, (out_rows,), 256, [acc, yy, offsets, order.int(), wts, ("i", cols), ("i", 1)])
            self.record(f"{name} (rows with 0 to many pairs)", rel_l2(acc, ref), F32_BOUND)
            # accumulate 0: out set, not added to (poisoned first: never read; rows of no pair 0)
            acc = torch.full((out_rows, cols), float("nan"), device=d)
            ref = torch.zeros(out_rows, cols, dtype=torch.float64, device=d).index_add(0, row_of, wts.double()[:, None] * yy.double())
            self.launch(name, (out_rows,), 256, [acc, yy, offsets, order.int(), wts, ("i", cols), ("i", 0)])
            self.record(f"{name} (set, not added)", rel_l2(acc, ref), F32_BOUND)
            # an entry of -1 (a pair another expert shard computes) adds nothing; its row of y,
            # poisoned, is never read
            skip = torch.rand(pairs_n, device=d) < 0.3
            listed = torch.where(skip[order], -1, order).int()
            ys = yy.clone()
            ys[skip] = float("nan")
            acc = torch.randn(out_rows, cols, device=d)
            ref = acc.double().index_add(0, row_of[~skip], wts.double()[~skip, None] * yy.double()[~skip])
            self.launch(name, (out_rows,), 256, [acc, ys, offsets, listed, wts, ("i", cols), ("i", 1)])
            self.record(f"{name} (entries of -1 skipped)", rel_l2(acc, ref), F32_BOUND)

        n, half, heads, width, offset = 64, 32, 16, 192, 128
        angle = torch.rand(n, half, device=d) * 100
        cos, sin = torch.cos(angle), torch.sin(angle)
        for inter in (1, 0):
            xr = torch.randn(n, heads, width, device=d)
            ref = ref_rope(xr, cos.double(), sin.double(), offset, 2 * half, inter)
            self.launch("rope_f32", (n, heads), 64, [xr, cos, sin, ("i", heads * width), ("i", width), ("i", offset), ("i", half), ("i", inter)])
            self.record(f"rope_f32 {'interleaved' if inter else 'half-split'}", rel_l2(xr, ref), F32_BOUND)

        # the indexer's Hadamard rotation of each dim values (Sylvester's H / sqrt(dim)), in place
        for vectors, dim in ((64 * 65, 128), (3, 2048)):
            xh = torch.randn(vectors, dim, device=d)
            idx = torch.arange(dim, device=d)
            bits = torch.zeros(dim, dim, dtype=torch.int64, device=d)
            for b in range(dim.bit_length()):
                bits += ((idx[:, None] >> b) & (idx[None, :] >> b) & 1)
            h = (1 - 2 * (bits % 2)).double() / math.sqrt(dim)
            ref = xh.double() @ h
            self.launch("hadamard_f32", (vectors,), 64, [xh, ("i", dim), ("f", 1 / math.sqrt(dim))], smem=4 * dim)
            self.record(f"hadamard_f32 dim {dim}", rel_l2(xh, ref), F32_BOUND)

        # indexer scores (rows on grid x), masked to -inf past each row's visible keys, then top-k
        T, S, H, D, k = 24, 3000, 64, 128, 512
        q, keys = torch.randn(T, H, D, device=d), torch.randn(S, D, device=d)
        wi = torch.randn(T, H, device=d) * H ** -0.5
        vis = torch.randint(1, S + 1, (T,), dtype=torch.int32, device=d)
        vis[0], vis[1] = S, k
        scores = torch.full((T, S), nan, device=d)
        self.launch("indexer_scores_f32", (T, (S + 127) // 128), 128,
                    [scores, q, wi, keys, vis, ("i", S), ("i", H), ("i", D), ("f", D ** -0.5)], (H * D + H) * 4)
        ref = ref_indexer(q, keys, wi, torch.zeros(T, dtype=torch.int32), vis.cpu(), S, D ** -0.5)
        masked = ref == FLT_MIN
        self.record_bool("indexer_scores_f32 mask", bool((scores[masked] == -math.inf).all()), "entries past n_visible are -inf")
        self.record("indexer_scores_f32 24x3000 (64 heads x 128)", rel_l2(scores[~masked], ref[~masked]), F32_BOUND)
        top = torch.full((T, k), -7, dtype=torch.int32, device=d)
        self.launch("topk_rows_f32", (T,), 1024, [top, scores, vis, ("i", k), ("l", S)])
        bad = [r for r in range(T) if int(vis[r]) > k and not torch.equal(
            top[r].long(), ref[r, : int(vis[r])].topk(k).indices.sort().values)]
        self.record_bool("indexer_scores_f32 + topk_rows_f32", not bad, f"rows wrong: {bad[:8]}" if bad else "the float64 reference's top 512, ascending")

        # the same scores with the keys read in place from a KV store through block tables, a
        # batch of two sequences: rows 0..11 read `keys` through table A, rows 12..23 other keys
        # through table B (row_tables: where each row's table starts in `blocks`); key s of a
        # table is row table[s / 16] * 16 + s % 16 of a pool of 7000 rows (each table's last of
        # 188 blocks holds 8 keys): float32, bf16 bits, fp8 codes with a scale per 128
        pool, bs = 7000, 16
        nb = (S + bs - 1) // bs
        blocks = torch.randperm(pool // bs, device=d)[: 2 * nb].int()
        row_tables = torch.tensor([0] * (T // 2) + [nb] * (T - T // 2), dtype=torch.int32, device=d)
        key_start = torch.tensor([0] * (T // 2) + [S] * (T - T // 2), dtype=torch.int32)
        both = torch.cat([keys, torch.randn(S, D, device=d)])  # table A's keys, then B's
        ks = torch.arange(S, device=d)
        slots = torch.cat([blocks.long()[ks // bs] * bs + ks % bs, blocks.long()[nb + ks // bs] * bs + ks % bs])
        f32_store = torch.full((pool, D), nan, device=d)
        f32_store[slots] = both
        bf16_store = torch.full((pool, D), nan, device=d).to(torch.bfloat16)
        bf16_store[slots] = both.to(torch.bfloat16)
        def fp8_pool(ue8m0):
            """The keys as an fp8 pool keeps them (codes, a scale per row of D = 128 values) and
            widened back, and the queries rounded as DeepSeek's fp8 indexer rounds them over it:
            each head's as the pool rounds a key (the engine's fp8_row)."""
            sc = fp8_block_scale(both.abs().amax(-1), ue8m0)
            codes = torch.full((pool, D), 0x7F, dtype=torch.uint8, device=d)
            codes[slots] = (both / sc[:, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
            code_scales = torch.full((pool, 1), nan, device=d)
            code_scales[slots, 0] = sc
            q_sc = fp8_block_scale(q.abs().amax(-1, keepdim=True), ue8m0)
            q_fp8 = (q / q_sc).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).double() * q_sc.double()
            widened = codes[slots].view(torch.float8_e4m3fn).double() * sc.double()[:, None]
            return [codes, code_scales], widened, q_fp8

        for name, label, store, widened, q_ref, flag in (
                ("indexer_scores_store_f32", "", [f32_store], both, q, []),
                ("indexer_scores_store_bf16_bits", "", [bf16_store], both.to(torch.bfloat16), q, []),
                ("indexer_scores_store_fp8", "", *fp8_pool(0), [("i", 0)]),
                ("indexer_scores_store_fp8", " ue8m0", *fp8_pool(1), [("i", 1)])):
            scores = torch.full((T, S), nan, device=d)
            self.launch(name, (T, (S + 127) // 128), 128,
                        [scores, q, wi] + store + [blocks, row_tables, ("i", bs), vis, ("i", S), ("i", H), ("i", D),
                                                   ("f", D ** -0.5)] + flag,
                        (H * D + H) * 4)
            ref = ref_indexer(q_ref, widened, wi, key_start, vis.cpu(), S, D ** -0.5)
            masked = ref == FLT_MIN
            self.record(f"{name}{label} 24x3000 (64 heads x 128), two sequences' tables of blocks of 16",
                        rel_l2(scores[~masked], ref[~masked]),
                        F32_BOUND, "masked -inf" if bool((scores[masked] == -math.inf).all()) else "MASK WRONG")
            if not bool((scores[masked] == -math.inf).all()):
                self.record_bool(f"{name}{label} mask", False, "entries past n_visible are not -inf")
            # the same on the tensor cores (indexer_tc.cuh): q and the keys rounded to bf16, or
            # an fp8 pool's as e4m3 codes on the fp8 tensor cores
            tc = name.replace("indexer_scores_store_", "indexer_scores_tc_store_")
            fp8 = tc.endswith("fp8")
            scores = torch.full((T, S), nan, device=d)
            tiles = 2  # 47 tiles of keys: the last block takes one, and stops at the keys' end
            self.launch(tc, (T, (S + 64 * tiles - 1) // (64 * tiles)), 128,
                        [scores, q, wi] + store + [blocks, row_tables, ("i", bs), vis, ("i", S), ("i", H), ("i", D),
                                                   ("f", D ** -0.5), ("i", tiles)] + flag,
                        self.indexer_fp8_tc_smem(H, D) if fp8 else self.indexer_tc_smem(H, D))
            self.record(f"{tc}{label} 24x3000 (64 heads x 128, {tiles}-tile blocks), "
                        f"{'e4m3 products' if fp8 else 'bf16 roundings'}",
                        rel_l2(scores[~masked], ref[~masked]), FP8_TC_BOUND if fp8 else TC_BOUND,
                        "masked -inf" if bool((scores[masked] == -math.inf).all()) else "MASK WRONG")
            if not bool((scores[masked] == -math.inf).all()):
                self.record_bool(f"{tc}{label} mask", False, "entries past n_visible are not -inf")

        # absorbed attention in the latent space: per-row key lists with -1 entries, one empty row;
        # 20 heads, so the second block of 16 has 4 (a block takes a row and 16 heads: 256
        # threads, the queries and a tile of 32 widened keys in 108 KB of shared memory)
        R, H, L, P, nope = 12, 20, 512, 64, 128
        mla_grid, mla_smem = (R, (H + 15) // 16), (16 * (L + P) + 32 * (L + P + 1) + 32) * 4
        Sk = 5000
        latent, k_pe = torch.randn(Sk, L, device=d), torch.randn(Sk, P, device=d)
        q_lat = torch.randn(R, H, L, device=d) * 0.05
        q_full = torch.randn(R, H, nope + P, device=d) * 0.05
        lists = [torch.randperm(Sk, device=d)[: int(c)] for c in torch.randint(1, 2500, (R,))]
        lists[3] = torch.empty(0, dtype=torch.long, device=d)
        lists[4] = torch.cat([lists[4], torch.full((7,), -1, device=d, dtype=torch.long)])
        offsets = torch.tensor([0] + [len(x) for x in lists], device=d).cumsum(0).int()
        flat = torch.cat(lists).int()
        ctx = torch.full((R, H, L), nan, device=d)
        scale = 0.135234
        self.launch("mla_latent_attention_f32", mla_grid, 256,
                    [ctx, q_lat, q_full[:, :, nope:], latent, k_pe, flat, offsets, ("i", H), ("i", L), ("i", P),
                     ("i", H * (nope + P)), ("i", nope + P), ("f", scale), ("p", 0), ("i", 0)], mla_smem)
        q_cat = torch.cat([q_lat, q_full[:, :, nope:]], -1)
        kv = torch.cat([latent, k_pe], -1)
        ro, _ = ref_mla(q_cat, kv, [x[x >= 0] for x in lists], L, scale)
        self.record("mla_latent_attention_f32 (12 rows x 20 heads, lists up to 2500, -1 entries)", rel_l2(ctx, ro), F32_BOUND * 10)
        self.record_bool("mla_latent_attention_f32 empty row", bool((ctx[3] == 0).all()), "a row with no keys: context 0")

        # the same attention with the rows read in place from a paged pool's stores: key s of the
        # lists above is row where[s] of a pool of 7000 rows (NaN or 0x7F codes everywhere else),
        # bf16 bits, or latent rows as fp8 codes with a scale per 128 values and RoPE keys as bf16
        pool = 7000
        where = torch.randperm(pool, device=d)[:Sk]
        in_pool = torch.where(flat >= 0, where[flat.clamp_min(0).long()].int(), flat)

        def fp8_rows(x):
            groups = x.view(x.shape[0], -1, 128)
            sc = divided(groups.abs().amax(-1).clamp_min(1e-4), 448.0)
            codes = (groups / sc[..., None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
            return codes.view(torch.uint8).reshape(x.shape), sc, (codes.double() * sc.double()[..., None]).reshape(x.shape)

        def scattered(rows, fill):
            out = torch.full((pool,) + tuple(rows.shape[1:]), fill, dtype=rows.dtype, device=d)
            out[where] = rows
            return out

        lat_codes, lat_sc, lat_wide = fp8_rows(latent)
        for name, stores, wide in (
                ("mla_latent_attention_bf16_bits",
                 [scattered(latent.to(torch.bfloat16), nan), scattered(k_pe.to(torch.bfloat16), nan)],
                 (latent.to(torch.bfloat16), k_pe.to(torch.bfloat16))),
                ("mla_latent_attention_fp8",
                 [scattered(lat_codes, 0x7F), scattered(lat_sc, nan), scattered(k_pe.to(torch.bfloat16), nan)],
                 (lat_wide, k_pe.to(torch.bfloat16)))):
            ctx = torch.full((R, H, L), nan, device=d)
            self.launch(name, mla_grid, 256,
                        [ctx, q_lat, q_full[:, :, nope:]] + stores + [in_pool, offsets, ("i", H), ("i", L), ("i", P),
                         ("i", H * (nope + P)), ("i", nope + P), ("f", scale), ("p", 0), ("i", 0)], mla_smem)
            ro, _ = ref_mla(q_cat, torch.cat([wide[0].double(), wide[1].double()], -1), [x[x >= 0] for x in lists], L, scale)
            self.record(f"{name} (12 rows x 20 heads, rows at scattered pool slots)", rel_l2(ctx, ro), F32_BOUND * 10,
                        "empty row 0" if bool((ctx[3] == 0).all()) else "EMPTY ROW NOT 0")
            if not bool((ctx[3] == 0).all()):
                self.record_bool(f"{name} empty row", False, "a row with no keys: context not 0")

        # the same three on the tensor cores (mla_tc.cuh through engine.cu): queries, keys and
        # probabilities rounded to bf16, sums in float32; bf16 rows in shared memory; blocks of 1,
        # 2 and 4 groups of 16 heads (128 threads a group), one per kernel: 20 heads are 2 blocks,
        # 1 block, 1 block with 44 empty heads
        for groups, (name, stores, wide) in zip((1, 2, 4), (
                ("mla_latent_attention_tc_f32", [latent, k_pe], (latent, k_pe)),
                ("mla_latent_attention_tc_bf16_bits",
                 [scattered(latent.to(torch.bfloat16), nan), scattered(k_pe.to(torch.bfloat16), nan)],
                 (latent.to(torch.bfloat16), k_pe.to(torch.bfloat16))),
                ("mla_latent_attention_tc_fp8",
                 [scattered(lat_codes, 0x7F), scattered(lat_sc, nan), scattered(k_pe.to(torch.bfloat16), nan)],
                 (lat_wide, k_pe.to(torch.bfloat16))))):
            ctx = torch.full((R, H, L), nan, device=d)
            keys = flat if name.endswith("_f32") else in_pool
            self.launch(name, (R, (H + 16 * groups - 1) // (16 * groups)), 128 * groups,
                        [ctx, q_lat, q_full[:, :, nope:]] + stores + [keys, offsets, ("i", H), ("i", L), ("i", P),
                         ("i", H * (nope + P)), ("i", nope + P), ("f", scale), ("p", 0), ("i", 0)], self.mla_tc_smem(L, P, groups))
            ro, _ = ref_mla(q_cat, torch.cat([wide[0].double(), wide[1].double()], -1), [x[x >= 0] for x in lists], L, scale)
            self.record(f"{name} (12 rows x 20 heads, {groups} group(s) a block, bf16 roundings)", rel_l2(ctx, ro), TC_BOUND,
                        "empty row 0" if bool((ctx[3] == 0).all()) else "EMPTY ROW NOT 0")
            if not bool((ctx[3] == 0).all()):
                self.record_bool(f"{name} empty row", False, "a row with no keys: context not 0")

        # split keys (flash decoding): each row's list in 4 parts of whole 32-key tiles (the
        # empty row's parts all empty, short lists' later parts empty), each part's context and
        # log-sum-exp from its own blocks (grid z), then mla_combine_splits_f32 weighs them
        longest = int((offsets[1:] - offsets[:-1]).max())
        split_keys = (longest + 3) // 4
        split_keys = (split_keys + 31) // 32 * 32
        splits = (longest + split_keys - 1) // split_keys
        ro, _ = ref_mla(q_cat, kv, [x[x >= 0] for x in lists], L, scale)
        for name, block, hb, smem in (("mla_latent_attention_f32", 256, (H + 15) // 16, mla_smem),
                                      ("mla_latent_attention_tc_f32", 128, (H + 15) // 16, self.mla_tc_smem(L, P, 1))):
            partial = torch.full((splits, R, H, L), nan, device=d)
            lse = torch.full((splits, R, H), nan, device=d)
            self.launch(name, (R, hb, splits), block,
                        [partial, q_lat, q_full[:, :, nope:], latent, k_pe, flat, offsets, ("i", H), ("i", L), ("i", P),
                         ("i", H * (nope + P)), ("i", nope + P), ("f", scale), lse, ("i", split_keys)], smem)
            ctx = torch.full((R, H, L), nan, device=d)
            self.launch("mla_combine_splits_f32", (R, H), 128, [ctx, partial, lse, ("i", splits), ("i", H), ("i", L)])
            bound = TC_BOUND if "_tc_" in name else F32_BOUND * 10
            empty = bool((ctx[3] == 0).all())
            self.record(f"{name} + mla_combine_splits_f32 (keys in {splits} splits of {split_keys})", rel_l2(ctx, ro),
                        bound, "empty row 0" if empty else "EMPTY ROW NOT 0")
            if not empty:
                self.record_bool(f"{name} split empty row", False, "a row with no keys: context not 0")

    def time_engine_attention(self):
        """The engine's attention at the issue's decode shape over a bf16 pool read in place (B 64,
        128 heads, 512 + 64, top-k 2048 of 64K), float32 SIMT vs tensor cores."""
        d, L, P, scale = self.dev, 512, 64, 0.135234
        B, Hd, ctx_len, k = self.sz((64, 128, 65536, 2048), (2, 32, 1024, 256))
        pool_lat = torch.randn(B * ctx_len, L, device=d).to(torch.bfloat16)
        pool_pe = torch.randn(B * ctx_len, P, device=d).to(torch.bfloat16)
        q_lat = torch.randn(B, Hd, L, device=d) * 0.05
        q_pe = torch.randn(B, Hd, P, device=d) * 0.05
        keys = (torch.randint(0, ctx_len, (B, k), device=d) + torch.arange(B, device=d)[:, None] * ctx_len).int().flatten()
        offsets = (torch.arange(B + 1, device=d) * k).int()
        ctx = torch.empty(B, Hd, L, device=d)
        grid = (B, Hd // 16)
        args = [ctx, q_lat, q_pe, pool_lat, pool_pe, keys, offsets, ("i", Hd), ("i", L), ("i", P),
                ("i", Hd * P), ("i", P), ("f", scale), ("p", 0), ("i", 0)]
        t_simt = self.time_ms(lambda: self.launch("mla_latent_attention_bf16_bits", grid, 256, args,
                                                  (16 * (L + P) + 32 * (L + P + 1) + 32) * 4))
        bytes_ = B * k * (L + P) * 2
        t_one = None
        for groups in (1, 2, 4):  # heads a block: 16, 32, 64 (launch::mla_tc_groups picks)
            t_tc = self.time_ms(lambda: self.launch("mla_latent_attention_tc_bf16_bits",
                                                    (B, (Hd + 16 * groups - 1) // (16 * groups)),
                                                    128 * groups, args, self.mla_tc_smem(L, P, groups)))
            t_one = t_one or t_tc
            self.add_timing(f"engine attention (bf16 pool in place) B=64, 128 heads, top-k 2048, tensor cores, "
                                 f"{16 * groups} heads a block", t_tc,
                                 "the engine's float32 SIMT kernel", t_simt,
                                 f"{t_simt / t_tc:.1f}x the SIMT kernel; {t_one / t_tc:.2f}x 16 heads a block; "
                                 f"{bytes_ / t_tc / 1e6:.0f} GB/s of picked rows = "
                                 f"{100 * bytes_ / t_tc / 1e6 / self.copy_gbs:.0f}% of copy")

        # one decode row (a single long request): 8 blocks of 16 heads leave most of the
        # multiprocessors idle; split keys as launch::mla_split_keys picks for this device
        # (one block a multiprocessor, parts of >= 256 keys), then the combine
        for n_keys in (k, ctx_len):
            keys1 = torch.randint(0, ctx_len, (n_keys,), device=d).int()
            offsets1 = torch.tensor([0, n_keys], dtype=torch.int32, device=d)
            ctx1 = torch.empty(1, Hd, L, device=d)
            base = [q_lat[:1], q_pe[:1], pool_lat, pool_pe, keys1, offsets1, ("i", Hd), ("i", L), ("i", P),
                    ("i", Hd * P), ("i", P), ("f", scale)]
            smem1 = self.mla_tc_smem(L, P, 1)
            t_whole = self.time_ms(lambda: self.launch("mla_latent_attention_tc_bf16_bits", (1, Hd // 16), 128,
                                                       [ctx1] + base + [("p", 0), ("i", 0)], smem1))
            parts = max(1, min((self.sms + Hd // 16 - 1) // (Hd // 16), n_keys // 256, 32))
            per = ((n_keys + parts - 1) // parts + 31) // 32 * 32
            parts = (n_keys + per - 1) // per
            partial = torch.empty(parts, 1, Hd, L, device=d)
            lse = torch.empty(parts, 1, Hd, device=d)

            def split_run():
                self.launch("mla_latent_attention_tc_bf16_bits", (1, Hd // 16, parts), 128,
                            [partial] + base + [lse, ("i", per)], smem1)
                self.launch("mla_combine_splits_f32", (1, Hd), 128, [ctx1, partial, lse, ("i", parts), ("i", Hd), ("i", L)])
            t_split = self.time_ms(split_run)
            self.add_timing(f"engine attention (bf16 pool in place) one decode row, 128 heads, {n_keys} keys, "
                                 f"tensor cores, keys in {parts} splits + combine", t_split,
                                 "the same keys unsplit (8 blocks)", t_whole,
                                 f"{t_whole / t_split:.1f}x unsplit; "
                                 f"{n_keys * (L + P) * 2 / t_split / 1e6:.0f} GB/s of picked rows")

    def indexer_launch(self, scores, q, keys, w, start, vis, n_keys, heads, dim):
        smem = heads * dim * 2 + INDEXER_KEYS * (dim + 2) * 2 + INDEXER_KEYS * 4
        self.launch("indexer_scores_bf16", ((n_keys + INDEXER_KEYS - 1) // INDEXER_KEYS, q.shape[0]), 2 * INDEXER_KEYS,
                    [scores, q, keys, w, start, vis, ("i", n_keys), ("i", heads), ("i", dim), ("f", dim ** -0.5), ("l", scores.shape[1])], smem)

    @staticmethod
    def indexer_tc_smem(heads, dim):
        """Dynamic shared memory of indexer_tc.cuh (launch::indexer_tc_smem_bytes)."""
        rows = (heads + 15) // 16 * 16
        return (rows + 64) * ((dim + 15) // 16 * 16 + 8) * 2 + rows * 4 + 4 * 64 * 4

    @staticmethod
    def indexer_fp8_tc_smem(heads, dim):
        """Dynamic shared memory of the fp8 tensor-core indexer (launch::indexer_fp8_tc_smem_bytes)."""
        rows = (heads + 15) // 16 * 16
        return (rows + 64) * ((dim + 31) // 32 * 32 + 16) + rows * 4 + 64 * 4 + 4 * 64 * 4

    def indexer_fp8_tc_launch(self, scores, q8, qs, k8, ks, w, start, vis, n_keys, heads, dim, widened=False, tiles=1):
        self.launch("indexer_scores_fp8_tc_widened" if widened else "indexer_scores_fp8_tc",
                    ((n_keys + 64 * tiles - 1) // (64 * tiles), scores.shape[0]), 128,
                    [scores, q8, qs, k8, ks, w, start, vis, ("i", n_keys), ("i", heads), ("i", dim), ("f", dim ** -0.5),
                     ("l", scores.shape[1]), ("i", tiles)], self.indexer_fp8_tc_smem(heads, dim))

    def indexer_tc_launch(self, scores, q, keys, w, start, vis, n_keys, heads, dim, tiles=1):
        """indexer_scores_bf16_tc, `tiles` tiles of 64 keys a block (its query staged once for them)."""
        smem = self.indexer_tc_smem(heads, dim)
        self.launch("indexer_scores_bf16_tc", ((n_keys + 64 * tiles - 1) // (64 * tiles), q.shape[0]), 128,
                    [scores, q, keys, w, start, vis, ("i", n_keys), ("i", heads), ("i", dim), ("f", dim ** -0.5),
                     ("l", scores.shape[1]), ("i", tiles)], smem)

    def topk_split_launch(self, out, x, nv, k, n, parts, cands=None):
        """Each row's top k as the engine takes it for few long rows: the top k of each of
        `parts` parts (topk_parts_f32), then of their candidates (topk_merge_f32). Parts of
        whole 32-score chunks, at least k long (launch::topk_split). The candidates' buffers
        are `cands` (for timing) or fresh ones filled with -7 and NaN."""
        part_len = -(-(-(-n // parts)) // 32) * 32
        parts = -(-n // part_len)
        assert parts > 1 and part_len >= k, (parts, part_len, k)
        rows = x.shape[0]
        cand_idx, cand_scores = cands or (
            torch.full((rows, parts * k), -7, dtype=torch.int32, device=self.dev),
            torch.full((rows, parts * k), float("nan"), device=self.dev))
        self.launch("topk_parts_f32", (rows, parts), 1024,
                    [cand_idx, cand_scores, x, nv, ("i", k), ("l", x.stride(0)), ("i", part_len)])
        self.launch("topk_merge_f32", (rows,), 1024,
                    [out, cand_idx, cand_scores, nv, ("i", k), ("i", part_len), ("i", parts)])
        return parts

    def time_topk_as_the_engine(self, idx, scores, vis, k):
        """Milliseconds of the top-k as the engine runs it for these rows (split into parts
        while a block a row would leave SMs idle: 2 parts for 64 rows of 64K on 132 SMs), and
        its parts a row."""
        rows, n = scores.shape
        parts = topk_parts(rows, n, k, self.sms)
        if parts < 2:
            return self.time_ms(lambda: self.launch("topk_rows_f32", (rows,), 1024,
                                                    [idx, scores, vis, ("i", k), ("l", n)])), 1
        cands = (torch.empty(rows, parts * k, dtype=torch.int32, device=self.dev),
                 torch.empty(rows, parts * k, device=self.dev))
        return self.time_ms(lambda: self.topk_split_launch(idx, scores, vis, k, n, parts, cands)), parts

    def check_indexer_topk(self):
        T, S, H, D = 32, 4096, 64, 128
        q, keys = self.bf16(T, H, D), self.bf16(S, D)
        w = torch.randn(T, H, device=self.dev) * H ** -0.5
        start = torch.zeros(T, dtype=torch.int32, device=self.dev)
        vis = torch.randint(1, S + 1, (T,), dtype=torch.int32, device=self.dev)
        vis[0], vis[1], vis[2] = 1, S, 63
        scores = torch.full((T, S), float("nan"), device=self.dev)
        self.indexer_launch(scores, q, keys, w, start, vis, S, H, D)
        ref = ref_indexer(q, keys, w, start.cpu(), vis.cpu(), S, D ** -0.5)
        masked = ref == FLT_MIN
        self.record_bool("indexer_scores_bf16 mask", bool((scores[masked] == FLT_MIN).all()) and not scores.isnan().any(),
                         "masked entries are float32 min, none unwritten")
        self.record("indexer_scores_bf16 32x4096 (64 heads x 128)", rel_l2(scores[~masked], ref[~masked]), F32_BOUND)
        # the tensor-core kernel on the same inputs, then with 24 heads (a half-empty second
        # 16-row tile) and keys starting at each row's own offset, 3 tiles of keys a block (64
        # tiles: the last block takes one)
        for heads, offset, tiles in ((H, 0, 1), (24, 17, 3)):
            qh, wh = q[:, :heads].contiguous(), w[:, :heads].contiguous()
            st = torch.full((T,), offset, dtype=torch.int32, device=self.dev)
            n = S - offset
            scores = torch.full((T, n), float("nan"), device=self.dev)
            vis_n = vis.clamp(max=n)
            self.indexer_tc_launch(scores, qh, keys, wh, st, vis_n, n, heads, D, tiles)
            ref = ref_indexer(qh, keys, wh, st.cpu(), vis_n.cpu(), n, D ** -0.5)
            masked = ref == FLT_MIN
            mask_ok = bool((scores[masked] == FLT_MIN).all()) and not scores.isnan().any()
            self.record(f"indexer_scores_bf16_tc 32x{n} ({heads} heads x 128, keys from {offset}, "
                        f"{tiles}-tile blocks)",
                        rel_l2(scores[~masked], ref[~masked]), F32_BOUND,
                        "mask ok" if mask_ok else "MASK WRONG or entries unwritten")
            if not mask_ok:
                self.record_bool(f"indexer_scores_bf16_tc mask ({heads} heads)", False, "masked entries not float32 min, or unwritten")

        # top-k over long rows, with short rows (n_valid <= k) and k = row length exactly
        rows, n, k = 48, 131072, 2048
        x = torch.randn(rows, n, device=self.dev)
        nv = torch.full((rows,), n, dtype=torch.int32, device=self.dev)
        nv[0], nv[1], nv[2], nv[3] = 5, k, k + 1, 70000
        out = torch.full((rows, k), -7, dtype=torch.int32, device=self.dev)
        self.launch("topk_rows_f32", (rows,), 1024, [out, x, nv, ("i", k), ("l", n)])
        bad = []
        for r in range(rows):
            v = int(nv[r])
            got = out[r].long()
            if v <= k:
                want = torch.cat([torch.arange(v, device=self.dev), torch.full((k - v,), -1, device=self.dev)])
                if not torch.equal(got, want):
                    bad.append(r)
                continue
            # ascending, so distinct too
            if (got < 0).any() or (got >= v).any() or not bool((got[1:] > got[:-1]).all()):
                bad.append(r)
                continue
            if not torch.equal(x[r, got].sort().values, x[r, :v].topk(k).values.sort().values):
                bad.append(r)
        self.record_bool("topk_rows_f32 131072 keys, k=2048", not bad, f"rows wrong: {bad[:8]}" if bad else "same value sets as torch.topk, indices ascending; short rows padded with -1")
        # the same rows split into parts (row 3's 70000 end inside the fifth of 8 parts; the
        # short rows' candidates lie all in the first): exactly the picks of a block a row
        for parts in (8, 3):
            split = torch.full((rows, k), -7, dtype=torch.int32, device=self.dev)
            self.topk_split_launch(split, x, nv, k, n, parts)
            wrong = [r for r in range(rows) if not torch.equal(split[r], out[r])]
            self.record_bool(f"topk_parts_f32 + topk_merge_f32, {parts} parts, 131072 keys, k=2048", not wrong,
                             f"rows differ from topk_rows_f32: {wrong[:8]}" if wrong else "the same picks as topk_rows_f32, every row")

        # ties at the k-th value go to the lowest indices (the engine's rule): a row of few
        # distinct values, a row all equal, two rows of zeros with 1,000 twos and 3,000 (6,000)
        # ones at random places, so the winners above the k-th value lie all along the row and
        # only the first 1,048 of its ties win, and normal scores on a grid of 1/32 (about 160
        # copies of each value near the k-th). Rows 2 and 4 have at most 4096 entries at or
        # above the k-th's first 16 bits, which the kernel collects into shared memory; the
        # others take five passes over the row
        rows_t, collect = 5, (2, 4)
        x = torch.randint(0, 4, (rows_t, n), device=self.dev).float()
        x[1] = 1.0
        for r, ones in ((2, 3000), (3, 6000)):
            places = torch.randperm(n, device=self.dev)
            x[r] = 0.0
            x[r, places[:1000]] = 2.0
            x[r, places[1000:1000 + ones]] = 1.0
        x[4] = torch.round(torch.randn(n, device=self.dev) * 32) / 32
        out = torch.full((rows_t, k), -7, dtype=torch.int32, device=self.dev)
        nv = torch.full((rows_t,), n, dtype=torch.int32, device=self.dev)
        self.launch("topk_rows_f32", (rows_t,), 1024, [out, x, nv, ("i", k), ("l", n)])
        bad = []
        for r in range(rows_t):
            # the reference: stable sort by value descending, so equal values keep index order
            want = torch.sort(-x[r], stable=True).indices[:k].sort().values
            if not torch.equal(out[r].long(), want):
                bad.append(r)
        collected = [topk_collected(x[r], k) for r in range(rows_t)]
        paths_ok = all((c <= 4096) == (r in collect) for r, c in enumerate(collected))
        self.record_bool("topk_rows_f32 ties, k=2048", not bad and paths_ok,
                         f"rows wrong: {bad}" if bad else
                         f"tied entries: the lowest indices, as the engine; entries at or above the k-th's first "
                         f"16 bits {collected} (the kernel collects at most 4096)"
                         + ("" if paths_ok else f": NOT the cases meant (rows {collect} within 4096, the others past)"))
        # and split: the tied winners of the first rows lie in the first part; the third
        # row's in all of them
        for parts in (5, 16):
            out = torch.full((rows_t, k), -7, dtype=torch.int32, device=self.dev)
            self.topk_split_launch(out, x, nv, k, n, parts)
            bad = [r for r in range(rows_t)
                   if not torch.equal(out[r].long(), torch.sort(-x[r], stable=True).indices[:k].sort().values)]
            self.record_bool(f"topk_parts_f32 + topk_merge_f32 ties, {parts} parts, k=2048", not bad,
                             f"rows wrong: {bad}" if bad else "tied entries: the lowest indices, as the engine")

        # the picks kept on the device become pool rows through each row's block table
        # (picks_to_pool_rows): 6 rows of 3 sequences (tables of scattered distinct blocks of 64
        # tokens, one after another in one array), -1s kept
        bs, width, rows_n = 64, 512, 6
        tokens = [20000, 9000, 700]
        blocks = torch.randperm(sum(-(-t // bs) for t in tokens) + 40, device=self.dev)
        tables, starts, at = [], [], 0
        for t in tokens:
            used = -(-t // bs)
            starts.append(at)
            tables.append(blocks[at:at + used])
            at += used
        owner = [0, 0, 1, 2, 1, 2]
        picks = torch.full((rows_n, width), -1, dtype=torch.int32, device=self.dev)
        for r, s in enumerate(owner):
            m = min(width, tokens[s]) - r  # rows with fewer picks than the width: -1 after
            picks[r, :m] = torch.randperm(tokens[s], device=self.dev)[:m].sort().values.int()
        table_d = blocks[:at].int().contiguous()
        row_tables = torch.tensor([starts[s] for s in owner], dtype=torch.int32, device=self.dev)
        want = picks.long().clone()
        for r, s in enumerate(owner):
            valid = want[r] >= 0
            t = want[r, valid]
            want[r, valid] = tables[s][t // bs].long() * bs + t % bs
        got = picks.clone()
        n = rows_n * width
        self.launch("picks_to_pool_rows", (-(-n // 256),), 256,
                    [got, table_d, row_tables, ("i", bs), ("i", width), ("l", n)])
        self.record_bool("picks_to_pool_rows 6x512 (3 tables)", torch.equal(got.long(), want),
                         "each pick the pool row of its token; -1 kept" if torch.equal(got.long(), want) else "rows differ")

    def time_indexer_topk(self):
        """Indexer scores + top-k at batch 64 decode, 64K context, each sequence its own keys."""
        H, D = 64, 128
        B, ctx, k = self.sz((64, 65536, 2048), (2, 1024, 64))
        keys = self.bf16(B * ctx, D)
        q, w = self.bf16(B, H, D), torch.randn(B, H, device=self.dev) * H ** -0.5
        start = (torch.arange(B, device=self.dev) * ctx).int()
        vis = torch.full((B,), ctx, dtype=torch.int32, device=self.dev)
        scores = torch.empty(B, ctx, device=self.dev)
        idx = torch.empty(B, k, dtype=torch.int32, device=self.dev)
        t_idx = self.time_ms(lambda: self.indexer_launch(scores, q, keys, w, start, vis, ctx, H, D))
        t_tc = self.time_ms(lambda: self.indexer_tc_launch(scores, q, keys, w, start, vis, ctx, H, D))
        t_topk, parts = self.time_topk_as_the_engine(idx, scores, vis, k)
        kb = keys.view(B, ctx, D)
        peer = lambda: (torch.relu(torch.bmm(q, kb.transpose(1, 2)).float() * D ** -0.5) * w[:, :, None]).sum(1).topk(k, -1)
        t_peer = self.time_ms(peer, reps=10)
        bytes_ = keys.numel() * 2 + scores.numel() * 4 * 2  # keys once, scores written then read by top-k
        self.add_timing("indexer scores + top-k, B=64, ctx 64K, 64x128 heads, k=2048", t_idx + t_topk,
                             "torch bmm+relu+sum+topk", t_peer,
                             f"scores {t_idx:.3f} ms, top-k {t_topk:.3f} ms ({parts} parts a row); "
                             f"{bytes_ / (t_idx + t_topk) / 1e6:.0f} GB/s = "
                             f"{100 * bytes_ / (t_idx + t_topk) / 1e6 / self.copy_gbs:.0f}% of copy (goal 50%)")
        self.add_timing("indexer scores on tensor cores + top-k, same shape", t_tc + t_topk,
                             "torch bmm+relu+sum+topk", t_peer,
                             f"scores {t_tc:.3f} ms ({t_idx / t_tc:.1f}x the SIMT kernel), top-k {t_topk:.3f} ms; "
                             f"{bytes_ / (t_tc + t_topk) / 1e6:.0f} GB/s = "
                             f"{100 * bytes_ / (t_tc + t_topk) / 1e6 / self.copy_gbs:.0f}% of copy (goal 50%)")
        t_torch_topk = self.time_ms(lambda: scores.topk(k, -1))
        t_rows = self.time_ms(lambda: self.launch("topk_rows_f32", (B,), 1024, [idx, scores, vis, ("i", k), ("l", ctx)]))
        self.add_timing("topk_rows_f32 alone, 64 rows x 64K scores, k=2048", t_rows,
                             "torch.topk on the same scores", t_torch_topk,
                             f"{scores.numel() * 4 / t_rows / 1e6:.0f} GB/s of scores (read 3 times: 2 digit "
                             f"passes and the collection); {t_torch_topk / t_rows:.2f}x torch.topk")
        # Few rows leave multiprocessors idle a block a row: the engine splits them
        # (launch::topk_parts: 2 parts for 64 rows on 132 SMs, 5 for 8 rows at 64K, k = 2048).
        for rows_t in self.sz((64, 8), (2, 1)):
            sub, ids = scores[:rows_t], idx[:rows_t]
            t_split, parts = self.time_topk_as_the_engine(ids, sub, vis, k)
            if parts < 2:
                continue
            t_one = self.time_ms(lambda: self.launch("topk_rows_f32", (rows_t,), 1024,
                                                     [ids, sub, vis, ("i", k), ("l", ctx)]))
            t_torch = self.time_ms(lambda: sub.topk(k, -1))
            self.add_timing(f"top-k split into {parts} parts, {rows_t} rows x 64K scores, k=2048", t_split,
                                 "topk_rows_f32, a block a row", t_one,
                                 f"{t_one / t_split:.2f}x a block a row, {t_torch / t_split:.2f}x torch.topk "
                                 f"({t_torch:.3f} ms)")
        # Key tiles a block: 8 (what launch::indexer_tc_tiles picks at this shape on 132 SMs)
        # stage each row's query an eighth as often as 1. The engine's kernel reads float32
        # queries (32 KB a row against 16 KB of bf16 keys a tile), through a table of one block
        # a sequence over the same keys.
        t_tc8 = self.time_ms(lambda: self.indexer_tc_launch(scores, q, keys, w, start, vis, ctx, H, D, tiles=8))
        self.add_timing("indexer scores on tensor cores, 8 key tiles a block, same shape", t_tc8,
                             "the same kernel, 1 tile a block", t_tc, f"{t_tc / t_tc8:.2f}x 1 tile a block")
        q32 = q.float().reshape(B, H * D)
        seq_blocks = torch.arange(B, dtype=torch.int32, device=self.dev)
        engine_tc = lambda tiles: self.launch(
            "indexer_scores_tc_store_bf16_bits", (B, (ctx + 64 * tiles - 1) // (64 * tiles)), 128,
            [scores, q32, w, keys, seq_blocks, seq_blocks, ("i", ctx), vis, ("i", ctx), ("i", H), ("i", D),
             ("f", D ** -0.5), ("i", tiles)], self.indexer_tc_smem(H, D))
        t_eng1 = self.time_ms(lambda: engine_tc(1))
        t_eng8 = self.time_ms(lambda: engine_tc(8))
        self.add_timing("engine indexer scores (float32 queries, bf16 pool in place), tensor cores, "
                             "8 key tiles a block, same shape", t_eng8, "the same kernel, 1 tile a block", t_eng1,
                             f"{t_eng1 / t_eng8:.2f}x 1 tile a block; {keys.numel() * 2 / t_eng8 / 1e6:.0f} GB/s of keys")

    def indexer_fp8_launch(self, scores, q8, qs, k8, ks, w, start, vis, n_keys, heads, dim):
        smem = heads * dim + heads * 4 + INDEXER_KEYS * (dim + 4) + INDEXER_KEYS * 4
        # One grid row per query: q8 holds a row per (query, head).
        self.launch("indexer_scores_fp8", ((n_keys + INDEXER_KEYS - 1) // INDEXER_KEYS, scores.shape[0]), 2 * INDEXER_KEYS,
                    [scores, q8, qs, k8, ks, w, start, vis, ("i", n_keys), ("i", heads), ("i", dim), ("f", dim ** -0.5),
                     ("l", scores.shape[1])], smem)

    def quant_fp8(self, x, pow2):
        rows, dim = x.numel() // x.shape[-1], x.shape[-1]
        codes = torch.full((rows, dim), 0x7F, dtype=torch.uint8, device=self.dev)
        scales = torch.full((rows,), float("nan"), device=self.dev)
        self.launch("indexer_quant_fp8", (rows,), 128, [codes, scales, x, ("i", dim), ("i", int(pow2))])
        return codes, scales

    def check_indexer_fp8(self):
        """DeepSeek's FP8 indexer: per-row e4m3 quantisation bit for bit, scores from the codes
        against float64, and how much of the bf16 top-k the fp8 scores keep."""
        T, S, H, D = 32, 4096, 64, 128
        q, keys = self.bf16(T, H, D), self.bf16(S, D, scale=3.0)
        keys[5] = 0  # an all-zero key: the 1e-4 floor of the scale
        for pow2 in (False, True):
            codes, scales = self.quant_fp8(keys, pow2)
            want_c, want_s = ref_quant_fp8(keys, pow2)
            same = torch.equal(codes, want_c) and torch.equal(scales, want_s)
            self.record_bool(f"indexer_quant_fp8 4096x128{' pow2 scales' if pow2 else ''}", same,
                             "codes and scales bit-exact with torch's e4m3 cast of x / (amax / 448)")
        k8, ks = self.quant_fp8(keys, False)
        q8, qs = self.quant_fp8(q.view(T * H, D), False)
        w = torch.randn(T, H, device=self.dev) * H ** -0.5
        start = torch.zeros(T, dtype=torch.int32, device=self.dev)
        vis = torch.randint(1, S + 1, (T,), dtype=torch.int32, device=self.dev)
        vis[0], vis[1], vis[2] = 1, S, 63
        scores = torch.full((T, S), float("nan"), device=self.dev)
        self.indexer_fp8_launch(scores, q8, qs, k8, ks, w, start, vis, S, H, D)
        q_deq = ref_fp8_rows(q8, qs).view(T, H, D)
        ref = ref_indexer(q_deq, ref_fp8_rows(k8, ks), w, start.cpu(), vis.cpu(), S, D ** -0.5)
        masked = ref == FLT_MIN
        self.record_bool("indexer_scores_fp8 mask", bool((scores[masked] == FLT_MIN).all()) and not scores.isnan().any(),
                         "masked entries are float32 min, none unwritten")
        self.record("indexer_scores_fp8 32x4096 (64 heads x 128)", rel_l2(scores[~masked], ref[~masked]), F32_BOUND)
        # the same codes on the fp8 tensor cores (mma.sync m16n8k32 e4m3), and widened to bf16
        # (sm_80's path); 20 heads of 24 (a partial tile of heads, a row of one 32-wide step
        # padded) with keys from row 100 too
        for widened in (False, True):
            name = "indexer_scores_fp8_tc" + ("_widened" if widened else "")
            scores = torch.full((T, S), float("nan"), device=self.dev)
            self.indexer_fp8_tc_launch(scores, q8, qs, k8, ks, w, start, vis, S, H, D, widened, tiles=4 if widened else 1)
            self.record(f"{name} 32x4096 (64 heads x 128, {4 if widened else 1}-tile blocks)", rel_l2(scores[~masked], ref[~masked]), FP8_TC_BOUND,
                        "masked float32 min" if bool((scores[masked] == FLT_MIN).all()) else "MASK WRONG")
            if not bool((scores[masked] == FLT_MIN).all()) or scores.isnan().any():
                self.record_bool(f"{name} mask", False, "masked entries not float32 min, or unwritten")
            h2, d2, n2 = 20, 24, 1000
            q2, k2 = self.bf16(T, h2, d2), self.bf16(S, d2, scale=2.0)
            k8b, ksb = self.quant_fp8(k2, False)
            q8b, qsb = self.quant_fp8(q2.view(T * h2, d2), False)
            w2 = torch.randn(T, h2, device=self.dev) * h2 ** -0.5
            st2 = torch.full((T,), 100, dtype=torch.int32, device=self.dev)
            vis2 = torch.randint(1, n2 + 1, (T,), dtype=torch.int32, device=self.dev)
            sc2 = torch.full((T, n2), float("nan"), device=self.dev)
            self.indexer_fp8_tc_launch(sc2, q8b, qsb, k8b, ksb, w2, st2, vis2, n2, h2, d2, widened, tiles=3)
            ref2 = ref_indexer(ref_fp8_rows(q8b, qsb).view(T, h2, d2), ref_fp8_rows(k8b, ksb), w2, st2.cpu(), vis2.cpu(),
                               n2, d2 ** -0.5)
            m2 = ref2 == FLT_MIN
            self.record(f"{name} 32x1000 (20 heads x 24, keys from 100, 3-tile blocks)", rel_l2(sc2[~m2], ref2[~m2]), FP8_TC_BOUND,
                        "masked float32 min" if bool((sc2[m2] == FLT_MIN).all()) else "MASK WRONG")
        # What fp8 costs in selection: overlap of the top-512 with the bf16 scores' (reported, not bounded).
        exact = ref_indexer(q, keys, w, start.cpu(), vis.cpu(), S, D ** -0.5)
        full = vis == S
        top = lambda x: set(x.topk(512).indices.tolist())
        rows = [r for r in range(T) if full[r]]
        overlap = sum(len(top(scores[r]) & top(exact[r])) for r in rows) / (512 * max(len(rows), 1))
        self.rows.append(("indexer_scores_fp8 vs bf16 selection", "info",
                          f"{100 * overlap:.1f}% of the top-512 keys agree over {len(rows)} full rows"))
        print(f"info  indexer_scores_fp8 vs bf16 selection: {self.rows[-1][2]}", flush=True)

    def time_indexer_fp8(self):
        """The fp8 indexer's scores against the bf16 kernels' on the same keys, B 64 at 64K."""
        H, D = 64, 128
        B, ctx, k = self.sz((64, 65536, 2048), (2, 1024, 64))
        keys = self.bf16(B * ctx, D)
        k8, ks = self.quant_fp8(keys, False)
        q, w = self.bf16(B, H, D), torch.randn(B, H, device=self.dev) * H ** -0.5
        q8, qs = self.quant_fp8(q.view(B * H, D), False)
        start = (torch.arange(B, device=self.dev) * ctx).int()
        vis = torch.full((B,), ctx, dtype=torch.int32, device=self.dev)
        scores = torch.empty(B, ctx, device=self.dev)
        idx = torch.empty(B, k, dtype=torch.int32, device=self.dev)
        t_fp8 = self.time_ms(lambda: self.indexer_fp8_launch(scores, q8, qs, k8, ks, w, start, vis, ctx, H, D))
        t_topk, _ = self.time_topk_as_the_engine(idx, scores, vis, k)
        t_bf16 = self.time_ms(lambda: self.indexer_launch(scores, q, keys, w, start, vis, ctx, H, D))
        t_bf16_tc = self.time_ms(lambda: self.indexer_tc_launch(scores, q, keys, w, start, vis, ctx, H, D))
        t_fp8_tc = self.time_ms(lambda: self.indexer_fp8_tc_launch(scores, q8, qs, k8, ks, w, start, vis, ctx, H, D))
        t_widened = self.time_ms(
            lambda: self.indexer_fp8_tc_launch(scores, q8, qs, k8, ks, w, start, vis, ctx, H, D, widened=True))
        t_fp8_tc8 = self.time_ms(
            lambda: self.indexer_fp8_tc_launch(scores, q8, qs, k8, ks, w, start, vis, ctx, H, D, tiles=8))
        bytes_ = k8.numel() + ks.numel() * 4 + scores.numel() * 4 * 2
        self.add_timing("fp8 indexer scores + top-k, B=64, ctx 64K, 64x128 heads, k=2048", t_fp8 + t_topk,
                             "our bf16 indexer scores + top-k", t_bf16 + t_topk,
                             f"scores {t_fp8:.3f} ms (bf16 {t_bf16:.3f} ms); {bytes_ / (t_fp8 + t_topk) / 1e6:.0f} GB/s = "
                             f"{100 * bytes_ / (t_fp8 + t_topk) / 1e6 / self.copy_gbs:.0f}% of copy (goal 50%)")
        self.add_timing("fp8 indexer scores on mma.sync e4m3 (fp16 on Hopper) + top-k, same shape", t_fp8_tc + t_topk,
                             "our bf16 tensor-core scores + top-k", t_bf16_tc + t_topk,
                             f"scores {t_fp8_tc:.3f} ms (bf16 tensor cores {t_bf16_tc:.3f} ms, fp8 widened to bf16 "
                             f"{t_widened:.3f} ms, fp8 SIMT {t_fp8:.3f} ms); "
                             f"{bytes_ / (t_fp8_tc + t_topk) / 1e6:.0f} GB/s = "
                             f"{100 * bytes_ / (t_fp8_tc + t_topk) / 1e6 / self.copy_gbs:.0f}% of copy (goal 50%)")
        self.add_timing("fp8 indexer scores on mma.sync e4m3, 8 key tiles a block, + top-k, same shape",
                             t_fp8_tc8 + t_topk, "1 tile a block + top-k", t_fp8_tc + t_topk,
                             f"scores {t_fp8_tc8:.3f} ms ({t_fp8_tc / t_fp8_tc8:.2f}x 1 tile a block); "
                             f"{100 * bytes_ / (t_fp8_tc8 + t_topk) / 1e6 / self.copy_gbs:.0f}% of copy (goal 50%)")

    def mla_launch(self, name, out, lse, q, kv, extra, heads, latent, rope):
        dqk = latent + rope
        smem = MLA_HEADS_PER_BLOCK * dqk * 2 + MLA_TILE * (dqk + 2) * 2 + MLA_TILE * 4
        self.launch(name, ((heads + MLA_HEADS_PER_BLOCK - 1) // MLA_HEADS_PER_BLOCK, q.shape[0]), 256,
                    [out, lse, q, kv, *extra, ("i", heads), ("i", latent), ("i", rope), ("f", 0.135234)], smem)

    @staticmethod
    def mla_tc_smem(latent, rope, groups=1):
        """Dynamic shared memory of mla_tc.cuh (launch::mla_tc_smem_bytes) for blocks of `groups`
        groups of 16 heads: padded bf16 rows."""
        row = ((latent + 31) // 32 * 32 + rope + 15) // 16 * 16
        h = 16 * groups
        return (h + 32) * (row + 8) * 2 + h * (32 + 8) * 2 + 2 * 4 * h * 4 + 32 * 4

    def mla_tc_launch(self, out, lse, q, kv, idx, k, heads, latent, rope, groups=1):
        smem = self.mla_tc_smem(latent, rope, groups)
        self.launch("sparse_mla_attention_bf16_tc", ((heads + 16 * groups - 1) // (16 * groups), q.shape[0]), 128 * groups,
                    [out, lse, q, kv, idx, ("i", k), ("i", heads), ("i", latent), ("i", rope), ("f", 0.135234)], smem)

    def check_mla(self):
        H, L, R = 128, 512, 64
        scale = 0.135234
        # sparse, decode shape: 16 sequences of 8K, top-k 2048, some -1, one empty row
        B, ctx, k = 16, 8192, 2048
        kv = self.bf16(B * ctx, L + R)
        q = self.bf16(B, H, L + R, scale=0.5)
        idx = torch.stack([torch.randperm(ctx, device=self.dev)[:k] + b * ctx for b in range(B)]).int()
        idx[1, ::3] = -1
        idx[2] = -1
        idx[3, :70] = -1  # two whole tiles and part of a third masked before the first key
        out = torch.full((B, H, L), float("nan"), device=self.dev).to(torch.bfloat16)
        lse = torch.full((B, H), float("nan"), device=self.dev)
        self.mla_launch("sparse_mla_attention_bf16", out, lse, q, kv, [idx, ("i", k)], H, L, R)
        slots = [row[row >= 0].long() for row in idx]
        ro, rl = ref_mla(q, kv, slots, L, scale)
        self.record("sparse_mla_attention_bf16 decode (16 x 128 heads, top-k 2048)", rel_l2(out, ro), BF16_BOUND)
        fin = torch.isfinite(rl)
        self.record_bool("sparse_mla lse / empty row", bool((lse[~fin] == -math.inf).all()) and bool((out[2] == 0).all()),
                         "empty row: lse -inf, out 0")
        self.record("sparse_mla_attention_bf16 lse", rel_l2(lse[fin], rl[fin]), F32_BOUND * 10)
        # the tensor-core kernel on the same inputs (its P is rounded to bf16 before P·V, as
        # FlashMLA's is: the bf16 bound still holds)
        # blocks of 1, 2 and 4 groups of 16 heads: 8, 4 and 2 blocks a row
        for groups in (1, 2, 4):
            out_tc = torch.full_like(out, float("nan"))
            lse_tc = torch.full_like(lse, float("nan"))
            self.mla_tc_launch(out_tc, lse_tc, q, kv, idx, k, H, L, R, groups)
            what = f"sparse_mla_attention_bf16_tc, {16 * groups} heads a block"
            self.record(f"{what}, decode (16 x 128 heads, top-k 2048)", rel_l2(out_tc, ro), BF16_BOUND)
            self.record_bool(f"{what}, empty row",
                             bool((lse_tc[~fin] == -math.inf).all()) and bool((out_tc[2] == 0).all()), "empty row: lse -inf, out 0")
            self.record(f"{what}, lse", rel_l2(lse_tc[fin], rl[fin]), F32_BOUND * 10)
        # prefill shape: 64 tokens of one sequence, causal lists of 48 (future slots -1)
        n, k = 64, 48
        kv_p = self.bf16(n, L + R)
        q_p = self.bf16(n, 32, L + R, scale=0.5)
        idx = torch.full((n, k), -1, dtype=torch.int32, device=self.dev)
        for t in range(n):
            sel = torch.randperm(t + 1, device=self.dev)[:k]
            idx[t, : sel.numel()] = sel.int()
        out = torch.full((n, 32, L), float("nan"), device=self.dev).to(torch.bfloat16)
        lse = torch.full((n, 32), float("nan"), device=self.dev)
        self.mla_launch("sparse_mla_attention_bf16", out, lse, q_p, kv_p, [idx, ("i", k)], 32, L, R)
        ro, _ = ref_mla(q_p, kv_p, [row[row >= 0].long() for row in idx], L, scale)
        self.record("sparse_mla_attention_bf16 prefill (per-query lists)", rel_l2(out, ro), BF16_BOUND)
        # tensor cores, 24 heads: the second group's 16 rows hold 8 heads (in its own block, or
        # in one block of 2 groups)
        q_24 = q_p[:, :24].contiguous()
        ro, _ = ref_mla(q_24, kv_p, [row[row >= 0].long() for row in idx], L, scale)
        for groups in (1, 2):
            out = torch.full((n, 24, L), float("nan"), device=self.dev).to(torch.bfloat16)
            lse = torch.full((n, 24), float("nan"), device=self.dev)
            self.mla_tc_launch(out, lse, q_24, kv_p, idx, k, 24, L, R, groups)
            self.record(f"sparse_mla_attention_bf16_tc prefill (per-query lists, 24 heads, {groups} group(s) a block)",
                        rel_l2(out, ro), BF16_BOUND)
        # dense: 8 rows with their own contexts
        lens = torch.tensor([1, 31, 32, 33, 1000, 4096, 2500, 77], dtype=torch.int32, device=self.dev)
        starts = torch.cat([torch.zeros(1, device=self.dev, dtype=torch.int32), lens.cumsum(0)[:-1].int()])
        kv_d = self.bf16(int(lens.sum()), L + R)
        q_d = self.bf16(8, H, L + R, scale=0.5)
        out = torch.full((8, H, L), float("nan"), device=self.dev).to(torch.bfloat16)
        lse = torch.full((8, H), float("nan"), device=self.dev)
        self.mla_launch("dense_mla_attention_bf16", out, lse, q_d, kv_d, [starts, lens], H, L, R)
        ro, _ = ref_mla(q_d, kv_d, [torch.arange(int(s), int(s) + int(l), device=self.dev) for s, l in zip(starts, lens)], L, scale)
        self.record("dense_mla_attention_bf16 (contexts 1..4096)", rel_l2(out, ro), BF16_BOUND)

    def time_mla(self):
        """Sparse MLA decode at the issue's goal shape: batch 64, 128 heads, top-k 2048, context 64K."""
        L, R, scale = 512, 64, 0.135234
        H = self.sz(128, 32)
        B, ctx, k = self.sz((64, 65536, 2048), (2, 512, 64))
        kv = self.bf16(B * ctx, L + R)
        q = self.bf16(B, H, L + R, scale=0.5)
        idx = (torch.randint(0, ctx, (B, k), device=self.dev) + torch.arange(B, device=self.dev)[:, None] * ctx).int()
        out = torch.empty(B, H, L, device=self.dev, dtype=torch.bfloat16)
        lse = torch.empty(B, H, device=self.dev)
        t_sparse = self.time_ms(lambda: self.mla_launch("sparse_mla_attention_bf16", out, lse, q, kv, [idx, ("i", k)], H, L, R))

        def peer():
            g = kv[idx.long()]  # [B, k, 576] gather
            p = torch.softmax((torch.bmm(q, g.transpose(1, 2)).float() * scale), -1).to(torch.bfloat16)
            return torch.bmm(p, g[:, :, :L])

        t_peer = self.time_ms(peer, reps=10)
        bytes_ = B * k * (L + R) * 2 + q.numel() * 2 + out.numel() * 2
        gbs = bytes_ / t_sparse / 1e6
        self.add_timing("sparse MLA decode B=64, 128 heads, 512+64, top-k 2048, ctx 64K", t_sparse,
                             "torch gather + bmm attention", t_peer,
                             f"{gbs:.0f} GB/s = {100 * gbs / self.copy_gbs:.0f}% of copy (goal 60%); "
                             f"{t_peer / t_sparse:.1f}x the peer (goal 5x)")
        flops = 2 * B * H * k * (L + R + L)
        for groups in (1, 2, 4):
            t_tc = self.time_ms(lambda: self.mla_tc_launch(out, lse, q, kv, idx, k, H, L, R, groups))
            gbs = bytes_ / t_tc / 1e6
            self.add_timing(f"sparse MLA decode, same shape, tensor cores (mma.sync), {16 * groups} heads a block", t_tc,
                                 "torch gather + bmm attention", t_peer,
                                 f"{gbs:.0f} GB/s = {100 * gbs / self.copy_gbs:.0f}% of copy (goal 60%); "
                                 f"{t_peer / t_tc:.1f}x the peer (goal 5x); {flops / t_tc / 1e9:.0f} TFLOP/s; "
                                 f"{t_sparse / t_tc:.1f}x the SIMT kernel")
        starts = (torch.arange(B, device=self.dev) * ctx).int()
        lens = torch.full((B,), ctx, dtype=torch.int32, device=self.dev)
        t_dense = self.time_ms(lambda: self.mla_launch("dense_mla_attention_bf16", out, lse, q, kv, [starts, lens], H, L, R), reps=5)
        self.add_timing("dense MLA decode, same shape, all 64K keys", t_dense, "sparse kernel", t_sparse,
                             f"sparse is {t_dense / t_sparse:.1f}x faster (attention only; whole-step goal 4x needs the backend)")

    def check_moe(self):
        for T, E, K, G, TG, norm, rsf in ((4096, 256, 8, 8, 4, 1, 2.5), (512, 8, 2, 4, 2, 1, 2.5),
                                           (512, 16, 4, 4, 3, 1, 2.5), (512, 8, 1, 1, 1, 0, 1.0),
                                           (256, 512, 8, 16, 4, 1, 2.5)):
            logits = torch.randn(T, E, device=self.dev) * 2
            bias = torch.randn(E, device=self.dev) * 0.1
            ids = torch.full((T, K), -7, dtype=torch.int32, device=self.dev)
            wts = torch.full((T, K), float("nan"), device=self.dev)
            self.launch("moe_route_f32", ((T + 3) // 4,), 128, [ids, wts, logits, bias, ("i", T), ("i", E), ("i", K), ("i", G), ("i", TG), ("i", norm), ("f", rsf)])
            rid, rw, margin = ref_route(logits, bias, K, G, TG, norm, rsf)
            same = (ids.long() == rid).all(-1)
            ambiguous = margin < 1e-5
            ok = bool((same | ambiguous).all())
            self.record_bool(f"moe_route_f32 T={T} E={E} K={K} G={G} TG={TG} norm={norm}", ok,
                             f"{int((~same).sum())} tokens differ, all at near-ties (<1e-5)" if ok else f"{int((~same & ~ambiguous).sum())} tokens routed differently")
            self.record(f"moe_route_f32 weights E={E}", rel_l2(wts[same], rw[same]), F32_BOUND)

        # the engine's lists from a routing on the device (moe_expert_slots): pairs in expert
        # order, an expert's in token order; each expert's tiles of 64 rows (the grouped
        # kernels' grid rows); counts added to one load row. A decode step's pairs, and a
        # prefill chunk's (4096 x top-8: 128 of the kernel's 256-pair tiles).
        def tiles_of(counts):
            return torch.cat([torch.zeros(1, dtype=torch.long, device=self.dev), ((counts + 63) // 64).cumsum(0)])

        for T, E, K in ((64, 256, 8), (5, 8, 2), (300, 16, 1), (40, 512, 8), (4096, 256, 8)):
            ids = torch.rand(T, E, device=self.dev).topk(K, -1).indices.sort(-1).values.int().contiguous()
            w = torch.rand(T, K, device=self.dev)
            P = T * K
            group_offsets = torch.full((E + 1,), -7, dtype=torch.int32, device=self.dev)
            tile_offsets = torch.full((E + 1,), -7, dtype=torch.int32, device=self.dev)
            row_offsets = torch.full((T + 1,), -7, dtype=torch.int32, device=self.dev)
            slot_rows = torch.full((P,), -7, dtype=torch.int32, device=self.dev)
            slot_w = torch.full((P,), float("nan"), device=self.dev)
            slot_of = torch.full((P,), -7, dtype=torch.int32, device=self.dev)
            load = torch.ones(3, E, device=self.dev)
            self.launch("moe_expert_slots", (1,), 256, [group_offsets, tile_offsets, row_offsets, slot_rows, slot_w, slot_of,
                                                        load[1], ids, w, ("i", T), ("i", K), ("i", E)])
            flat = ids.flatten().long()
            order = torch.sort(flat * P + torch.arange(P, device=self.dev)).indices  # by expert, then pair
            counts = torch.bincount(flat, minlength=E)
            want_offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=self.dev), counts.cumsum(0)])
            want_slot_of = torch.empty(P, dtype=torch.long, device=self.dev)
            want_slot_of[order] = torch.arange(P, device=self.dev)
            want_load = torch.ones(3, E, device=self.dev)
            want_load[1] += counts.float()
            ok = (torch.equal(group_offsets.long(), want_offsets) and torch.equal(tile_offsets.long(), tiles_of(counts))
                  and torch.equal(slot_of.long(), want_slot_of)
                  and torch.equal(slot_rows.long(), order // K) and torch.equal(slot_w, w.flatten()[order])
                  and torch.equal(row_offsets.long(), torch.arange(T + 1, device=self.dev) * K) and torch.equal(load, want_load))
            self.record_bool(f"moe_expert_slots T={T} E={E} K={K}", ok,
                             "expert-order slots, token order within, 64-row tiles, counts into one load row" if ok
                             else "lists differ")

            # expert shards (engine: run_shards): each shard keeps the pairs dealt to its copies
            # (moe_shard_pairs: an expert's r-th pair to copy r mod copies), then lists them over
            # its own experts (moe_expert_slots with -1 for the others and no load)
            S = 3
            holders = [sorted(torch.randperm(S)[:1 + int(torch.randint(0, S, ()))].tolist()) for _ in range(E)]
            kept = torch.zeros(P, dtype=torch.long, device=self.dev)
            good = True
            for s in range(S):
                held = [e for e in range(E) if s in holders[e]]
                table = torch.tensor([held.index(e) if s in holders[e] else -1 for e in range(E)]
                                     + [holders[e].index(s) if s in holders[e] else -1 for e in range(E)]
                                     + [len(holders[e]) for e in range(E)], dtype=torch.int32, device=self.dev)
                local = torch.full((P,), -7, dtype=torch.int32, device=self.dev)
                self.launch("moe_shard_pairs", ((P + 255) // 256,), 256, [local, ids, slot_of, group_offsets, table, ("i", P), ("i", E)])
                rank = slot_of.long() - group_offsets.long()[flat]
                copies = torch.tensor([len(h) for h in holders], device=self.dev)[flat]
                copy = table.long()[E:2 * E][flat]
                mine = (table.long()[:E][flat] >= 0) & (rank % copies == copy)
                want_local = torch.where(mine, table.long()[:E][flat], -1)
                good &= torch.equal(local.long(), want_local)
                kept += mine.long()
                Es = len(held)
                go = torch.full((Es + 1,), -7, dtype=torch.int32, device=self.dev)
                to = torch.full((Es + 1,), -7, dtype=torch.int32, device=self.dev)
                ro = torch.full((T + 1,), -7, dtype=torch.int32, device=self.dev)
                sr = torch.full((P,), -7, dtype=torch.int32, device=self.dev)
                sw = torch.full((P,), float("nan"), device=self.dev)
                so = torch.full((P,), -7, dtype=torch.int32, device=self.dev)
                self.launch("moe_expert_slots", (1,), 256, [go, to, ro, sr, sw, so, ("p", 0), local, w, ("i", T), ("i", K),
                                                            ("i", Es)])
                ll = local.long()
                n_kept = int(mine.sum())
                korder = torch.sort(torch.where(mine, ll, Es) * P + torch.arange(P, device=self.dev)).indices[:n_kept]
                want_so = torch.full((P,), -1, dtype=torch.long, device=self.dev)
                want_so[korder] = torch.arange(n_kept, device=self.dev)
                shard_counts = torch.bincount(ll[mine], minlength=Es)
                want_go = torch.cat([torch.zeros(1, dtype=torch.long, device=self.dev), shard_counts.cumsum(0)])
                good &= (torch.equal(go.long(), want_go) and torch.equal(to.long(), tiles_of(shard_counts))
                         and torch.equal(so.long(), want_so)
                         and torch.equal(sr.long()[:n_kept], korder // K) and torch.equal(sw[:n_kept], w.flatten()[korder])
                         and bool((sr[n_kept:] == 0).all()) and bool((sw[n_kept:] == 0).all())
                         and torch.equal(ro.long(), torch.arange(T + 1, device=self.dev) * K))
            good &= bool((kept == 1).all())
            self.record_bool(f"moe_shard_pairs + moe_expert_slots per shard T={T} E={E} K={K} S={S}", good,
                             "each pair dealt to one copy, in turn; shard lists skip the rest" if good else "shard lists differ")

        # NaN and infinite logits: every token still gets K distinct experts in range (the
        # engine's rows of NaN logits route without fault), and the other tokens as before
        T, E, K = 64, 16, 4
        logits = torch.randn(T, E, device=self.dev) * 2
        logits[0] = float("nan")
        logits[1, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")], device=self.dev)
        bias = torch.randn(E, device=self.dev) * 0.1
        ids = torch.full((T, K), -7, dtype=torch.int32, device=self.dev)
        wts = torch.full((T, K), float("nan"), device=self.dev)
        self.launch("moe_route_f32", ((T + 3) // 4,), 128, [ids, wts, logits, bias, ("i", T), ("i", E), ("i", K), ("i", 1), ("i", 1), ("i", 1), ("f", 1.0)])
        rid, _, margin = ref_route(logits[2:], bias, K, 1, 1, 1, 1.0)
        il = ids.long()
        same = (il[2:] == rid).all(-1) | (margin < 1e-5)
        ok = bool(((il >= 0) & (il < E)).all()) and bool((il[:, 1:] > il[:, :-1]).all()) and bool(same.all())
        self.record_bool("moe_route_f32 NaN and infinite logits", ok,
                         "distinct ids in range for every token; the other tokens as the reference" if ok else "ids out of range, repeated or changed")

        # permutation, combine, grouped GEMM fallback
        T, E, K, Hd = 2048, 64, 8, 1024
        hot = (torch.arange(E, device=self.dev) == 5).float() * 0.5  # expert 5 is hot, as real loads are
        ids = (torch.rand(T, E, device=self.dev) + hot).topk(K, -1).indices.int()  # K distinct per token
        w = torch.rand(T, K, device=self.dev)
        x = self.bf16(T, Hd)
        counts = torch.zeros(E, dtype=torch.int32, device=self.dev)
        offsets = torch.full((E + 1,), -7, dtype=torch.int32, device=self.dev)
        cursor = torch.full((E,), -7, dtype=torch.int32, device=self.dev)
        self.launch("moe_count_experts", ((T * K + 255) // 256,), 256, [counts, ids, ("i", T * K)])
        self.launch("moe_expert_offsets", (1,), 32, [offsets, cursor, counts, ("i", E)])
        want = torch.cat([torch.zeros(1, device=self.dev, dtype=torch.long), torch.bincount(ids.flatten().long(), minlength=E).cumsum(0)])
        self.record_bool("moe_count_experts + moe_expert_offsets", torch.equal(offsets.long(), want), "offsets = prefix sum of bincount")
        xp = torch.full((T * K, Hd), float("nan"), device=self.dev).to(torch.bfloat16)
        slot = torch.full((T * K,), -7, dtype=torch.int32, device=self.dev)
        self.launch("moe_permute_bf16", (T * K,), 128, [xp, slot, x, ids, offsets, cursor, ("i", K), ("i", Hd)])
        sl = slot.long()
        ok = sl.sort().values.equal(torch.arange(T * K, device=self.dev)) and torch.equal(xp[sl], x.repeat_interleave(K, 0))
        seg_ok = bool(((sl >= offsets.long()[ids.flatten().long()]) & (sl < offsets.long()[ids.flatten().long() + 1])).all())
        self.record_bool("moe_permute_bf16", ok and seg_ok, "every pair in its expert's segment, rows copied exactly")
        y = torch.randn(T * K, Hd, device=self.dev)
        out = torch.full((T, Hd), float("nan"), device=self.dev).to(torch.bfloat16)
        self.launch("moe_unpermute_combine_bf16", ((Hd + 255) // 256, T), 256, [out, y, slot, w, ("i", K), ("i", Hd), ("i", 0)])
        ref = (y.double()[sl].view(T, K, Hd) * w.double()[:, :, None]).sum(1)
        self.record("moe_unpermute_combine_bf16", rel_l2(out, ref), BF16_BOUND)

        N, Kd = 384, 512
        wexp = self.bf16(E, N, Kd, scale=Kd ** -0.5)
        xg = self.bf16(T * K, Kd)
        yg = torch.full((T * K, N), float("nan"), device=self.dev)
        maxrows = int(counts.max())
        self.launch("grouped_gemm_bf16_f32", ((N + 63) // 64, (maxrows + 63) // 64, E), 256, [yg, xg, wexp, offsets, ("i", N), ("i", Kd)])
        self.record("grouped_gemm_bf16_f32 (64 experts, uneven rows)", rel_l2(yg, ref_grouped_gemm(xg, wexp, offsets)), F32_BOUND)

    def time_grouped(self):
        """The grouped expert products read in place (fp8_grouped_tc, bf16_grouped_tc), checked and
        timed at the issue's grouped GEMM goal's shape and a decode step's, then the SIMT fallback."""
        E, n, k = self.sz((256, 2048, 7168), (8, 64, 256))
        decode, prefill = self.sz((64 * 8, 4096 * 8), (4 * 2, 16 * 2))
        # The issue's grouped GEMM goal (>= 60% of the bf16 matmul rate): a prefill's 4096 tokens
        # x top-8 over 256 experts (about 128 rows an expert), gate 7168 -> 2048, bf16 experts;
        # and fp8 experts at that shape (the engine's prefill of fp8 experts), also against
        # dequantising each expert and a matmul.
        counts = torch.bincount(torch.randint(0, E, (prefill,)), minlength=E).tolist()
        self.check_grouped(False, counts, n, k, time_it=True)
        self.check_grouped(True, counts, n, k, time_it=True)
        # Then a decode step's routed experts (64 tokens x top-8 over 256 experts, gate
        # 7168 -> 2048) in one launch, against torch._grouped_mm (grouped_peer).
        counts = torch.bincount(torch.randint(0, E, (decode,)), minlength=E).tolist()
        self.check_grouped(True, counts, n, k, time_it=True)
        self.check_grouped(False, counts, n, k, time_it=True)
        # The SIMT fallback at the goal's gate_up shape (4096 tokens x top-8 over 256 experts,
        # 7168 -> 2x2048), against a torch matmul an expert (skipped with --quick).
        if self.quick:
            return
        T, E, K, Hd, I = self.sz((4096, 256, 8, 7168, 2048), (16, 8, 2, 256, 64))
        rows = T * K
        counts = torch.bincount(torch.randint(0, E, (rows,), device=self.dev), minlength=E)
        offsets = torch.cat([torch.zeros(1, device=self.dev, dtype=torch.long), counts.cumsum(0)]).int()
        xg = self.bf16(rows, Hd)
        wexp = self.bf16(E, 2 * I, Hd, scale=Hd ** -0.5)
        yg = torch.empty(rows, 2 * I, device=self.dev)
        maxrows = int(counts.max())
        t_ours = self.time_ms(lambda: self.launch("grouped_gemm_bf16_f32", ((2 * I + 63) // 64, (maxrows + 63) // 64, E), 256,
                                                  [yg, xg, wexp, offsets, ("i", 2 * I), ("i", Hd)]), reps=3)
        offs = offsets.tolist()

        def peer():
            for e in range(E):
                if offs[e + 1] > offs[e]:
                    torch.matmul(xg[offs[e]:offs[e + 1]], wexp[e].T)

        t_peer = self.time_ms(peer, reps=5)
        flops = 2 * rows * 2 * I * Hd
        self.add_timing("grouped GEMM fallback (SIMT) 4096x8 tokens, 256 experts, 7168 -> 4096", t_ours,
                             "torch per-expert bf16 matmul", t_peer,
                             f"ours {flops / t_ours / 1e9:.0f} TFLOP/s, peer {flops / t_peer / 1e9:.0f}; "
                             f"goal 60% of {self.mm_tflops:.0f} needs the cuBLAS grouped path")

    def linear_in_place(self, y, x, weight, sms, heads=None, query=None):
        """y = x . W^T with W read in place, split as the engine splits it
        (launch::fp8_linear_split_steps), the parts added by sum_splits_f32: fp8_linear_tc for
        weight = (codes, row_scales), bf16_linear_tc for a bf16 tensor. With heads =
        (count, nope, v): the absorbed MLA's products out of the latent space, as the engine
        batches them: x [m, count * k], W = kv_b [count * (nope + v), k], head h's W_UV,h its
        rows h * (nope + v) + nope .., y [m, count * v]. With query = (count, nope, rope, latent):
        the products into the latent space: x = q [m, count * (nope + rope)], head h's q_nope its
        columns h * (nope + rope) .. + nope, W = the absorbed query weight [count * latent, nope],
        head h's its rows h * latent .., y [m, count * latent]."""
        fp8 = isinstance(weight, tuple)
        codes = weight[0] if fp8 else weight
        m = x.shape[0]
        k = codes.shape[1]
        count, nope, v = heads if heads else (1, 0, codes.shape[0])
        batch_x, batch_rows, batch_y = (k, nope + v, v) if heads else (0, 0, 0)
        if query:
            count, _, rope, v = query
            nope, batch_x, batch_rows, batch_y = 0, k + rope, v, v  # first row 0; k is q_nope's width
        n, ldx, ldy = v, x.shape[1], y.shape[1]
        steps = max(1, (k + 127) // 128)
        grid = ((n + 63) // 64, (m + 63) // 64)
        want = -(-sms * 4 // max(1, grid[0] * grid[1] * count))
        splits = max(1, min(want, steps // 2, 16))
        split_steps = -(-steps // splits)
        splits = -(-steps // split_steps)
        if fp8:
            name, args = "fp8_linear_tc", [x, codes[nope:], weight[1][nope:], ("i", m), ("i", n), ("i", k),
                                           ("i", weight[1].shape[1])]
        else:
            name, args = "bf16_linear_tc", [x, codes[nope:], ("i", m), ("i", n), ("i", k)]
        args += [("i", split_steps), ("i", ldx), ("i", ldy), ("l", batch_x), ("i", batch_rows), ("l", batch_y)]
        if splits == 1:
            self.launch(name, grid + (count,), 128, [y] + args)
        else:
            parts = torch.empty(splits, m, ldy, device=self.dev)
            self.launch(name, grid + (count * splits,), 128, [parts] + args)
            self.launch("sum_splits_f32", ((m * ldy + 255) // 256,), 256, [y, parts, ("i", splits), ("l", m * ldy)])
        return splits

    def check_grouped(self, fp8, counts, n, k, time_it=False):
        """fp8_grouped_tc (fp8) or bf16_grouped_tc: group e multiplies its rows of x (rounded to
        bf16) by its own weight (fp8 codes with row scales, or bf16), float32 sums and outputs. A
        grid row per 64-row tile of a group (tile_offsets), and as many more as the engine
        launches when the routing is on the device and the tiles are not known on the host (they
        end at once)."""
        d, E = self.dev, len(counts)
        offsets, tiles = [0], [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
            tiles.append(tiles[-1] + (c + 63) // 64)
        rows = offsets[-1]
        x = torch.randn(rows, k, device=d)
        y = torch.full((rows, n), float("nan"), device=d)
        offs = torch.tensor(offsets, dtype=torch.int32, device=d)
        tile_offs = torch.tensor(tiles, dtype=torch.int32, device=d)
        grid = ((n + 63) // 64, (rows + 63) // 64 + min(E, rows), 1)
        assert grid[1] >= tiles[-1]

        def addresses(t):  # each expert's slice of t ([E, ...]) as a device address
            return torch.tensor([t.data_ptr() + e * t[0].numel() * t.element_size() for e in range(E)],
                                dtype=torch.int64, device=d)

        if fp8:
            codes = torch.randint(0, 256, (E, n, k), dtype=torch.uint8, device=d)
            codes[(codes & 0x7F) == 0x7F] = 0x3E
            scales = torch.rand(E, n, (k + 127) // 128, device=d) * 0.004 + 0.001
            name, args = "fp8_grouped_tc", [addresses(codes), addresses(scales), offs, tile_offs, ("i", E), ("i", n),
                                            ("i", k), ("i", scales.shape[2])]
            w16 = [self.fp8_values_bf16(codes[e], scales[e]) for e in range(E)]
            weight_bytes = n * k + n * scales.shape[2] * 4
        else:
            w = (torch.randn(E, n, k, device=d) * 0.05).to(torch.bfloat16)
            name, args = "bf16_grouped_tc", [addresses(w), offs, tile_offs, ("i", E), ("i", n), ("i", k)]
            w16 = list(w)
            weight_bytes = n * k * 2
        launch = lambda: self.launch(name, grid, 128, [y, x] + args)  # noqa: E731
        launch()
        ref = torch.empty(rows, n, dtype=torch.float64, device=d)
        for e in range(E):
            a, b = offsets[e], offsets[e + 1]
            ref[a:b] = x[a:b].to(torch.bfloat16).double() @ w16[e].double().T
        self.record(f"{name} {E} experts, {rows} rows (most {max(counts)}), n={n} k={k}", rel_l2(y, ref), F32_BOUND)
        if not time_it:
            return
        t_ours = self.time_ms(launch, reps=10)
        active = [e for e in range(E) if counts[e]]
        xb = x.to(torch.bfloat16)
        t_peer, peer = self.grouped_peer(xb, w16, offsets, active)
        gbs = len(active) * weight_bytes / t_ours / 1e6
        tflops = 2 * rows * n * k / t_ours / 1e9
        what = f"{'fp8' if fp8 else 'bf16'} grouped experts in place: {rows} pairs over {len(active)} active of {E}, {k} -> {n}"
        self.add_timing(what, t_ours, peer, t_peer,
                             f"{t_peer / t_ours:.2f}x the peer; {gbs:.0f} GB/s of weights = {100 * gbs / self.copy_gbs:.0f}% "
                             f"of copy; {tflops:.0f} TFLOP/s = {100 * tflops / self.mm_tflops:.0f}% of the bf16 matmul rate")
        if not fp8:
            return
        # The way without an fp8 grouped kernel (the engine's before fp8 experts ran in place at
        # every size): each active expert's weight dequantised to bf16, then a matmul.
        deq = torch.empty(n, k, dtype=torch.bfloat16, device=d)

        def dequantised():
            for e in active:
                self.launch("fp8_dequant_bf16_bits", ((n * k + 255) // 256,), 256,
                            [deq, codes[e], scales[e], ("l", n * k), ("i", k), ("i", scales.shape[2])])
                torch.matmul(xb[offsets[e]:offsets[e + 1]], deq.T)

        t_deq = self.time_ms(dequantised, reps=5)
        self.add_timing(what, t_ours, "fp8_dequant_bf16_bits + torch matmul an active expert at a time", t_deq,
                             f"{t_deq / t_ours:.2f}x the dequantising path")

    def grouped_peer(self, xb, w16, offsets, active):
        """The faster PyTorch way to run these groups (x rows in bf16, each group's bf16 weight
        [n, k]), timed: torch._grouped_mm (one launch, bf16 out) where this torch takes these
        shapes, else a matmul per active expert. Returns (ms, what it was)."""
        try:
            # The active experts only (no empty group to trip a kernel): [groups, k, n] views.
            wt = torch.stack([w16[e] for e in active]).transpose(1, 2)
            ends = torch.tensor([offsets[e + 1] for e in active], dtype=torch.int32, device=self.dev)
            torch._grouped_mm(xb, wt, offs=ends)
            self.sync()
            return self.time_ms(lambda: torch._grouped_mm(xb, wt, offs=ends), reps=10), "torch._grouped_mm (bf16 out)"
        except Exception as e:  # an older torch, or shapes its kernel refuses
            print(f"torch._grouped_mm: {type(e).__name__}: {e}; timing a matmul per expert instead", flush=True)

        def per_expert():
            for e in active:
                torch.matmul(xb[offsets[e]:offsets[e + 1]], w16[e].T)

        return self.time_ms(per_expert, reps=5), "torch bf16 matmul an active expert at a time"

    def fp8_weight(self, n, k):
        codes = torch.randint(0, 256, (n, k), dtype=torch.uint8, device=self.dev)
        codes[(codes & 0x7F) == 0x7F] = 0x3E  # no NaNs
        row_scales = torch.rand(n, (k + 127) // 128, device=self.dev) * 0.004 + 0.001
        return codes, row_scales

    @staticmethod
    def fp8_values_bf16(codes, row_scales):
        k = codes.shape[1]
        return (codes.view(torch.float8_e4m3fn).float() * row_scales.repeat_interleave(128, 1)[:, :k]).to(torch.bfloat16)

    def check_fp8_linear(self):
        """fp8_linear_tc (+ sum_splits_f32): an fp8 weight's product read in place, against
        float64 sums of the bf16 values dequantising gives; then, on a GPU, timed at decode
        shapes against what it replaces (fp8_dequant_bf16_bits + a bf16 matmul) and a bf16
        weight's matmul."""
        sms = self.sms if self.on_gpu else 1
        shapes = ((1, 300, 1000), (5, 64, 4096), (64, 130, 259), (100, 70, 512), (3, 7, 130))
        if self.on_gpu:
            shapes += ((64, 7168, 2048), (1, 2048, 7168), (17, 24576, 1536))
        for m, n, k in shapes:
            codes, row_scales = self.fp8_weight(n, k)
            x = torch.randn(m, k, device=self.dev)
            y = torch.full((m, n), float("nan"), device=self.dev)
            splits = self.linear_in_place(y, x, (codes, row_scales), sms)
            ref = x.to(torch.bfloat16).double() @ self.fp8_values_bf16(codes, row_scales).double().T
            self.record(f"fp8_linear_tc m={m} n={n} k={k} ({splits} k-split{'s' if splits > 1 else ''})",
                        rel_l2(y, ref), F32_BOUND)
        # The absorbed MLA's per-head products out of the latent space, batched over heads.
        for m, (heads, nope, v, k) in ((3, (20, 24, 40, 200)), (64, (4, 16, 130, 512)), (2, (2, 8, 16, 1024))):
            codes, row_scales = self.fp8_weight(heads * (nope + v), k)
            x = torch.randn(m, heads * k, device=self.dev)
            y = torch.full((m, heads * v), float("nan"), device=self.dev)
            splits = self.linear_in_place(y, x, (codes, row_scales), sms, heads=(heads, nope, v))
            w = self.fp8_values_bf16(codes, row_scales).double().view(heads, nope + v, k)[:, nope:]
            ref = torch.einsum("mhk,hvk->mhv", x.to(torch.bfloat16).double().view(m, heads, k), w).reshape(m, heads * v)
            self.record(f"fp8_linear_tc {heads} heads' W_UV (v={v}, latent {k}) over {m} rows ({splits} k-splits)",
                        rel_l2(y, ref), F32_BOUND)
        # bf16_linear_tc: the same products of a bf16 weight (k odd, k even but not a multiple
        # of 4: values read one by one; multiples of 4: 8-byte loads), then batched over heads.
        for m, n, k in ((1, 300, 1000), (5, 64, 4096), (64, 130, 259), (100, 70, 514), (3, 7, 130)):
            w = torch.randn(n, k, device=self.dev).to(torch.bfloat16)
            x = torch.randn(m, k, device=self.dev)
            y = torch.full((m, n), float("nan"), device=self.dev)
            splits = self.linear_in_place(y, x, w, sms)
            ref = x.to(torch.bfloat16).double() @ w.double().T
            self.record(f"bf16_linear_tc m={m} n={n} k={k} ({splits} k-split{'s' if splits > 1 else ''})",
                        rel_l2(y, ref), F32_BOUND)
        for m, (heads, nope, v, k) in ((3, (20, 24, 40, 200)), (64, (4, 16, 130, 512)), (2, (2, 8, 16, 1026))):
            w = torch.randn(heads * (nope + v), k, device=self.dev).to(torch.bfloat16)
            x = torch.randn(m, heads * k, device=self.dev)
            y = torch.full((m, heads * v), float("nan"), device=self.dev)
            splits = self.linear_in_place(y, x, w, sms, heads=(heads, nope, v))
            wh = w.double().view(heads, nope + v, k)[:, nope:]
            ref = torch.einsum("mhk,hvk->mhv", x.to(torch.bfloat16).double().view(m, heads, k), wh).reshape(m, heads * v)
            self.record(f"bf16_linear_tc {heads} heads' W_UV (v={v}, latent {k}) over {m} rows ({splits} k-splits)",
                        rel_l2(y, ref), F32_BOUND)
        # The products into the latent space: each head's q_nope is a strided slice of q's row.
        for m, (heads, nope, rope, latent) in ((3, (20, 24, 8, 40)), (64, (4, 130, 6, 96)), (2, (2, 514, 4, 16))):
            w = torch.randn(heads * latent, nope, device=self.dev).to(torch.bfloat16)
            x = torch.randn(m, heads * (nope + rope), device=self.dev)
            y = torch.full((m, heads * latent), float("nan"), device=self.dev)
            splits = self.linear_in_place(y, x, w, sms, query=(heads, nope, rope, latent))
            q_nope = x.view(m, heads, nope + rope)[:, :, :nope].to(torch.bfloat16).double()
            ref = torch.einsum("mhk,hlk->mhl", q_nope, w.double().view(heads, latent, nope)).reshape(m, heads * latent)
            self.record(f"bf16_linear_tc {heads} heads' W_UK (nope {nope}, rope {rope} -> latent {latent}) over {m} rows "
                        f"({splits} k-splits)", rel_l2(y, ref), F32_BOUND)
        # A MoE layer's experts in one launch, uneven rows (an empty expert, one of 70: two row
        # blocks), k not a multiple of 128.
        counts = [3, 0, 70, 1, 10]
        self.check_grouped(True, counts, 72, 300)
        # A prefill chunk's: groups of several tiles each, one of exactly 64 rows and one of 65.
        self.check_grouped(True, [130, 0, 200, 64, 65], 72, 300)
        # bf16 experts the same way: k odd and k even but not a multiple of 4 (values read one
        # by one), then k a multiple of 4 but not of 128 (8-byte loads, a partial last step).
        self.check_grouped(False, counts, 72, 301)
        self.check_grouped(False, [2, 0, 9], 40, 302)
        self.check_grouped(False, [1, 17, 0, 64], 130, 260)
    def time_linear(self):
        """fp8 and bf16 weights' products read in place (fp8_linear_tc, bf16_linear_tc) at
        DeepSeek-V3's decode shapes and past in_place_rows, against the paths they replace."""
        sms = self.sms
        # The last three are past the engine's in_place_rows (64), where it dequantises and calls
        # cuBLAS instead: they say whether in place would still pay there (in_place_rows is the
        # knob, grid rows of 64 the kernel's way to more rows).
        for m, n, k, what in self.sz(((1, 2048, 7168, "expert gate"), (64, 2048, 7168, "expert gate"),
                                      (1, 7168, 16384, "o_proj"), (64, 7168, 16384, "o_proj"), (128, 7168, 16384, "o_proj"),
                                      (256, 7168, 16384, "o_proj"), (1024, 7168, 16384, "o_proj")),
                                     ((1, 64, 256, "expert gate"), (3, 70, 300, "o_proj"), (70, 64, 256, "o_proj"))):
            codes, row_scales = self.fp8_weight(n, k)
            x = torch.randn(m, k, device=self.dev)
            y = torch.empty(m, n, device=self.dev)
            deq = torch.empty(n, k, dtype=torch.bfloat16, device=self.dev)
            w16 = self.fp8_values_bf16(codes, row_scales)
            t_ours = self.time_ms(lambda: self.linear_in_place(y, x, (codes, row_scales), sms))

            def dequant_then_matmul():
                self.launch("fp8_dequant_bf16_bits", ((n * k + 255) // 256,), 256,
                            [deq, codes, row_scales, ("l", n * k), ("i", k), ("i", row_scales.shape[1])])
                torch.matmul(x.to(torch.bfloat16), deq.T, out=None)

            t_deq = self.time_ms(dequant_then_matmul)
            t_bf16 = self.time_ms(lambda: torch.matmul(x.to(torch.bfloat16), w16.T))
            gbs = (n * k + n * row_scales.shape[1] * 4 + m * k * 4 + m * n * 4) / t_ours / 1e6
            self.add_timing(f"fp8 product in place, {what} {m}x{k} by {n}x{k}", t_ours,
                                 "fp8_dequant_bf16_bits + torch bf16 matmul (the path it replaces)", t_deq,
                                 f"{t_deq / t_ours:.1f}x the dequantising path; {t_bf16 / t_ours:.2f}x a bf16 weight's "
                                 f"torch matmul ({t_bf16:.3f} ms); {gbs:.0f} GB/s = {100 * gbs / self.copy_gbs:.0f}% of copy")
        # A bf16 weight's decode-step products: bf16_linear_tc against what it replaces in the
        # engine, x rounded to bf16 and a cuBLAS bf16 product with float32 outputs (torch's
        # matmul, then the cast). DeepSeek-V3's q_b (1536 -> 24576), o_proj, an expert's gate,
        # and the absorbed MLA's W_UV over 128 heads (latent 512 -> v 128).
        # And past in_place_rows (the last two), as for fp8 above.
        for m, n, k, what in self.sz(((1, 24576, 1536, "q_b"), (64, 24576, 1536, "q_b"), (1, 7168, 16384, "o_proj"),
                                      (64, 7168, 16384, "o_proj"), (8, 2048, 7168, "expert gate"),
                                      (256, 7168, 16384, "o_proj"), (1024, 7168, 16384, "o_proj")),
                                     ((1, 64, 256, "q_b"), (70, 64, 130, "o_proj"))):
            w = torch.randn(n, k, device=self.dev).to(torch.bfloat16)
            x = torch.randn(m, k, device=self.dev)
            y = torch.empty(m, n, device=self.dev)
            t_ours = self.time_ms(lambda: self.linear_in_place(y, x, w, sms))
            t_peer = self.time_ms(lambda: torch.matmul(x.to(torch.bfloat16), w.T).float())
            gbs = (n * k * 2 + m * k * 4 + m * n * 4) / t_ours / 1e6
            self.add_timing(f"bf16 product in place, {what} {m}x{k} by {n}x{k}", t_ours,
                                 "x to bf16 + torch bf16 matmul + to float32 (the cuBLAS path it replaces)", t_peer,
                                 f"{t_peer / t_ours:.2f}x; {gbs:.0f} GB/s = {100 * gbs / self.copy_gbs:.0f}% of copy")
        heads, nope, v, k = self.sz((128, 128, 128, 512), (4, 16, 16, 64))
        for m in self.sz((1, 64), (1, 3)):
            w = torch.randn(heads * (nope + v), k, device=self.dev).to(torch.bfloat16)
            x = torch.randn(m, heads * k, device=self.dev)
            y = torch.empty(m, heads * v, device=self.dev)
            wv = w.view(heads, nope + v, k)[:, nope:]
            t_ours = self.time_ms(lambda: self.linear_in_place(y, x, w, sms, heads=(heads, nope, v)))
            t_peer = self.time_ms(lambda: torch.bmm(x.to(torch.bfloat16).view(m, heads, k).transpose(0, 1),
                                                    wv.transpose(1, 2)).float())
            self.add_timing(f"bf16 W_UV in place, {heads} heads over {m} rows (latent {k} -> v {v})", t_ours,
                                 "x to bf16 + torch batched bf16 matmul + to float32", t_peer, f"{t_peer / t_ours:.2f}x")
        rope = self.sz(64, 8)
        for m in self.sz((1, 64), (1, 3)):
            w = torch.randn(heads * k, nope, device=self.dev).to(torch.bfloat16)
            x = torch.randn(m, heads * (nope + rope), device=self.dev)
            y = torch.empty(m, heads * k, device=self.dev)
            wk = w.view(heads, k, nope)
            t_ours = self.time_ms(lambda: self.linear_in_place(y, x, w, sms, query=(heads, nope, rope, k)))
            t_peer = self.time_ms(lambda: torch.bmm(x.view(m, heads, nope + rope)[:, :, :nope].to(torch.bfloat16)
                                                    .transpose(0, 1), wk.transpose(1, 2)).float())
            self.add_timing(f"bf16 W_UK in place, {heads} heads over {m} rows (nope {nope} -> latent {k})", t_ours,
                                 "q_nope to bf16 + torch batched bf16 matmul + to float32", t_peer,
                                 f"{t_peer / t_ours:.2f}x")


    def check_fp8(self):
        rows, cols = 1000, 700  # not multiples of 128: partial scale blocks
        qb = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, device=self.dev)
        qb[(qb & 0x7F) == 0x7F] = 0x42  # no NaN patterns
        sc = torch.rand((rows + 127) // 128, (cols + 127) // 128, device=self.dev) + 0.5
        ref = ref_fp8(qb, sc)
        out = torch.full((rows, cols), float("nan"), device=self.dev)
        self.launch("fp8_block_dequant_f32", ((cols + 255) // 256, rows), 256, [out, qb, sc, ("i", rows), ("i", cols)])
        self.record("fp8_block_dequant_f32", rel_l2(out, ref), F32_BOUND)  # one f32 rounding of value x scale
        outb = out.to(torch.bfloat16).fill_(float("nan"))
        self.launch("fp8_block_dequant_bf16", ((cols + 255) // 256, min(rows, 65535)), 256, [outb, qb, sc, ("i", rows), ("i", cols)])
        self.record("fp8_block_dequant_bf16", rel_l2(outb, ref), BF16_BOUND)

    def write(self, final=False):
        """gpu-check.md and gpu-check.json as they stand (after every step: a kill keeps them)."""
        total = self.earlier_s + time.time() - self.started
        if self.on_gpu:
            ceilings = (f"ceilings: copy {self.copy_gbs:.0f} GB/s (read + write), bf16 matmul {self.mm_tflops:.0f} TFLOP/s"
                        if not math.isnan(self.copy_gbs) else "ceilings not measured (their step did not run)")
        elif self.smoke:
            ceilings = "smoke run of the timing steps' code at tiny shapes, one launch a timing: its times mean nothing"
        else:
            ceilings = "no ceilings or timings: emulated kernels show correctness, never speed"
        lines = [f"# sparsemoe kernels on {self.card}", "",
                 f"torch {torch.__version__}, cupy {self.cp.__version__}; {ceilings}; seed "
                 f"{', '.join(map(str, self.seeds))} (a process each); run {total:.0f} s", "",
                 "| step | status | seconds | checks failed |", "| --- | --- | --- | --- |"]
        lines += [f"| {n} | {st['status']} | {st['seconds'] if st['seconds'] is not None else '-'} | {st['failed']} |"
                  for n, st in self.steps.items()]
        lines += ["", "| check | result | detail |", "| --- | --- | --- |"]
        lines += [f"| {c} | {s} | {d} |" for c, s, d in self.rows]
        lines += ["", "| timing (median, CUDA events) | ours ms | peer | peer ms | note |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {w} | {a:.3f} | {p} | {b:.3f} | {n} |" for w, a, p, b, n in self.timings]
        text = "\n".join(lines) + "\n"
        state = {"card": self.card, "copy_gbs": self.copy_gbs, "bf16_tflops": self.mm_tflops, "seeds": self.seeds,
                 "run_s": round(total, 1), "steps": self.steps, "checks": self.rows, "timings": self.timings}
        for name, write in (("gpu-check.md", lambda f: f.write(text)), ("gpu-check.json", lambda f: json.dump(state, f, indent=1))):
            path = os.path.join(self.out_dir, name)
            with open(path + ".tmp", "w") as f:
                write(f)
            os.replace(path + ".tmp", path)  # whole, even if a kill comes in the middle
        if final:
            print(text)

    def load_state(self):
        """An earlier process's results (--resume): its checks, timings, ceilings and steps."""
        try:
            state = json.load(open(os.path.join(self.out_dir, "gpu-check.json")))
        except (OSError, ValueError) as e:
            print(f"--resume: no earlier results to add to ({e}); starting afresh", flush=True)
            return
        self.rows = [tuple(r) for r in state.get("checks", [])]
        self.timings = [tuple(t) for t in state.get("timings", [])]
        self.steps = state.get("steps", {})
        self.seeds = state.get("seeds", [])
        self.earlier_s = state.get("run_s", 0.0)
        self.copy_gbs, self.mm_tflops = state.get("copy_gbs", math.nan), state.get("bf16_tflops", math.nan)
        self.failed = sum(1 for r in self.rows if r[1] == "FAIL")
        for name, st in self.steps.items():
            if st["status"] == "running":  # the process died inside it
                st["status"] = "crashed"
                self.record_bool(name, False, "the process running this step died (a device fault or a kill): "
                                              "its checks after the last printed one did not run")
                st["failed"] = 1
        print(f"--resume: {len(self.steps)} steps done before ({', '.join(self.steps)})", flush=True)


class EmuHarness(Harness):
    """The same checks on the CPU emulator (kernels/emu): host tensors, every kernel run by
    libsparsemoe_kernels_emu.so on the CPU. No timings or ceilings: it shows the kernels compute
    what the references do, never how fast. With smoke, the timing steps run at tiny shapes, each
    timing one call: their Python, shapes and launches are exercised, their times mean nothing."""

    def __init__(self, out_dir, lib, quick=True, smoke=False):
        import ctypes

        self.ct = ctypes
        self.lib = ctypes.CDLL(lib)
        self.lib.smoe_emu_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 4 + [ctypes.c_ulonglong,
                                                                                        ctypes.POINTER(ctypes.c_void_p)]
        self.init_results(out_dir, quick)
        self.on_gpu, self.smoke = False, smoke
        self.sms = 132  # an H200's, so that the timings' split rules take the paths they take there
        self.dev = torch.device("cpu")
        self.card = "the CPU emulator (kernels/emu), not a GPU"
        self.cp = type("NoCupy", (), {"__version__": "none (emulated)"})

    def launch(self, name, grid, block, args, smem=0):
        ct = self.ct
        values = []
        for a in args:
            if isinstance(a, torch.Tensor):  # its first element, as on the GPU (views pass their strides)
                values.append(ct.c_void_p(a.data_ptr()))
            elif isinstance(a, tuple):
                values.append({"i": ct.c_int32, "l": ct.c_int64, "f": ct.c_float, "p": ct.c_void_p}[a[0]](a[1]))
            else:
                raise TypeError(a)
        params = (ct.c_void_p * len(values))(*[ct.cast(ct.pointer(v), ct.c_void_p) for v in values])
        g = [int(x) for x in grid] + [1] * (3 - len(grid))
        rc = self.lib.smoe_emu_launch(name.encode(), g[0], g[1], g[2], int(block), int(smem), params)
        if rc != 0:
            raise RuntimeError(f"{name}: {'no such kernel' if rc == 1 else 'a launch a GPU refuses'}")


class Interrupted(BaseException):
    """SIGTERM (timeout's): ends the step in hand, whose results so far are written."""


def step_list(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"no step {', '.join(unknown)} (the steps: {', '.join(STEPS)})")
    return names


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/sparsemoe-gpu-check"))
    ap.add_argument("--quick", action="store_true", help="skip the SIMT grouped GEMM fallback's timing")
    ap.add_argument("--cpu-selftest", action="store_true")
    ap.add_argument("--emulate", metavar="LIB", help="run the checks (not the timings) on the CPU emulator: "
                    "target/cuda-emu/libsparsemoe_kernels_emu.so from kernels/emu/build.sh")
    ap.add_argument("--smoke", action="store_true", help="with --emulate: the timing steps (by default only "
                    "those) at tiny shapes, one launch a timing, to find their Python and shape errors")
    ap.add_argument("--steps", type=step_list, help="only these steps, comma-separated (--list-steps)")
    ap.add_argument("--skip", type=step_list, default=[], help="not these steps")
    ap.add_argument("--list-steps", action="store_true", help="print the steps in their order")
    ap.add_argument("--resume", action="store_true", help="add to --out's results, running only the steps "
                    "not run yet (a step the last process died in counts as run: crashed)")
    ap.add_argument("--seed", type=int, help="the inputs' seed (default: a fresh one, printed); a step's "
                    "inputs depend only on it and the step's name")
    ap.add_argument("--prebuild", metavar="DIR", help="compile every .cu to DIR with nvcc (no GPU), for "
                    "kernels/gpu-build.sh")
    ap.add_argument("--check-cubins", action="store_true", help="whether --cubins holds a cubin of the current "
                    "sources of every .cu (exit 1 if not); no GPU, torch or numpy")
    ap.add_argument("--nvcc", default=os.environ.get("NVCC") or "nvcc")
    ap.add_argument("--cubins", default=PREBUILT, help="prebuilt cubins and their manifest (default %(default)s)")
    ap.add_argument("--build-dir", help="where cubins compiled here go and are reused from (default: a "
                    "fresh temporary directory)")
    args = ap.parse_args()
    if args.list_steps:
        print("\n".join(STEPS))
        return 0
    if args.prebuild:
        return prebuild(args.prebuild, args.nvcc)
    if args.check_cubins:
        stale = [src for src in SOURCES if not cubin_of(src, [args.cubins])]
        print(f"cubins in {args.cubins}: " + (f"missing or stale: {', '.join(stale)}" if stale else
                                                f"all {len(SOURCES)} built from these sources"))
        return 1 if stale else 0
    if torch is None:
        sys.exit("gpu_check.py: needs numpy and PyTorch (all but --prebuild, --check-cubins and --list-steps)")
    if args.cpu_selftest:
        return cpu_selftest()
    if args.steps:
        chosen = args.steps
    elif args.emulate:
        chosen = TIME_STEPS if args.smoke else CHECK_STEPS
    else:
        chosen = STEPS
    chosen = [n for n in STEPS if n in chosen and n not in args.skip]  # always in STEPS' order
    if args.emulate and not args.smoke and any(n in TIME_STEPS for n in chosen):
        sys.exit("gpu_check.py: the timing steps run on the emulator only with --smoke")
    os.makedirs(args.out, exist_ok=True)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
    print(f"seed {seed} (--seed {seed} --steps NAME repeats a step's inputs)", flush=True)

    def on_term(*_):
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_term)
    if args.emulate:
        h = EmuHarness(args.out, args.emulate, quick=args.quick, smoke=args.smoke)
    else:
        build = args.build_dir or tempfile.mkdtemp(prefix="sparsemoe-cubins-")
        h = Harness(args.out, args.quick, build, [args.cubins, build])
    if args.resume:
        h.load_state()
    h.seeds.append(seed)
    h.record_module_errors()
    plan = [n for n in chosen if n not in h.steps]
    print(f"steps: {', '.join(plan) or 'none left'}", flush=True)
    h.write()
    lost = interrupted = False
    for i, name in enumerate(plan):
        fn = getattr(h, name if name in TIME_STEPS else "check_" + name)
        h.steps[name] = {"status": "running", "seconds": None, "failed": 0}
        h.write()
        torch.manual_seed((seed + zlib.crc32(name.encode())) % 2 ** 63)
        failed0, t0, status = h.failed, time.time(), "interrupted"
        print(f"== step {name}", flush=True)
        try:
            fn()
            h.sync()  # a fault of the step's last launches is the step's
            status = "pass"
        except Interrupted:
            interrupted = True
            print(f"step {name}: interrupted (SIGTERM: out of time?)", flush=True)
        except Exception as e:  # one broken kernel must not hide the others' results
            traceback.print_exc()
            status = "raised"
            h.record_bool(name, False, f"raised {type(e).__name__}: {' '.join(str(e).split())[:400]}")
            if h.on_gpu and not h.context_ok():
                status, lost = "raised; CUDA context lost", True
        finally:
            failed = h.failed - failed0
            if status == "pass" and failed:
                status = "FAIL"
            h.steps[name] = {"status": status, "seconds": round(time.time() - t0, 1), "failed": failed}
            h.write()
            print(f"step {name}: {status} in {time.time() - t0:.1f} s ({failed} checks failed)", flush=True)
        if interrupted:
            return 124
        left = plan[i + 1:]
        if lost and left:
            print(f"the CUDA context is lost: {len(left)} steps left ({', '.join(left)}); "
                  f"`--resume` runs them in a fresh process (gpu-check.sh does)", flush=True)
            sys.stderr.flush()
            os._exit(3)  # not through the CUDA libraries' teardown, which a broken context can hang
    h.write(final=True)
    not_run = [n for n in chosen if h.steps.get(n, {}).get("status") != "pass"]
    print((f"{h.failed} checks failed" if h.failed else "all checks passed")
          + (f"; steps not passed: {', '.join(not_run)}" if not_run else ""))
    return 1 if h.failed or not_run else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile every Triton kernel of fastkd.triton for the GPU, on a machine without one.

The interpreter (TRITON_INTERPRET=1, set by conftest.py) runs the kernels' math
on CPU tensors but never lowers them, so it cannot see what only the GPU
compiler sees: lowering errors, register spills, shared memory over the limit.
This test compiles each kernel through TTIR -> TTGIR -> LLVM -> PTX -> cubin
with ``triton.compile`` for sm_90 and sm_80 (the wheel ships ptxas; no driver
or GPU is needed) and fails on any compile error, any spill in a row kernel, or
shared memory above the per-block limit.

Why subprocesses: under TRITON_INTERPRET=1 ``@triton.jit`` returns interpreter
objects, not JITFunctions (kernel and helper functions alike: the kernels call
``online_update`` etc. through their module globals), and the interpreter
patches ``triton.language`` while it runs. The compile therefore runs in fresh
interpreters without TRITON_INTERPRET (``python tests/test_triton_compile.py
SHARD N``), one per core, each with its own empty Triton cache (nothing is
reused across runs), and reports one JSON line per compile.

The matrix (see ``jobs``):
  A. every constexpr combination x every input dtype (pair) at the launcher's
     widest row config (BLOCK 4096; 16 warps, KD/ATS 8), sm_90;
  B. every (BLOCK, num_warps) the launcher can pick (``_common.row_config`` over
     class counts covering each branch; the DIST statistics tile for every batch
     size class) x every dtype pair, with every gradient requested (the most
     live values), sm_90;
  C. the register-pressure subset for sm_80: B with the dtype pairs
     (f32, f32), (bf16, bf16) and (bf16, f32) only.
The adaptive KL (``akl._akl_kernel``) gets every launcher config on sm_90 and sm_80 (``_akl_jobs``).
The divergence kernels (``divergence._div_dense_kernel`` / ``_div_topk_kernel``) get a
smaller matrix (``_div_jobs``): A over their constexprs for (bf16, bf16) plus four dtype
pairs fully requested, B over their launcher configs for (bf16, bf16), C at the widest config.
Integer arguments are specialised as the launcher's JIT would see them on a
typical batch: pointers and row strides 16-divisible, unit strides constant 1.
"""
import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DTYPES = ("fp32", "fp16", "bf16")
PAIRS = list(itertools.product(DTYPES, DTYPES))  # (student, teacher): the launchers allow any pair
SM80_PAIRS = [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")]
BOOLS = (False, True)
# Shared memory a block may use: 228 KiB on sm_90, 163 KiB on sm_80 (dynamic, opt-in).
SHARED_LIMIT = {90: 228 * 1024, 80: 163 * 1024}
REGS_PER_SM = 65536


def row_configs(kernel=None):
    """Every (BLOCK, num_warps) the row launchers pick (``_common.row_config``; KD/ATS through
    ``kd.kd_row_config``), from class counts covering each branch."""
    from fastkd.triton._common import row_config
    from fastkd.triton.kd import kd_row_config

    config = kd_row_config if kernel in ("kd", "ats") else row_config
    counts = [1, 10, 17, 50, 100, 200, 300, 600, 1000, 1500, 3000, 4096, 32000, 131072]
    return sorted({config(c) for c in counts})


def stats_configs():
    """(BLOCK_R, BLOCK_C) of the DIST statistics kernel for every batch size class (dist.dist_fwd)."""
    from fastkd.triton import dist

    out = set()
    for n in (1, 2, 3, 5, 9, 16, 1000):
        block_r = min(dist.STATS_BLOCK_R, 1 << (n - 1).bit_length())
        out.add((block_r, dist.STATS_TILE // block_r))
    return sorted(out)


# Argument types per kernel: s / t stand for the student / teacher element type,
# "D" marks a 16-divisible integer (the JIT's specialisation), 1 a unit stride
# (which the JIT turns into the constant 1).
def _kd_args(s, t, is_ats):
    return {
        "S": f"*{s}", "T": f"*{t}", "TEMP": "*fp32", "TGT": "*i64" if is_ats else "*fp32", "W": "*fp32",
        "LOSS": "*fp32", "GS": f"*{s}", "GT": f"*{t}", "GTEMP": "*fp32",
        "stride_s": "D", "stride_t": "D", "stride_gs": "D", "stride_gt": "D", "stride_temp": 1, "stride_w": 1,
        "n_cols": "D", "inv_student_temp": "fp32", "inv_target_temp": "fp32", "inv_other_temp": "fp32",
        "ats_scale": "fp32",
    }


def _dkd_args(s, t):
    return {
        "S": f"*{s}", "T": f"*{t}", "TGT": "*i64", "W": "*fp32", "LOSS": "*fp32", "GS": f"*{s}", "GT": f"*{t}",
        "stride_s": "D", "stride_t": "D", "stride_gs": "D", "stride_gt": "D", "stride_w": 1,
        "n_cols": "D", "inv_temp": "fp32", "alpha": "fp32", "beta": "fp32", "temp": "fp32",
    }


def _dist_lse_args(s, t):
    return {"S": f"*{s}", "T": f"*{t}", "LSE": "*fp32", "stride_s": "D", "stride_t": "D", "n_rows": "D",
            "n_cols": "D", "inv_temp": "fp32"}


def _dist_stats_args(s, t):
    return {"S": f"*{s}", "T": f"*{t}", "LSE": "*fp32", "ROWPART": "*fp32", "COLPART": "*fp32",
            "stride_s": "D", "stride_t": "D", "n_rows": "D", "n_cols": "D", "rows_per_slice": "D",
            "inv_temp": "fp32", "inv_c": "fp32"}


def _dist_grad_args(s, t):
    return {"S": f"*{s}", "T": f"*{t}", "ROWC": "*fp32", "COLC": "*fp32", "GS": f"*{s}", "GT": f"*{t}",
            "stride_s": "D", "stride_t": "D", "stride_gs": "D", "stride_gt": "D", "n_rows": "D", "n_cols": "D",
            "inv_temp": "fp32", "inv_c": "fp32"}


def _div_dense_args(s, t, has_target):
    # without a target the launcher passes row_weight (float32) as the unused target pointer
    return {"S": f"*{s}", "T": f"*{t}", "TGT": "*i64" if has_target else "*fp32", "W": "*fp32", "LOSS": "*fp32",
            "SOFT": "*fp32", "HARD": "*fp32", "GS": f"*{s}", "GT": f"*{t}",
            "stride_s": "D", "stride_t": "D", "stride_gs": "D", "stride_gt": "D", "stride_w": 1,
            "n_cols": "D", "inv_temp": "fp32", "inv_temp_t": "fp32", "a": "fp32", "b": "fp32", "w_p": "fp32",
            "w_q": "fp32", "soft_scale": "fp32", "ce_weight": "fp32", "log_v": "fp32"}


def _div_topk_args(s, t, has_target):
    return {"S": f"*{s}", "LPT": f"*{t}", "IDS": "*i64", "SIDS": "*i64", "TGT": "*i64" if has_target else "*fp32",
            "W": "*fp32", "LOSS": "*fp32", "SOFT": "*fp32", "HARD": "*fp32", "GS": f"*{s}", "GT": f"*{t}",
            "stride_s": "D", "stride_lp": "D", "stride_ids": "D", "stride_gs": "D", "stride_gt": "D", "stride_w": 1,
            "n_cols": "D", "n_k": "i32", "inv_temp": "fp32", "a": "fp32", "b": "fp32", "w_p": "fp32", "w_q": "fp32",
            "soft_scale": "fp32", "ce_weight": "fp32", "log_v": "fp32"}


def div_row_configs():
    """Every (BLOCK, num_warps) the divergence launcher picks (``divergence.div_row_config``)."""
    from fastkd.triton.divergence import div_row_config

    counts = [1, 10, 17, 50, 100, 200, 300, 600, 1000, 1500, 3000, 32000, 131072]
    return sorted({div_row_config(c) for c in counts})


# The divergence kernels' matrix is smaller than the other kernels' (keeping the added run time
# under a minute on 2 cores): A over the flags that change the code's live values (kind, tail,
# gradients; a target only adds a sum) for (bf16, bf16) at the widest config, plus the dtype pairs
# that change a load or store type; B over every launcher config (dense; top-k at three);
# C: sm_80 at the widest config.
DIV_PAIRS = [("fp32", "fp32"), ("fp16", "fp16"), ("fp32", "bf16")]
DIV_SM80_PAIRS = [("fp32", "fp32"), ("bf16", "bf16")]
DIV_KP = (64, 256)  # top-k widths (next power of two of K): a typical K = 64 and a wide one


def _div_jobs(add):
    from fastkd.triton.divergence import DIV_MAX_BLOCK, div_row_config, div_topk_config

    block, warps = div_row_config(DIV_MAX_BLOCK)

    def add_dense(arch, dtypes, consts, warps, matrix):  # the dense kernel's constexprs with defaults, explicit
        add("div_dense", arch, dtypes, dict(dict(SUMS_KNOWN=False, CROSS=0), **consts), warps, matrix)
    full = dict(HAS_TARGET=True, GRAD_S=True, GRAD_T=True)
    bf = ("bf16", "bf16")
    for kind, gs, gt in itertools.product((0, 1), BOOLS, BOOLS):
        add_dense(90, bf, dict(KIND=kind, HAS_TARGET=True, GRAD_S=gs, GRAD_T=gt, BLOCK=block), warps, "A")
        add_dense(90, bf, dict(KIND=kind, HAS_TARGET=False, GRAD_S=True, GRAD_T=True, BLOCK=block), warps, "A")
    # the entropy gate (kind 7: its three sums, then kind 2's gradients at the row's gate), dense and top-k
    add_dense(90, bf, dict(KIND=7, **full, BLOCK=block), warps, "A")
    for tail in BOOLS:
        add("div_topk", 90, bf, dict(KIND=7, TAIL=tail, **full, BLOCK=block, KP=DIV_KP[0]), warps, "A")
    # the power divergences (kind 4: AB; kind 6: Renyi, its U, S then kind 5's gradients at the row's 1 / S)
    for kind in (4, 6):
        add_dense(90, bf, dict(KIND=kind, **full, BLOCK=block), warps, "A")
        add("div_topk", 90, bf, dict(KIND=kind, TAIL=True, **full, BLOCK=block, KP=DIV_KP[0]), warps, "A")
    # the two-pass path (forward / reverse KL: SUMS_KNOWN, CROSS the KL that pass 1 sums)
    for cross, gs, gt in ((2, True, False), (2, True, True), (1, False, True), (1, True, True), (0, True, False),
                          (0, False, True)):
        add_dense(90, bf, dict(KIND=0, HAS_TARGET=True, GRAD_S=gs, GRAD_T=gt, BLOCK=block, SUMS_KNOWN=True,
                                      CROSS=cross), warps, "A")
    for tail, gs, gt in itertools.product(BOOLS, BOOLS, BOOLS):
        add("div_topk", 90, bf, dict(KIND=0, TAIL=tail, HAS_TARGET=True, GRAD_S=gs, GRAD_T=gt, BLOCK=block,
                                     KP=DIV_KP[0]), warps, "A")
    for tail in BOOLS:
        add("div_topk", 90, bf, dict(KIND=0, TAIL=tail, HAS_TARGET=False, GRAD_S=True, GRAD_T=True, BLOCK=block,
                                     KP=DIV_KP[0]), warps, "A")
        add("div_topk", 90, bf, dict(KIND=1, TAIL=tail, **full, BLOCK=block, KP=DIV_KP[0]), warps, "A")
    for s, t in DIV_PAIRS:
        add_dense(90, (s, t), dict(KIND=0, **full, BLOCK=block), warps, "A")
        add("div_topk", 90, (s, t), dict(KIND=0, TAIL=True, **full, BLOCK=block, KP=DIV_KP[0]), warps, "A")
    for b, w in div_row_configs():
        add_dense(90, bf, dict(KIND=0, **full, BLOCK=b), w, "B")
    for n_cols in (10, 300, 32000):  # the narrowest, a middle and the widest block
        for kp in DIV_KP:
            b, w = div_topk_config(n_cols, kp)
            add("div_topk", 90, bf, dict(KIND=0, TAIL=True, **full, BLOCK=b, KP=kp), w, "B")
    for s, t in DIV_SM80_PAIRS:
        add_dense(80, (s, t), dict(KIND=0, **full, BLOCK=block), warps, "C")
        add_dense(80, (s, t), dict(KIND=0, **full, BLOCK=block, SUMS_KNOWN=True, CROSS=2), warps, "C")
        add("div_topk", 80, (s, t), dict(KIND=0, TAIL=True, **full, BLOCK=block, KP=DIV_KP[1]),
            div_topk_config(DIV_MAX_BLOCK, DIV_KP[1])[1], "C")


def _shard_stats_args(s, t):
    return {"S": f"*{s}", "T": f"*{t}", "READ": "*fp32", "OUT": "*fp32", "stride_s": "D", "stride_t": "D",
            "n_cols": "D", "inv_temp": "fp32"}


def _shard_terms_args(s, t, g="fp32"):
    # g: the gradient buffers' type (float32, or the logits' own for bf16/fp16 logits)
    return {"S": f"*{s}", "T": f"*{t}", "STATS": "*fp32", "READ": "*fp32", "DIRECT": "*fp32", "TARGET": "*i64",
            "SUMS": "*fp32", "G": f"*{g}", "H": f"*{g}", "stride_s": "D", "stride_t": "D", "stride_g": "D",
            "stride_h": "D", "n_cols": "D", "inv_temp": "fp32", "a": "fp32", "b": "fp32", "w_p": "fp32", "w_q": "fp32"}


def _shard_grad_args(s, t, g="fp32"):
    return {"S": f"*{s}", "T": f"*{t}", "STATS": "*fp32", "COEF": "*fp32", "READ": "*fp32", "TARGET": "*i64",
            "G": f"*{g}", "H": f"*{g}", "stride_s": "D", "stride_t": "D", "stride_g": "D", "stride_h": "D",
            "n_cols": "D", "inv_temp": "fp32", "a": "fp32", "b": "fp32", "w_p": "fp32", "w_q": "fp32"}


def _shard_jobs(add):
    """The vocabulary-parallel shard kernels (``divergence_shard``): float32 logits and buffers (G, H stored
    by the terms pass), and bf16/fp16 logits with buffers of their dtype (terms stores nothing but the
    direct gradient; grad recomputes G, H: RECOMPUTE); every flag at the widest config on sm_90, everything
    requested on sm_80 and at every config. dtypes: (student, teacher, gradient buffers)."""
    from fastkd.triton._common import MAX_ROW_BLOCK, row_config

    block, warps = row_config(MAX_ROW_BLOCK)
    f32 = ("fp32", "fp32", "fp32")
    low = [("bf16", "bf16", "bf16"), ("fp16", "fp16", "fp16")]
    for arch in (90, 80):
        tag = "A" if arch == 90 else "C"
        for d, ce in itertools.product([f32] + low, BOOLS if arch == 90 else (True,)):
            add("shard_stats", arch, d[:2], dict(HAS_CE=ce, BLOCK=block), warps, tag)
        for kind, gs, gt in itertools.product((0, 1), BOOLS, BOOLS):
            if arch == 90 or (gs and gt):
                add("shard_terms", arch, f32, dict(KIND=kind, GRAD_S=gs, GRAD_T=gt, STORE_GRAD=False, ONE_HOT=False,
                                                   BLOCK=block), warps, tag)
        for d, kind in itertools.product(low, (0, 1)):  # bf16/fp16 buffers: the sums only
            add("shard_terms", arch, d, dict(KIND=kind, GRAD_S=False, GRAD_T=False, STORE_GRAD=False, ONE_HOT=False,
                                             BLOCK=block), warps, tag)
        if arch == 90:  # the entropy gate (kind 7): terms store nothing, grad evaluates kind 2 at the row's gate
            add("shard_terms", arch, f32, dict(KIND=7, GRAD_S=False, GRAD_T=False, STORE_GRAD=False, ONE_HOT=False,
                                               BLOCK=block), warps, tag)
            add("shard_grad", arch, f32, dict(KIND=7, GRAD_S=True, GRAD_T=True, RECOMPUTE=True, ONE_HOT=True,
                                              BLOCK=block), warps, tag)
            # the power divergences: AB stores G, H; Renyi stores nothing, its grad evaluates kind 5 at 1 / S
            add("shard_terms", arch, f32, dict(KIND=4, GRAD_S=True, GRAD_T=True, STORE_GRAD=False, ONE_HOT=False,
                                               BLOCK=block), warps, tag)
            add("shard_terms", arch, f32, dict(KIND=6, GRAD_S=False, GRAD_T=False, STORE_GRAD=False, ONE_HOT=False,
                                               BLOCK=block), warps, tag)
            add("shard_grad", arch, f32, dict(KIND=6, GRAD_S=True, GRAD_T=True, RECOMPUTE=True, ONE_HOT=True,
                                              BLOCK=block), warps, tag)
        # forward KL with no teacher gradient: the student's gradient from the terms pass, with the CE's one-hot
        for d, one_hot in itertools.product([f32] + low, BOOLS if arch == 90 else (True,)):
            add("shard_terms", arch, d, dict(KIND=0, GRAD_S=True, GRAD_T=False, STORE_GRAD=True, ONE_HOT=one_hot,
                                             BLOCK=block), warps, tag)
        for d, kind, (gs, gt) in itertools.product([f32] + low, (0, 1), ((True, True), (True, False), (False, True))):
            for one_hot in (BOOLS if arch == 90 else (True,)) if gs else (False,):  # (a one-hot needs GRAD_S)
                if arch == 90 or (gs and gt):
                    add("shard_grad", arch, d, dict(KIND=kind, GRAD_S=gs, GRAD_T=gt, RECOMPUTE=d != f32,
                                                    ONE_HOT=one_hot, BLOCK=block), warps, tag)
    for (b, w), d in itertools.product(row_configs(), [f32] + low[:1]):
        add("shard_terms", 90, d, dict(KIND=0, GRAD_S=d == f32, GRAD_T=d == f32, STORE_GRAD=False, ONE_HOT=False,
                                       BLOCK=b), w, "B")
        add("shard_terms", 90, d, dict(KIND=0, GRAD_S=True, GRAD_T=False, STORE_GRAD=True, ONE_HOT=True, BLOCK=b),
            w, "B")
        add("shard_grad", 90, d, dict(KIND=0, GRAD_S=True, GRAD_T=True, RECOMPUTE=d != f32, ONE_HOT=True, BLOCK=b),
            w, "B")


def _mask_args(x):
    # seed_mix and threshold are uint32 values passed as Python ints (i64 above 2^31)
    return {"X": f"*{x}", "OUT": f"*{x}", "numel": "D", "seed_mix": "i64", "threshold": "i64"}


def _sq_err_args(p, t):
    return {"P": f"*{p}", "T": f"*{t}", "PART": "*fp32", "GP": f"*{p}", "GT": f"*{t}", "numel": "D",
            "scale": "fp32"}


def jobs():
    """The compile matrix (module docstring): dicts of kernel, arch, dtypes, constexprs, num_warps."""
    from fastkd.triton import dist, mgd
    from fastkd.triton._common import MAX_ROW_BLOCK, row_config
    from fastkd.triton.kd import kd_row_config

    out = []

    seen = set()

    def add(kernel, arch, dtypes, consts, warps, matrix):
        key = (kernel, arch, tuple(dtypes), tuple(sorted(consts.items())), warps)
        if key not in seen:  # A and B overlap at the widest config
            seen.add(key)
            out.append({"kernel": kernel, "arch": arch, "dtypes": list(dtypes), "constexprs": consts,
                        "num_warps": warps, "matrix": matrix})

    wide_block, wide_warps = row_config(MAX_ROW_BLOCK)
    kd_warps = kd_row_config(MAX_ROW_BLOCK)[1]
    # A: every constexpr combination x dtype, widest row config, sm_90
    for s, t in PAIRS:
        for gs, gt, gtemp in itertools.product(BOOLS, BOOLS, BOOLS):
            add("kd", 90, (s, t), dict(IS_ATS=False, GRAD_S=gs, GRAD_T=gt, GRAD_TEMP=gtemp, BLOCK=wide_block),
                kd_warps, "A")
        for gs, gt in itertools.product(BOOLS, BOOLS):
            add("ats", 90, (s, t), dict(IS_ATS=True, GRAD_S=gs, GRAD_T=gt, GRAD_TEMP=False, BLOCK=wide_block),
                kd_warps, "A")
            add("dkd", 90, (s, t), dict(GRAD_S=gs, GRAD_T=gt, BLOCK=wide_block), wide_warps, "A")
            if gs or gt:  # dist_fwd launches the gradient kernel only when one is asked for
                add("dist_grad", 90, (s, t), dict(GRAD_S=gs, GRAD_T=gt, BLOCK=wide_block), wide_warps, "A")
            add("sq_err", 90, (s, t), dict(GRAD_P=gs, GRAD_T=gt, BLOCK=mgd.ELEM_BLOCK), mgd.ELEM_WARPS, "A")
    for x in DTYPES:
        for spatial in BOOLS:
            # HW, CHW: a feature map shape (the values only set the division constants)
            add("mask", 90, (x,), dict(HW=14 * 14, CHW=256 * 14 * 14, SPATIAL=spatial, BLOCK=mgd.ELEM_BLOCK),
                mgd.ELEM_WARPS, "A")
    # B and C: every launcher config with everything requested
    for arch, pairs, matrix in ((90, PAIRS, "B"), (80, SM80_PAIRS, "C")):
        for s, t in pairs:
            for block, warps in row_configs("kd"):
                add("kd", arch, (s, t), dict(IS_ATS=False, GRAD_S=True, GRAD_T=True, GRAD_TEMP=True, BLOCK=block),
                    warps, matrix)
                add("ats", arch, (s, t), dict(IS_ATS=True, GRAD_S=True, GRAD_T=True, GRAD_TEMP=False, BLOCK=block),
                    warps, matrix)
            for block, warps in row_configs():
                add("dkd", arch, (s, t), dict(GRAD_S=True, GRAD_T=True, BLOCK=block), warps, matrix)
                add("dist_lse", arch, (s, t), dict(BLOCK=block), warps, matrix)
                add("dist_grad", arch, (s, t), dict(GRAD_S=True, GRAD_T=True, BLOCK=block), warps, matrix)
            for block_r, block_c in stats_configs():
                add("dist_stats", arch, (s, t), dict(BLOCK_R=block_r, BLOCK_C=block_c), dist.STATS_WARPS, matrix)
            add("sq_err", arch, (s, t), dict(GRAD_P=True, GRAD_T=True, BLOCK=mgd.ELEM_BLOCK), mgd.ELEM_WARPS, matrix)
        for x in sorted({p[0] for p in pairs}):
            add("mask", arch, (x,), dict(HW=14 * 14, CHW=256 * 14 * 14, SPATIAL=True, BLOCK=mgd.ELEM_BLOCK),
                mgd.ELEM_WARPS, matrix)
    _div_jobs(add)
    _shard_jobs(add)
    _akl_jobs(add)
    return out


def _akl_args(s, t, has_target):
    return {"S": f"*{s}", "T": f"*{t}", "TGT": "*i64" if has_target else "*fp32", "W": "*fp32", "LOSS": "*fp32",
            "SOFT": "*fp32", "HARD": "*fp32", "GS": f"*{s}", "GT": f"*{t}",
            "stride_s": "D", "stride_t": "D", "stride_gs": "D", "stride_gt": "D", "stride_w": 1,
            "n_cols": "D", "inv_temp": "fp32", "inv_temp_t": "fp32", "mu": "fp32", "soft_scale": "fp32",
            "ce_weight": "fp32"}


def _akl_jobs(add):
    """The adaptive KL (``akl._akl_kernel``): every launcher config with everything requested, (bf16, bf16) on
    sm_90 and (fp32, fp32) on sm_80; the student gradient alone without a target at the widest."""
    from fastkd.triton.akl import SEARCH_WAYS, search_block

    for arch, pair in ((90, ("bf16", "bf16")), (80, ("fp32", "fp32"))):
        for b, w in div_row_configs():
            add("akl", arch, pair, dict(HAS_TARGET=True, GRAD_S=True, GRAD_T=True, BLOCK=b, SBLOCK=search_block(b, w),
                                        WAYS=SEARCH_WAYS), w, "B" if arch == 90 else "C")
    b, w = div_row_configs()[-1]
    add("akl", 90, ("fp32", "fp32"), dict(HAS_TARGET=False, GRAD_S=True, GRAD_T=False, BLOCK=b,
                                          SBLOCK=search_block(b, w), WAYS=SEARCH_WAYS), w, "A")


def _kernel_and_args(job):
    from fastkd.triton import dist, dkd, kd, mgd

    d = job["dtypes"]
    name = job["kernel"]
    if name in ("kd", "ats"):
        return kd._kd_kernel, _kd_args(d[0], d[1], name == "ats")
    if name in ("div_dense", "div_topk"):
        from fastkd.triton import divergence

        has_target = job["constexprs"]["HAS_TARGET"]
        if name == "div_dense":
            return divergence._div_dense_kernel, _div_dense_args(d[0], d[1], has_target)
        return divergence._div_topk_kernel, _div_topk_args(d[0], d[1], has_target)
    if name == "akl":
        from fastkd.triton import akl

        return akl._akl_kernel, _akl_args(d[0], d[1], job["constexprs"]["HAS_TARGET"])
    if name.startswith("shard_"):
        from fastkd.triton import divergence_shard as shard

        kernel = getattr(shard, f"_{name}_kernel")
        return kernel, {"shard_stats": _shard_stats_args, "shard_terms": _shard_terms_args,
                        "shard_grad": _shard_grad_args}[name](*d)
    table = {
        "dkd": (dkd._dkd_kernel, _dkd_args),
        "dist_lse": (dist._dist_lse_kernel, _dist_lse_args),
        "dist_stats": (dist._dist_stats_kernel, _dist_stats_args),
        "dist_grad": (dist._dist_grad_kernel, _dist_grad_args),
        "mask": (mgd._mgd_mask_kernel, _mask_args),
        "sq_err": (mgd._sq_err_kernel, _sq_err_args),
    }
    kernel, make = table[name]
    return kernel, make(*d)


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def compile_job(job):
    """Compile one job; returns the job with registers, spills, stack, shared memory, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, args = _kernel_and_args(job)
    assert type(kernel).__name__ == "JITFunction", "compile with TRITON_INTERPRET unset"
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in job["constexprs"]:
            signature[name], constexprs[name] = "constexpr", job["constexprs"][name]
        elif args[name] == 1:
            signature[name], constexprs[name] = "constexpr", 1
        elif args[name] == "D":
            signature[name], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
        else:
            signature[name] = args[name]
            if args[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
    missing = set(args) - set(kernel.arg_names)
    assert not missing, f"{job['kernel']}: unknown arguments {missing}"
    log = io.StringIO()
    result = dict(job)
    try:
        with contextlib.redirect_stdout(log):  # ptxas -v output (knobs.nvidia.dump_ptxas_log)
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", job["arch"], 32),
                                      options={"num_warps": job["num_warps"]})
    except Exception as exc:  # any lowering or ptxas error fails the test with its message
        result["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
        return result
    text = log.getvalue()
    for key, pattern in _PTXAS.items():
        found = [int(x) for x in pattern.findall(text)]
        result[key] = max(found) if found else (None if key == "regs" else 0)
    result["shared"] = compiled.metadata.shared
    return result


def _worker(shard, n_shards):
    import triton

    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # a cache hit would print no ptxas report
    for job in jobs()[shard::n_shards]:
        print(json.dumps(compile_job(job)), flush=True)


def _label(r):
    c = r["constexprs"]
    block = c.get("BLOCK", c.get("BLOCK_C"))
    extra = f" R{c['BLOCK_R']}" if "BLOCK_R" in c else ""
    extra += f" KP={c['KP']}" if "KP" in c else ""
    return f"BLOCK={block}{extra} w={r['num_warps']}"


def summary(results):
    """Per (kernel, arch, config): worst registers, spills, shared memory over its dtypes and flags."""
    rows = {}
    for r in results:
        key = (r["kernel"], r["arch"], _label(r))
        worst = rows.setdefault(key, {"regs": 0, "spills": 0, "shared": 0, "n": 0})
        worst["regs"] = max(worst["regs"], r["regs"] or 0)
        worst["spills"] = max(worst["spills"], r["spill_stores"] + r["spill_loads"])
        worst["shared"] = max(worst["shared"], r["shared"])
        worst["n"] += 1
    lines = ["| kernel | sm | config | compiles | max registers | spill bytes | shared bytes |", "|---|---|---|---|---|---|---|"]
    for (kernel, arch, label), w in sorted(rows.items(), key=lambda x: (x[0][0], -x[0][1], x[0][2])):
        lines.append(f"| {kernel} | {arch} | {label} | {w['n']} | {w['regs']} | {w['spills']} | {w['shared']} |")
    return "\n".join(lines)


def run_all(n_workers):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    results, errors = [], []
    with tempfile.TemporaryDirectory() as cache:
        procs = []
        for shard in range(n_workers):
            # a fresh, empty cache per worker: every kernel is compiled in this run
            wenv = dict(env, TRITON_CACHE_DIR=os.path.join(cache, str(shard)))
            procs.append(subprocess.Popen([sys.executable, __file__, str(shard), str(n_workers)], env=wenv,
                                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for p in procs:
            out, err = p.communicate()
            if p.returncode != 0:
                errors.append(f"worker exited with {p.returncode}:\n{err[-3000:]}")
            results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return results, errors


def test_every_triton_kernel_compiles_for_sm90_and_sm80():
    pytest.importorskip("triton.backends.nvidia", reason="this triton has no NVIDIA backend to compile for sm_80/sm_90")
    from fastkd.triton._common import MAX_ROW_BLOCK  # noqa: F401  (the package imports here too)

    expected = len(jobs())
    results, errors = run_all(max(1, min(2, os.cpu_count() or 1)))
    assert not errors, "\n".join(errors)
    assert len(results) == expected, f"{len(results)} of {expected} compiles reported"
    print("\n" + summary([r for r in results if "error" not in r]))
    failures = [f"{r['kernel']} sm_{r['arch']} {r['dtypes']} {r['constexprs']} w={r['num_warps']}: {r['error']}"
                for r in results if "error" in r]
    assert not failures, "compile errors:\n" + "\n".join(failures[:10])
    problems = []
    for r in results:
        what = f"{r['kernel']} sm_{r['arch']} {r['dtypes']} {r['constexprs']} num_warps={r['num_warps']}"
        if r["regs"] is None:
            problems.append(f"{what}: no ptxas register report")
            continue
        if r["spill_stores"] or r["spill_loads"] or r["stack"]:
            problems.append(f"{what}: spills {r['spill_stores']}+{r['spill_loads']} bytes, stack {r['stack']}")
        if r["regs"] * 32 * r["num_warps"] > REGS_PER_SM:
            problems.append(f"{what}: {r['regs']} registers x {32 * r['num_warps']} threads > {REGS_PER_SM}")
        if r["shared"] > SHARED_LIMIT[r["arch"]]:
            problems.append(f"{what}: shared memory {r['shared']} > {SHARED_LIMIT[r['arch']]}")
    assert not problems, "\n".join(problems)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]))

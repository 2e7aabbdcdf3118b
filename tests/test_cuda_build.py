"""The CUDA build, checked without a GPU.

- setup.py's decision to build the CUDA kernels (a GPU, FASTKD_BUILD_CUDA, FASTKD_NO_CUDA; fake torch /
  nvcc version strings), the architectures and why, and the extension it would compile (sources, nvcc
  flags, -gencode) for FASTKD_BUILD_CUDA=1, without compiling it;
- every csrc/cuda/*.cu compiles for sm_80 and sm_90 with setup.py's nvcc flags and no
  kernel spills registers (ptxas -v); the register table is printed (pytest -s) and
  written to $FASTKD_PTXAS_TABLE when that is set;
- the per-launch integer division of the MGD mask kernel (csrc/cuda/fast_div.h)
  equals `/`, compiled for the host.
The .cu files include no torch headers, so each compiles in seconds to a minute.
"""
import concurrent.futures
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
ARCHS = (80, 90)


def load_setup():
    """setup.py as a module: its helpers only (setup() runs under __main__ alone)."""
    spec = importlib.util.spec_from_file_location("fastkd_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETUP = load_setup()
NVCC_13 = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\nBuild cuda_13.0\n"
NVCC_12 = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.4, V12.4.131\n"


def test_nvcc_release_is_read_from_version_text():
    assert SETUP.nvcc_release(NVCC_13) == "13.0"
    assert SETUP.nvcc_release(NVCC_12) == "12.4"
    assert SETUP.nvcc_release("no version here") is None
    assert SETUP.nvcc_release(None) is None


def test_cuda_is_built_when_major_versions_match():
    assert SETUP.cuda_skip_reason("13.0", NVCC_13) is None
    assert SETUP.cuda_skip_reason("13.1", NVCC_13) is None  # a minor difference is fine for torch
    assert SETUP.cuda_skip_reason("12.8", NVCC_12) is None


def test_cuda_major_mismatch_builds_cpu_only_and_says_why():
    reason = SETUP.cuda_skip_reason("13.0", NVCC_12)
    assert reason is not None and "12.4" in reason and "13.0" in reason
    reason = SETUP.cuda_skip_reason("12.8", NVCC_13)
    assert reason is not None and "13.0" in reason and "12.8" in reason


def test_cuda_skipped_without_cuda_torch_or_nvcc():
    assert "no CUDA" in SETUP.cuda_skip_reason(None, NVCC_13)
    assert "nvcc" in SETUP.cuda_skip_reason("13.0", None)
    assert "cannot read" in SETUP.cuda_skip_reason("13.0", "garbage")


H100 = [("NVIDIA H100 80GB HBM3", (9, 0))]


def test_cuda_kernels_are_built_with_a_gpu_or_when_asked():
    def request(gpus=(), **env):
        return SETUP.cuda_request(env, list(gpus))

    want, required, why = request()
    assert (want, required) == (False, False) and "no GPU" in why and "FASTKD_BUILD_CUDA=1" in why
    want, required, why = request(H100)
    assert (want, required) == (True, False) and "H100" in why and "sm_90" in why
    assert request(FASTKD_BUILD_CUDA="1")[:2] == (True, True)  # CI: without a GPU, and an error if it cannot
    assert request(H100, FASTKD_BUILD_CUDA="0")[:2] == (False, False)
    assert request(H100, FASTKD_NO_CUDA="1") == (False, False, "FASTKD_NO_CUDA=1")
    assert request(FASTKD_NO_CUDA="0")[:2] == (False, False)  # "0" switches nothing on
    with pytest.raises(SystemExit, match="contradict"):
        request(FASTKD_BUILD_CUDA="1", FASTKD_NO_CUDA="1")


def test_cuda_archs_say_why_and_which_gpus_they_miss():
    assert SETUP.arch_covers("8.0;9.0+PTX", (8, 0)) and SETUP.arch_covers("8.0;9.0+PTX", (8, 9))
    assert SETUP.arch_covers("8.0;9.0+PTX", (9, 0)) and SETUP.arch_covers("8.0;9.0+PTX", (10, 0))  # PTX, JIT
    assert not SETUP.arch_covers("8.0;9.0+PTX", (7, 5)) and not SETUP.arch_covers("9.0", (10, 0))
    archs, why = SETUP.cuda_archs({}, H100)
    assert archs == SETUP.DEFAULT_CUDA_ARCHS and "default" in why and "NOT covered" not in why
    archs, why = SETUP.cuda_archs({"FASTKD_CUDA_ARCHS": "8.0"}, H100)
    assert archs == "8.0" and "FASTKD_CUDA_ARCHS" in why and "NOT covered: NVIDIA H100" in why


DRY_RUN = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("fastkd_setup", sys.argv[1])
setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup)
(ext,), _ = setup.extensions()
flags = []
if "FASTKD_WITH_CUDA" in dict(ext.define_macros):
    from torch.utils import cpp_extension
    flags = cpp_extension._get_cuda_arch_flags()  # what BuildExtension passes nvcc for TORCH_CUDA_ARCH_LIST
print(json.dumps({"sources": ext.sources, "macros": dict(ext.define_macros), "nvcc": ext.extra_compile_args.get("nvcc"),
                  "gencode": flags}))
"""


def dry_run(**env):
    """setup.py's extension for the environment ``env`` (what it would compile; nothing is compiled)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("FASTKD_") and k != "TORCH_CUDA_ARCH_LIST"}
    r = subprocess.run([sys.executable, "-c", DRY_RUN, os.path.join(ROOT, "setup.py")], capture_output=True,
                       text=True, env={**full, **env}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_asked_cuda_build_compiles_every_source_for_the_default_archs():
    import torch

    reason = SETUP.cuda_skip_reason(torch.version.cuda, SETUP.nvcc_version_text(SETUP.find_cuda_root() or "/none"))
    if reason is not None:
        pytest.skip(f"the CUDA kernels cannot be built here: {reason}")
    ext, log = dry_run(FASTKD_BUILD_CUDA="1")
    assert sorted(ext["sources"]) == sorted(SETUP.read_sources())  # the CPU and the CUDA sources
    assert any(s.startswith("csrc/cuda/") for s in ext["sources"]) and ext["macros"] == {"FASTKD_WITH_CUDA": "1"}
    assert ext["nvcc"] == SETUP.NVCC_FLAGS
    assert {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90"} <= set(ext["gencode"])
    assert "CUDA kernels built: FASTKD_BUILD_CUDA=1" in log and "CUDA architectures 8.0;9.0+PTX: the default" in log
    ext, log = dry_run(FASTKD_BUILD_CUDA="1", FASTKD_CUDA_ARCHS="9.0")
    assert ext["gencode"] == ["-gencode=arch=compute_90,code=sm_90"] and "from FASTKD_CUDA_ARCHS" in log


def test_default_build_without_a_gpu_compiles_the_cpu_sources_only():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the default build compiles the CUDA kernels")
    ext, log = dry_run()
    assert ext["sources"] and not any(s.startswith("csrc/cuda/") for s in ext["sources"]) and not ext["macros"]
    assert "CPU kernels only" in log and ("FASTKD_BUILD_CUDA=1" in log or "torch" in log)
    with pytest.raises(AssertionError, match="cannot be built|contradict"):  # asked, and impossible: an error
        dry_run(FASTKD_BUILD_CUDA="1", FASTKD_NO_CUDA="1")


# ptxas -v, for each kernel:
#   ptxas info    : Compiling entry function '_Z...' for 'sm_80'
#   ptxas info    : Function properties for _Z...
#       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 32 registers, used 1 barriers, ...
ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(text):
    """{(kernel, arch): {"registers", "stack", "spill_stores", "spill_loads"}} from ptxas -v output."""
    table, current = {}, None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            current = (m.group(1), m.group(2))
            table[current] = {"registers": None, "stack": 0, "spill_stores": 0, "spill_loads": 0}
        elif current and (m := SPILL.search(line)):
            table[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current and (m := REGS.search(line)):
            table[current]["registers"] = int(m.group(1))
    return table


def test_parse_ptxas_finds_spills():
    text = (
        "ptxas info    : Compiling entry function '_Z1kPf' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z1kPf\n"
        "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 0 barriers, 360 bytes cmem[0]\n"
    )
    assert parse_ptxas(text) == {
        ("_Z1kPf", "sm_80"): {"registers": 255, "stack": 16, "spill_stores": 8, "spill_loads": 12}
    }


def nvcc_path():
    root = SETUP.find_cuda_root()
    if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
        return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def compile_cu(nvcc, source, out_dir):
    """Device code only (--fatbin: no host compile) for every arch of ARCHS, in one nvcc run."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    out = os.path.join(out_dir, os.path.basename(source) + ".fatbin")
    cmd = [nvcc, "-std=c++17", *SETUP.NVCC_FLAGS, *gencode, "-I", os.path.join(ROOT, "csrc"), "--fatbin", source,
           "-o", out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    return source, r.returncode, r.stdout + r.stderr


def demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return {n: d for n, d in zip(names, out)} if len(out) == len(names) else {n: n for n in names}


def short_name(demangled):
    """`void fastkd::(anonymous namespace)::k<true, float>(float*)` -> `k<true, float>`."""
    name = re.sub(r"^void ", "", demangled).replace("fastkd::(anonymous namespace)::", "").replace("fastkd::", "")
    depth = 0
    for i, ch in enumerate(name):  # the parameter list starts at the first "(" outside template arguments
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            return name[:i]
    return name


# The row kernels whose both teams must compile without spills (csrc/cuda/rows.cuh).
REQUIRED_KERNELS = ("kd_fwd_kernel", "ats_fwd_kernel", "dkd_fwd_kernel", "divergence_dense_kernel",
                    "divergence_topk_kernel", "akl_kernel")


def test_cuda_kernels_compile_without_spills():
    nvcc = nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA compile is not checked")
    sources = sorted(os.path.join(CUDA_DIR, f) for f in os.listdir(CUDA_DIR) if f.endswith(".cu"))
    assert sources, "no csrc/cuda/*.cu"
    with tempfile.TemporaryDirectory() as out_dir, concurrent.futures.ThreadPoolExecutor(
        max_workers=max(1, min(len(sources), os.cpu_count() or 1))
    ) as pool:
        results = list(pool.map(lambda s: compile_cu(nvcc, s, out_dir), sources))
    errors = [f"{os.path.basename(s)}: exit {rc}\n{text[-3000:]}" for s, rc, text in results if rc != 0]
    assert not errors, "\n".join(errors)

    table = {}
    for source, _, text in results:
        found = parse_ptxas(text)
        assert found, f"{os.path.basename(source)}: no ptxas -v report (are -Xptxas=-v in setup.NVCC_FLAGS?)"
        table.update({(os.path.basename(source), k, a): v for (k, a), v in found.items()})
    names = demangle(sorted({k for _, k, _ in table}))
    rows = sorted((f, short_name(names[k]), a, v) for (f, k, a), v in table.items())
    lines = ["| file | kernel | arch | registers | stack bytes | spill stores | spill loads |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {f} | `{k}` | {a} | {v['registers']} | {v['stack']} | {v['spill_stores']} | {v['spill_loads']} |"
              for f, k, a, v in rows]
    report = "\n".join(lines)
    print(report)
    if os.environ.get("FASTKD_PTXAS_TABLE"):
        with open(os.environ["FASTKD_PTXAS_TABLE"], "w") as f:
            f.write(report + "\n")
    spills = [f"{f} {k} {a}: {v['spill_stores']} B spill stores, {v['spill_loads']} B spill loads"
              for f, k, a, v in rows if v["spill_stores"] or v["spill_loads"]]
    assert not spills, "kernels spill registers:\n" + "\n".join(spills)
    for arch in ARCHS:
        assert any(a == f"sm_{arch}" for _, _, a, _ in rows), f"no kernel compiled for sm_{arch}"
    # every row kernel, in both teams (warp / block per row), is in the table for every arch
    for kernel in REQUIRED_KERNELS:
        for team in ("true", "false"):
            for arch in ARCHS:
                assert any(k.startswith(f"{kernel}<{team},") and a == f"sm_{arch}" for _, k, a, _ in rows), (
                    f"{kernel}<{team}, ...> not compiled for sm_{arch}")


FAST_DIV_CHECK = r"""
#include <cstdio>
#include <cstdlib>
#include "cuda/fast_div.h"
int main() {
  unsigned d, n;
  long count = 0;
  while (std::scanf("%u %u", &d, &n) == 2) {
    const fastkd::FastDiv32 f = fastkd::fast_div32(d);
    if (fastkd::fast_div(n, f) != n / d) { std::printf("wrong: %u / %u\n", n, d); return 1; }
    ++count;
  }
  std::printf("ok %ld\n", count);
  return 0;
}
"""


def test_fast_div_matches_division():
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    rng = random.Random(0)
    divisors = [1, 2, 3, 5, 7, 9, 49, 63, 100, 4096, 4097, 65535, 65536, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1]
    divisors += [rng.randrange(1, 2**32) for _ in range(300)] + [rng.randrange(1, 5000) for _ in range(300)]
    pairs = []
    for d in divisors:
        top = (2**32 - 1) // d * d
        edges = [0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, top - 1, top, 2**32 - 2, 2**32 - 1]
        pairs += [(d, n) for n in edges if 0 <= n < 2**32]
        pairs += [(d, rng.randrange(0, 2**32)) for _ in range(50)]
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "check.cpp"), os.path.join(tmp, "check")
        with open(src, "w") as f:
            f.write(FAST_DIV_CHECK)
        subprocess.run([cxx, "-std=c++17", "-O1", "-I", os.path.join(ROOT, "csrc"), src, "-o", exe], check=True)
        r = subprocess.run([exe], input="\n".join(f"{d} {n}" for d, n in pairs), capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr
    assert r.stdout.strip() == f"ok {len(pairs)}"

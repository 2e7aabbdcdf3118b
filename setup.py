"""Build fastkd and its compiled kernels (fastkd._C).

Environment switches:
  FASTKD_NO_EXTENSION=1   pure-Python install (reference and Triton backends only)
  FASTKD_NO_CUDA=1        build only the CPU kernels even where CUDA could be built
  FASTKD_CUDA_ARCHS       CUDA architectures, default "8.0;9.0+PTX" (sm_80, sm_90 and PTX for newer GPUs)

The CUDA compile prints each kernel's register count and spills (-Xptxas=-v). If nvcc's
CUDA major version differs from torch.version.cuda's, only the CPU kernels are built
(with a log line saying why), since torch refuses to compile such an extension.
  MAX_JOBS                parallel compile jobs (default: the machine's cores)

CUDA sources are built whenever the installed torch is a CUDA build and nvcc
works, with or without a GPU present. The toolkit root is taken from nvcc itself
(not guessed from nvcc's folder, which is wrong when nvcc on PATH is a wrapper),
and the headers of the CUDA wheels installed beside torch are added to the include
path for the toolkit headers (cusparse.h, ...) that torch's CUDA headers include.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# -Xptxas=-v prints every kernel's registers and spills in the build log;
# tests/test_cuda_build.py compiles with these flags and fails on any spill.
NVCC_FLAGS = ["-O3", "--use_fast_math", "-Xptxas=-v"]


def log(msg):
    print(f"[fastkd build] {msg}", file=sys.stderr, flush=True)


def env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def read_sources():
    with open(os.path.join(ROOT, "csrc", "sources.txt")) as f:
        lines = [ln.strip() for ln in f]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def find_cuda_root():
    """The toolkit root that nvcc itself reports (its TOP= line), or None."""
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME"):
        candidate = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
        nvcc = candidate if os.path.exists(candidate) else nvcc
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "/dev/null"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if not match:
        return None
    return os.path.realpath(match.group(1).strip())


def nvcc_release(version_text):
    """The "major.minor" release in the output of `nvcc --version`, or None."""
    match = re.search(r"release (\d+)\.(\d+)", version_text or "")
    return f"{match.group(1)}.{match.group(2)}" if match else None


def cuda_skip_reason(torch_cuda, nvcc_version_text):
    """Why the CUDA kernels cannot be built, or None when they can.

    torch_cuda: torch.version.cuda (None for a CPU-only torch); nvcc_version_text:
    the output of `nvcc --version` (None when no working nvcc was found). A CUDA
    extension must be compiled with the CUDA major version torch was built with
    (torch's cpp_extension refuses otherwise), so a mismatch builds the CPU kernels
    rather than failing the whole install.
    """
    if torch_cuda is None:
        return "torch has no CUDA"
    if nvcc_version_text is None:
        return "no working nvcc found"
    release = nvcc_release(nvcc_version_text)
    if release is None:
        return f"cannot read the CUDA release from `nvcc --version` ({nvcc_version_text.strip()[-80:]!r})"
    if release.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"nvcc is CUDA {release} but torch was built with CUDA {torch_cuda} (the major versions must match; "
                "put a matching toolkit first on PATH or set CUDA_HOME)")
    return None


def nvcc_version_text(cuda_root):
    """The output of `<cuda_root>/bin/nvcc --version`, or None."""
    try:
        out = subprocess.run([os.path.join(cuda_root, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def wheel_cuda_includes():
    """Include folders of the nvidia-* CUDA wheels pip installs beside a CUDA torch."""
    try:
        import nvidia  # namespace package of the CUDA wheels
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in found if os.path.isdir(d)]


def extensions():
    if env_flag("FASTKD_NO_EXTENSION"):
        log("FASTKD_NO_EXTENSION=1: pure-Python install (reference and Triton backends only)")
        return [], {}
    import torch

    sources = read_sources()
    cuda_sources = [s for s in sources if s.startswith("csrc/cuda/")]
    cpu_sources = [s for s in sources if s not in cuda_sources]
    use_cuda = False
    nvcc_version = None
    if env_flag("FASTKD_NO_CUDA"):
        log("FASTKD_NO_CUDA=1: building the CPU kernels only")
    else:
        root = find_cuda_root() if torch.version.cuda is not None else None
        nvcc_text = nvcc_version_text(root) if root is not None else None
        reason = cuda_skip_reason(torch.version.cuda, nvcc_text)
        if reason is not None:
            log(f"{reason} (torch {torch.__version__}): building the CPU kernels only")
        else:
            # cpp_extension reads CUDA_HOME when imported, so set it first.
            os.environ["CUDA_HOME"] = root
            nvcc_version = nvcc_text.strip().splitlines()[-1]
            use_cuda = True
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-fopenmp-simd", "-fno-math-errno"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if use_cuda:
        archs = os.environ.get("FASTKD_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        wheel_includes = wheel_cuda_includes()
        log(f"CUDA toolkit {os.environ['CUDA_HOME']} ({nvcc_version}); architectures {archs}")
        if wheel_includes:
            log(f"extra CUDA headers from the pip wheels: {', '.join(wheel_includes)}")
        ext = CUDAExtension(
            "fastkd._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs + wheel_includes,
            extra_compile_args={"cxx": cxx_flags, "nvcc": NVCC_FLAGS},
            define_macros=[("FASTKD_WITH_CUDA", "1")],
            py_limited_api=False,
        )
    else:
        ext = CppExtension("fastkd._C", cpu_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags})
    log(f"compiling {len(ext.sources)} sources with MAX_JOBS={os.environ['MAX_JOBS']}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


if __name__ == "__main__":  # also under pip; importing this file (tests/test_cuda_build.py) only defines the helpers
    ext_modules, cmdclass = extensions()
    # Name, version and dependencies live in pyproject.toml.
    setup(packages=find_packages(include=["fastkd", "fastkd.*"]), ext_modules=ext_modules, cmdclass=cmdclass)

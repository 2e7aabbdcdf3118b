"""Build fastkd and its compiled kernels (fastkd._C).

Environment switches:
  FASTKD_BUILD_CUDA=1     build the CUDA kernels even without a GPU (CI does, so the CUDA sources
                          compile there); the build fails if they cannot be built
  FASTKD_BUILD_CUDA=0     build only the CPU kernels, even with a GPU (FASTKD_NO_CUDA=1 is the same)
  (neither)               build the CUDA kernels when torch sees a GPU, else only the CPU kernels
  FASTKD_NO_EXTENSION=1   pure-Python install (reference and Triton backends only)
  FASTKD_CUDA_ARCHS       CUDA architectures, default "8.0;9.0+PTX" (sm_80, sm_90 and PTX for newer GPUs)
  MAX_JOBS                parallel compile jobs (default: the machine's cores)

Why the default: on 2 cores the CUDA kernels are most of the build (a `pip wheel` took 16 min 20 s,
the CPU kernels alone a few minutes), and on a machine without a GPU they cannot run. The build log
says whether the CUDA kernels are built and why, and for which architectures and why.

The CUDA compile prints each kernel's register count and spills (-Xptxas=-v). If nvcc's CUDA major
version differs from torch.version.cuda's, only the CPU kernels are built (with a log line saying
why; an error when FASTKD_BUILD_CUDA=1 asked for them), since torch refuses to compile such an
extension. The toolkit root is taken from nvcc itself (not guessed from nvcc's folder, which is
wrong when nvcc on PATH is a wrapper), and the headers of the CUDA wheels installed beside torch
are added to the include path for the toolkit headers (cusparse.h, ...) that torch's CUDA headers
include.
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


def cuda_request(environ, gpus):
    """Whether the CUDA kernels are wanted: (want, required, why).

    ``environ``: the environment; ``gpus``: the GPUs torch sees, [(name, (major, minor))] as from
    torch_visible_gpus, which decide when no switch does. ``required``: asked for
    explicitly (FASTKD_BUILD_CUDA=1), so a toolkit that cannot build them is an error, never a
    silent CPU-only build. tests/conftest.py uses the same answer to decide whether
    FASTKD_REQUIRE_EXTENSION=1 demands the CUDA kernels.
    """
    def flag(name):
        value = environ.get(name)
        return None if value in (None, "") else value.lower() in ("1", "true", "yes", "on")

    build, no_cuda = flag("FASTKD_BUILD_CUDA"), flag("FASTKD_NO_CUDA")
    if build and no_cuda:
        raise SystemExit("[fastkd build] FASTKD_BUILD_CUDA=1 and FASTKD_NO_CUDA=1 contradict each other")
    if no_cuda:
        return False, False, "FASTKD_NO_CUDA=1"
    if build is not None:
        return build, build, f"FASTKD_BUILD_CUDA={environ['FASTKD_BUILD_CUDA']}"
    if gpus:
        listed = ", ".join(f"{name} (sm_{major}{minor})" for name, (major, minor) in gpus)
        return True, False, f"torch sees {len(gpus)} GPU(s): {listed}"
    return False, False, "torch sees no GPU (set FASTKD_BUILD_CUDA=1 to build the CUDA kernels anyway, as CI does)"


def torch_visible_gpus():
    """[(name, (major, minor))] of the GPUs torch sees; [] for a CPU-only torch or no GPU."""
    import torch

    if torch.version.cuda is None or not torch.cuda.is_available():
        return []
    return [(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
            for i in range(torch.cuda.device_count())]


def arch_covers(archs, capability):
    """Whether a TORCH_CUDA_ARCH_LIST string runs on a GPU of ``capability`` (major, minor): a cubin
    for X.Y runs on X.Z with Z >= Y; X.Y+PTX is JIT-compiled on any newer GPU."""
    for entry in archs.replace(",", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        major, minor = (int(x) for x in entry.replace("+PTX", "").split("."))
        if (major == capability[0] and minor <= capability[1]) or (ptx and (major, minor) <= tuple(capability)):
            return True
    return False


def cuda_archs(environ, gpus):
    """(TORCH_CUDA_ARCH_LIST, why): FASTKD_CUDA_ARCHS if set, else the default; says which of the
    visible GPUs (``gpus`` as from torch_visible_gpus) the list does not cover."""
    if environ.get("FASTKD_CUDA_ARCHS"):
        archs, why = environ["FASTKD_CUDA_ARCHS"], "from FASTKD_CUDA_ARCHS"
    else:
        archs = DEFAULT_CUDA_ARCHS
        why = ("the default: sm_80 cubins (A100; they also run on sm_86 and sm_89), sm_90 cubins (H100, H200) "
               "and compute_90 PTX that the driver compiles for newer GPUs; FASTKD_CUDA_ARCHS changes it")
    missed = [f"{name} (sm_{major}{minor})" for name, (major, minor) in gpus if not arch_covers(archs, (major, minor))]
    if missed:
        why += f"; NOT covered: {', '.join(missed)} (add its architecture to FASTKD_CUDA_ARCHS)"
    return archs, why


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
    gpus = torch_visible_gpus()
    want, required, why = cuda_request(os.environ, gpus)
    if torch.version.cuda is None and not required:
        log(f"torch {torch.__version__} has no CUDA: building the CPU kernels only")
    elif not want:
        log(f"CUDA kernels not built: {why}; building the CPU kernels only")
    else:
        root = find_cuda_root() if torch.version.cuda is not None else None
        nvcc_text = nvcc_version_text(root) if root is not None else None
        reason = cuda_skip_reason(torch.version.cuda, nvcc_text)
        if reason is not None and required:
            raise SystemExit(f"[fastkd build] {why}, but the CUDA kernels cannot be built: {reason} "
                             f"(torch {torch.__version__})")
        if reason is not None:
            log(f"CUDA kernels wanted ({why}) but not built: {reason} (torch {torch.__version__}); "
                "building the CPU kernels only")
        else:
            log(f"CUDA kernels built: {why}")
            # cpp_extension reads CUDA_HOME when imported, so set it first.
            os.environ["CUDA_HOME"] = root
            nvcc_version = nvcc_text.strip().splitlines()[-1]
            use_cuda = True
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-fopenmp-simd", "-fno-math-errno"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if use_cuda:
        archs, archs_why = cuda_archs(os.environ, gpus)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        wheel_includes = wheel_cuda_includes()
        log(f"CUDA toolkit {os.environ['CUDA_HOME']} ({nvcc_version})")
        log(f"CUDA architectures {archs}: {archs_why}")
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

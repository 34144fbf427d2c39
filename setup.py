"""Builds kdkernels' compiled parts:

* ``kdkernels._C``: the op schemas and build information (csrc/kdkernels.cpp), plus the CUDA kernels when torch has
  CUDA and nvcc is found;
* ``kdkernels/_cpu_<isa>*.so``: the C++ CPU kernels (csrc/*/*_cpu.cpp), compiled once per vector ISA with ATen's
  CPU_CAPABILITY macros and that ISA's -m flags. ``import kdkernels`` loads exactly one of them: the best that this
  build holds and the CPU runs (kdkernels/_extension.py).

Environment knobs:
  KDKERNELS_SKIP_CUDA=1          build the CPU kernels only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST="9.0"     CUDA architectures (default: the visible GPUs', else 9.0 when no GPU is visible)
  MAX_JOBS=N                     parallel compile jobs (ninja)
  DEBUG=1                        -O0 -g instead of -O3 without debug information
  KDKERNELS_CPU_CAPABILITY=auto  at build time, the vector ISAs to build CPU kernel libraries for: auto (on x86-64,
                                 each of avx512, avx2, default that the compiler can target; elsewhere default) or
                                 a comma-separated list such as avx2,default (to save build time). At run time, the
                                 same variable chooses which built library to load (avx512, avx2 or default).
"""
import os
import platform
import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - exercised only by a misconfigured install
    sys.exit("kdkernels compiles against the installed torch: install torch first, then run "
             "`pip install --no-build-isolation .`")

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "kdkernels" / "_version.py").read_text()).group(1)
DEBUG = os.environ.get("DEBUG", "0") == "1"
OPTIMISATION = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]

# ATen's vectorised math (at::vec) picks its instruction set at compile time from these macros; best ISA first.
CPU_CAPABILITY_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
}
# Where the per-ISA copies of the CPU sources are generated (one object file per ISA and source).
CPU_SOURCE_COPIES = Path("build") / "cpu_capability"


def compiler_targets(flags: list[str]) -> bool:
    """Whether the C++ compiler (and assembler) accept `flags` for a vectorised function."""
    compiler = shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")
    probe = "typedef float v16 __attribute__((vector_size(64)));\nv16 f(v16 a, v16 b) { return a * b + a; }\n"
    try:
        result = subprocess.run([*compiler, *flags, "-x", "c++", "-c", "-", "-o", os.devnull], input=probe,
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def cpu_capabilities() -> list[str]:
    """The ISAs to build CPU kernel libraries for, best first (KDKERNELS_CPU_CAPABILITY at build time)."""
    requested = os.environ.get("KDKERNELS_CPU_CAPABILITY", "auto").lower().replace(" ", "")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if requested in ("", "auto"):
        if not x86:
            return ["default"]
        chosen = [isa for isa, flags in CPU_CAPABILITY_FLAGS.items()
                  if isa == "default" or compiler_targets(flags)]
        skipped = sorted(set(CPU_CAPABILITY_FLAGS) - set(chosen))
        if skipped:
            print(f"kdkernels: the compiler cannot target {', '.join(skipped)}: no CPU kernels for them")
        return chosen
    names = requested.split(",")
    unknown = [name for name in names if name not in CPU_CAPABILITY_FLAGS]
    if unknown or not names:
        sys.exit("KDKERNELS_CPU_CAPABILITY must be auto or a comma-separated list of "
                 f"{', '.join(CPU_CAPABILITY_FLAGS)}; got {requested!r}")
    if not x86 and names != ["default"]:
        sys.exit(f"KDKERNELS_CPU_CAPABILITY={requested}: {platform.machine()} builds only the default CPU kernels")
    return [isa for isa in CPU_CAPABILITY_FLAGS if isa in names]


def cuda_arch_list() -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not archs and not torch.cuda.is_available():
        archs = "9.0"  # no visible GPU: torch would otherwise fail to pick an architecture
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs or ";".join(f"{major}.{minor}" for major, minor in
                             {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def build_cuda() -> bool:
    if os.environ.get("KDKERNELS_SKIP_CUDA", "0") == "1":
        return False
    return bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None


def write_build_config(capabilities: list[str], archs: str) -> None:
    """Records what was built, so that a failed load can say so (kdkernels/_extension.py)."""
    config = {"version": VERSION, "torch_version": torch.__version__,
              "cpu_capabilities": [isa.upper() for isa in capabilities], "cuda_archs": archs}
    (ROOT / "kdkernels" / "_build_config.py").write_text(
        f"# Generated by setup.py at build time.\nBUILD_CONFIG = {config!r}\n")


def write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:  # an unchanged file keeps its time: ninja rebuilds nothing
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def cpu_sources_for(isa: str) -> list[str]:
    """Per-ISA copies of the CPU sources (each includes its original), as ATen does: a source compiled for several
    ISAs needs one object file per ISA."""
    copies = []
    for source in sorted(Path("csrc").glob("*/*_cpu.cpp")):
        copy = CPU_SOURCE_COPIES / isa / source.parent.name / source.name
        include = Path(os.path.relpath(ROOT / source, (ROOT / copy).parent)).as_posix()
        write_if_changed(ROOT / copy, f"// Generated by setup.py: {source} for CPU_CAPABILITY {isa}.\n"
                                      f'#include "{include}"\n')
        copies.append(copy.as_posix())
    return copies


def cpu_extension(isa: str):
    return cpp_extension.CppExtension(
        f"kdkernels._cpu_{isa}", cpu_sources_for(isa),
        extra_compile_args={"cxx": [*OPTIMISATION, "-fopenmp", *CPU_CAPABILITY_FLAGS[isa]]},
        extra_link_args=["-fopenmp"])


def schema_extension(archs: str, with_cuda: bool):
    macros = [
        ("KDKERNELS_VERSION", f'"{VERSION}"'),
        ("KDKERNELS_TORCH_VERSION", f'"{torch.__version__}"'),
        ("KDKERNELS_CUDA_ARCHS", f'"{archs}"'),
    ]
    sources = ["csrc/kdkernels.cpp"]
    compile_args = {"cxx": list(OPTIMISATION)}
    if not with_cuda:
        return cpp_extension.CppExtension("kdkernels._C", sources, define_macros=macros,
                                          extra_compile_args=compile_args)
    sources += sorted(str(p) for p in Path("csrc").glob("*/*_cuda.cu"))
    macros.append(("KDKERNELS_WITH_CUDA", None))
    compile_args["nvcc"] = ["-O3", "-lineinfo", "--threads", os.environ.get("NVCC_THREADS", "2")]
    return cpp_extension.CUDAExtension("kdkernels._C", sources, define_macros=macros,
                                       extra_compile_args=compile_args)


def extensions():
    capabilities = cpu_capabilities()
    with_cuda = build_cuda()
    archs = cuda_arch_list() if with_cuda else ""
    write_build_config(capabilities, archs)
    print(f"kdkernels: building CPU kernels for {', '.join(capabilities)}" + (
        f" and CUDA kernels for {archs}" if with_cuda else
        " (no CUDA: torch has no CUDA, nvcc is missing, or KDKERNELS_SKIP_CUDA=1)"))
    return [schema_extension(archs, with_cuda)] + [cpu_extension(isa) for isa in capabilities]


setup(
    version=VERSION,
    packages=find_packages(include=["kdkernels", "kdkernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)

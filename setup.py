"""Build of wanrt's native parts, both optional, both bound with cffi in API mode.

* quant._wanrt_c: the C block codecs and file copies (csrc/*.c).
* quant._wanrt_cuda: the CUDA kernels (csrc/*.cu, compiled by nvcc, cudart linked
  statically), built only where nvcc is found.

csrc/wanrt.h is the one C ABI: the text between its "wanrt-cdef" markers is what
cffi declares, so the binding cannot drift from the header. When a part cannot be
built (no C compiler, no nvcc, a failing compile), the install still succeeds,
the package falls back to its pure Python twins, and `python -m quant.diagnose`
says what is missing.

Environment:
  WANRT_CUDA_ARCHS  GPU architectures, e.g. "90" or "80,86,89,90,120" (the default);
                    SASS for each, plus PTX for the newest.
  WANRT_BUILD_CUDA  "0" skips the CUDA library.
  CUDA_HOME         the CUDA toolkit (else nvcc is looked up on PATH).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "csrc"
HEADER = Path(CSRC) / "wanrt.h"

# Our own C: warnings are errors; no FMA contraction, which would move Q4_0/Q5_0
# rounding ties away from ggml's reference bytes; portable code (AVX2 is chosen at
# run time through target_clones, never -march=native).
C_FLAGS = ["-O3", "-ffp-contract=off", "-std=c11", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"]
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "--fmad=false",
    "-Werror",
    "all-warnings",
    "-Xcompiler",
    "-fPIC,-fvisibility=hidden,-Wall,-Wextra,-Werror",
]
DEFAULT_CUDA_ARCHS = "80,86,89,90,120"
# Keep the static cudart private: torch loads its own cudart into the global
# symbol scope, and our fat binaries are registered with ours.
CUDA_LINK_ARGS = ["-Wl,--exclude-libs,ALL", "-Wl,-Bsymbolic"]


class SkipPart(Exception):
    """A native part that cannot be built here; the message says why."""


def cdef(*sections: str) -> str:
    """The declarations between `/* wanrt-cdef begin <name> */` and `/* wanrt-cdef end */`."""
    text = HEADER.read_text()
    found = dict(re.findall(r"/\* wanrt-cdef begin (\w+) \*/\n(.*?)/\* wanrt-cdef end \*/", text, re.S))
    missing = [s for s in sections if s not in found]
    if missing:
        raise RuntimeError(f"{HEADER}: no wanrt-cdef section(s) {missing}")
    return "\n".join(found[s] for s in sections)


def emit_cffi_source(module: str, sections: tuple[str, ...], path: Path) -> str:
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(cdef(*sections))
    ffi.set_source(module, '#include "wanrt.h"')
    path.parent.mkdir(parents=True, exist_ok=True)
    ffi.emit_c_code(str(path))
    return str(path)


# ------------------------------------------------------------------ CUDA toolkit


def find_nvcc() -> str:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SkipPart("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    return nvcc


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SkipPart(f"{' '.join(cmd[:3])} ... failed:\n{proc.stdout[-4000:]}")
    return proc.stdout


def cuda_root(nvcc: str) -> Path:
    """The toolkit folder; nvcc may be a wrapper script, so ask nvcc itself."""
    m = re.search(r"^#\$ _HERE_=(.+)$", run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull]), re.M)
    bin_dir = Path(m.group(1).strip()) if m else Path(nvcc).resolve().parent
    return bin_dir.parent


def static_cudart(root: Path) -> str:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        lib = root / sub / "libcudart_static.a"
        if lib.is_file():
            return str(lib)
    raise SkipPart(f"libcudart_static.a not found under {root}")


def cuda_archs(nvcc: str) -> list[str]:
    """Requested architectures ("90", "8.6", "sm_120", "90a") that this nvcc can target."""
    raw = os.environ.get("WANRT_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    wanted = [re.sub(r"^(sm_|compute_)", "", a).replace(".", "") for a in re.split(r"[,;\s]+", raw.strip()) if a]
    if not wanted or not all(re.fullmatch(r"\d+[af]?", a) for a in wanted):
        raise SkipPart(f"WANRT_CUDA_ARCHS={raw!r}: expected numbers like '90' or '80,86,90'")
    supported = set(re.findall(r"sm_(\w+)", run([nvcc, "--list-gpu-code"])))
    archs = [a for a in wanted if a in supported]
    dropped = sorted(set(wanted) - set(archs))
    if dropped:
        print(f"wanrt: this nvcc cannot target sm_{', sm_'.join(dropped)}; building the others")
    if not archs:
        raise SkipPart(f"none of the requested GPU architectures {wanted} is supported by {nvcc}")
    return archs


def newest_arch(archs: list[str]) -> str:
    return max(archs, key=lambda a: int(re.match(r"\d+", a).group()))


def gencode_flags(archs: list[str]) -> list[str]:
    """SASS for every architecture, and PTX of the newest for GPUs yet to come."""
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    ptx = newest_arch(archs)
    return flags + ["-gencode", f"arch=compute_{ptx},code=compute_{ptx}"]


# ------------------------------------------------------------------------ build


class BuildNative(build_ext):
    """Builds each native part on its own; a part that fails is skipped with a warning."""

    def build_extension(self, ext: Extension) -> None:
        try:
            if ext.name.endswith("_wanrt_cuda"):
                if os.environ.get("WANRT_BUILD_CUDA", "1") == "0":
                    raise SkipPart("WANRT_BUILD_CUDA=0")
                self.prepare_cuda(ext)
            else:
                self.prepare_core(ext)
            super().build_extension(ext)
        except Exception as e:  # any failure leaves the pure Python twin in charge
            self.skip(ext, e)

    def skip(self, ext: Extension, reason: BaseException) -> None:
        print(
            f"\nwarning: wanrt: {ext.name} not built ({type(reason).__name__}: {reason}).\n"
            "The pure Python fallback will be used; `python -m quant.diagnose` shows what is loaded.\n"
        )
        # An editable install maps every extension it expects; drop the missing one.
        self.extensions = [e for e in self.extensions if e is not ext]

    def temp(self, name: str) -> Path:
        return Path(self.build_temp) / "wanrt" / name

    def prepare_core(self, ext: Extension) -> None:
        sources = sorted(str(p) for p in Path(CSRC).glob("*.c"))
        flags = " ".join(C_FLAGS)
        objects = self.compiler.compile(
            sources,
            output_dir=str(self.temp("core")),
            include_dirs=[CSRC],
            macros=[("WANRT_BUILD_FLAGS", f'"{flags}"')],
            extra_postargs=C_FLAGS,
        )
        ext.sources = [emit_cffi_source(ext.name, ("common", "core"), self.temp("_wanrt_c.c"))]
        ext.include_dirs = [CSRC]
        ext.extra_objects = objects
        ext.depends = objects  # relink when our C changes, even if cffi's wrapper did not
        ext.libraries = ["pthread"]

    def prepare_cuda(self, ext: Extension) -> None:
        nvcc = find_nvcc()
        root = cuda_root(nvcc)
        cudart = static_cudart(root)
        archs = cuda_archs(nvcc)
        version = re.search(r"release [\d.]+, V([\d.]+)", run([nvcc, "--version"]))
        out_dir = self.temp("cuda")
        out_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for cu in sorted(Path(CSRC).glob("*.cu")):
            obj = out_dir / (cu.stem + ".o")
            print(f"nvcc {cu} -> {obj} (sm_{', sm_'.join(archs)})")
            run([nvcc, "-c", str(cu), "-o", str(obj), f"-I{CSRC}", *NVCC_FLAGS, *gencode_flags(archs)])
            objects.append(str(obj))
        info = (
            f"SASS sm_{' sm_'.join(archs)}, PTX compute_{newest_arch(archs)}; "
            f"nvcc {version.group(1) if version else 'unknown'}; cudart linked statically"
        )
        info_c = self.temp("cuda_build_info.c")
        info_c.write_text(
            '#include "wanrt.h"\n'
            f'const char *wanrt_cuda_build_info(void) {{ return "{info}"; }}\n'
        )
        ext.sources = [emit_cffi_source(ext.name, ("common", "cuda"), self.temp("_wanrt_cuda.c")), str(info_c)]
        ext.include_dirs = [CSRC]
        ext.extra_objects = objects + [cudart]
        ext.depends = objects
        ext.libraries = ["dl", "rt", "pthread", "stdc++"]
        ext.extra_link_args = CUDA_LINK_ARGS


setup(
    ext_modules=[
        # Sources are generated at build time (cffi wrappers); these lists are placeholders.
        Extension("quant._wanrt_c", sources=[str(HEADER)]),
        Extension("quant._wanrt_cuda", sources=[str(HEADER)]),
    ],
    cmdclass={"build_ext": BuildNative},
)

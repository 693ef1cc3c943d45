"""Building the native qwha op library: onnxruntime headers, compiler, per-user cache.

The C++ sources (``csrc/``, package data) compile into one shared library holding a portable baseline and, on
x86-64, x86-64-v3 (AVX2) and x86-64-v4 (AVX-512) variants of the kernels; the library picks the best the CPU runs.
It needs onnxruntime's C/C++ API headers but no link against libonnxruntime.

Headers, in order: ``headers`` (``qwha-export build-ops --headers DIR``), ``$ORT_INCLUDE_DIR``,
``/usr/include/onnxruntime``, this cache's ``headers/`` folder; with ``fetch=True`` (``build-ops`` only, never at
serve time) and apt on the machine, Debian trixie's ``libonnxruntime-dev`` is downloaded with apt using a separate
sources list and separate state and cache directories (the system's apt state is untouched) and its headers are
extracted into ``headers/``. A header set is usable when its ``ORT_API_VERSION`` is at most the running
onnxruntime's (1.N provides C API versions 1..N).

Cache (``$QWHA_CACHE/ortops`` or ``~/.cache/qwha-export/ortops``): ``lib-<source hash>-ort<version>/`` holds
``libqwha_ortops.so`` and ``build.json`` (sha256 of the library, source hash, header API version). A build runs
under a file lock (``.lock``) in a temporary folder that is renamed into place, so concurrent callers wait for one
builder and an interrupted build leaves nothing half-written. An entry whose library does not match its sha256 or
does not carry the current source hash is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LIB_NAME",
    "DEBIAN_SUITE",
    "DEBIAN_PACKAGE",
    "OrtOpsError",
    "Headers",
    "cache_root",
    "source_hash",
    "runtime_api_version",
    "find_headers",
    "fetch_debian_headers",
    "cached_library",
    "build_library",
    "library_tag",
]

LIB_NAME = "libqwha_ortops.so"
DEBIAN_SUITE = "trixie"
DEBIAN_PACKAGE = "libonnxruntime-dev"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
SYSTEM_INCLUDE = Path("/usr/include/onnxruntime")
_CSRC = Path(__file__).resolve().parent / "csrc"
_KERNEL_SRC = "spectral_impl.cc"
_COMMON_SRC = ("qwha_ops.cc", "layout.cc")
_NEEDED_HEADERS = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h")
_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]
_BUILD_VERSION = 1  # bump when the way the library is built changes


class OrtOpsError(RuntimeError):
    """The native library cannot be found, built or used; the message says why in one line."""


@dataclass(frozen=True)
class Headers:
    path: Path  # the folder holding onnxruntime_c_api.h
    api_version: int
    origin: str  # "--headers", "ORT_INCLUDE_DIR", "/usr/include/onnxruntime", "cache", "debian"


def cache_root() -> Path:
    root = os.environ.get("QWHA_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "qwha-export") / "ortops"


def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def source_hash() -> str:
    """sha256 (16 hex digits) of the C++ sources and the build recipe: a change rebuilds the library."""
    h = hashlib.sha256(f"build {_BUILD_VERSION} {' '.join(_FLAGS)} {platform.machine()}".encode())
    for p in sorted(_CSRC.iterdir()):
        if p.suffix in (".cc", ".h"):
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def runtime_api_version() -> tuple[str, int]:
    """``(onnxruntime version, highest C API version it provides)``: onnxruntime 1.N provides 1..N."""
    import onnxruntime as ort

    version = ort.__version__
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m or m.group(1) != "1":
        raise OrtOpsError(f"cannot tell the C API version of onnxruntime {version}")
    return version, int(m.group(2))


def _header_api(folder: Path) -> int | None:
    if not all((folder / h).is_file() for h in _NEEDED_HEADERS):
        return None
    m = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", (folder / "onnxruntime_c_api.h").read_text(errors="replace"))
    return int(m.group(1)) if m else None


def _cached_header_dirs() -> list[Path]:
    base = cache_root() / "headers"
    return sorted((p for p in base.glob("*") if p.is_dir()), reverse=True) if base.is_dir() else []


def find_headers(headers: str | os.PathLike[str] | None = None) -> Headers:
    """The first usable header folder (module docstring order, no fetching); OrtOpsError says what was tried."""
    _, runtime = runtime_api_version()
    if headers is not None:
        candidates = [(Path(headers).expanduser(), "--headers")]
    else:
        candidates = []
        if os.environ.get("ORT_INCLUDE_DIR"):
            candidates.append((Path(os.environ["ORT_INCLUDE_DIR"]).expanduser(), "ORT_INCLUDE_DIR"))
        candidates.append((SYSTEM_INCLUDE, str(SYSTEM_INCLUDE)))
        candidates += [(p, "cache") for p in _cached_header_dirs()]
    tried = []
    for folder, origin in candidates:
        for sub in (folder, folder / "onnxruntime"):  # a prefix's include/ or the onnxruntime folder itself
            api = _header_api(sub)
            if api is None:
                continue
            if api > runtime:
                tried.append(f"{sub} is for C API {api}, newer than this onnxruntime's {runtime}")
                break
            return Headers(sub, api, origin)
        else:
            tried.append(f"{folder}: no onnxruntime headers")
    if headers is not None:
        raise OrtOpsError(tried[0])
    raise OrtOpsError("no onnxruntime headers found (" + "; ".join(tried) + "); run `qwha-export build-ops`")


def fetch_debian_headers(say: Callable[[str], None] = lambda _: None) -> Headers:
    """Download Debian's ``libonnxruntime-dev`` with apt (own sources list, state and cache dirs) and extract its
    headers into the cache; OrtOpsError when apt is missing or the download fails."""
    apt = shutil.which("apt-get")
    if apt is None:
        raise OrtOpsError("apt-get is not available to fetch the onnxruntime headers; pass --headers DIR")
    dest_root = cache_root() / "headers"
    dest_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".apt-", dir=dest_root) as tmp:
        t = Path(tmp)
        for d in ("lists/partial", "cache/archives/partial", "etc", "deb"):
            (t / d).mkdir(parents=True)
        (t / "etc" / "sources.list").write_text(f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n")
        opts = [
            f"-o=Dir::Etc::sourcelist={t / 'etc' / 'sources.list'}",
            "-o=Dir::Etc::sourceparts=/dev/null",
            f"-o=Dir::State::Lists={t / 'lists'}",
            f"-o=Dir::Cache={t / 'cache'}",
            "-o=Debug::NoLocking=1",
            "-o=APT::Sandbox::User=root" if os.geteuid() == 0 else "-o=APT::Sandbox::User=",
        ]
        say(f"fetching onnxruntime headers: apt-get download {DEBIAN_PACKAGE} from Debian {DEBIAN_SUITE}")
        for cmd in ([apt, *opts, "update"], [apt, *opts, "download", DEBIAN_PACKAGE]):
            r = subprocess.run(cmd, cwd=t / "deb", capture_output=True, text=True)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["exit code " + str(r.returncode)])[-1]
                raise OrtOpsError(f"`apt-get {cmd[-1]}` failed: {last}")
        debs = sorted((t / "deb").glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if not debs:
            raise OrtOpsError(f"apt-get download left no {DEBIAN_PACKAGE} package")
        version = debs[-1].name.split("_")[1].split("+")[0]
        out = dest_root / f"onnxruntime-{version}"
        staged = t / "include"
        _extract_deb_headers(debs[-1], staged)
        api = _header_api(staged)
        if api is None:
            raise OrtOpsError(f"{debs[-1].name} holds no onnxruntime headers")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    say(f"onnxruntime {version} headers (C API {api}) in {out}")
    return Headers(out, api, "debian")


def _extract_deb_headers(deb: Path, dest: Path) -> None:
    """The ``usr/include/onnxruntime/*.h`` files of a .deb (an ar archive holding data.tar.*) into ``dest``."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise OrtOpsError(f"{deb.name} is not a Debian package")
    pos, member = 8, None
    while pos + 60 <= len(data):
        name = data[pos : pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48 : pos + 58].decode().strip())
        if name.startswith("data.tar"):
            member = (name, data[pos + 60 : pos + 60 + size])
            break
        pos += 60 + size + (size & 1)
    if member is None:
        raise OrtOpsError(f"{deb.name} has no data archive")
    name, blob = member
    dest.mkdir(parents=True)
    if name.endswith(".zst"):  # tarfile reads zstd only from Python 3.14: dpkg-deb unpacks it (apt implies dpkg)
        unpacked = dest.parent / "unpacked"
        r = subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], capture_output=True, text=True)
        if r.returncode != 0:
            raise OrtOpsError(f"dpkg-deb could not unpack {deb.name}: {r.stderr.strip()[:200]}")
        shutil.copytree(unpacked / "usr" / "include" / "onnxruntime", dest, dirs_exist_ok=True)
        return
    import io

    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for m in tar.getmembers():
            p = Path(m.name)
            if m.isfile() and p.suffix == ".h" and "onnxruntime" in p.parts and "include" in p.parts:
                target = dest / Path(*p.parts[p.parts.index("onnxruntime") + 1 :])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())


# ----------------------------------------------------------------------------------------------------------------------
# the cached library


def library_tag(path: Path) -> dict[str, str] | None:
    """The ``QWHA_ORTOPS_SOURCE=...;API=...;`` tag compiled into a library, read from its bytes (never loaded)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\x7fELF"):
        return None
    m = re.search(rb"QWHA_ORTOPS_SOURCE=([0-9a-f]+);API=(\d+);", data)
    return {"source": m.group(1).decode(), "api": m.group(2).decode()} if m else None


def _entry_dir() -> Path:
    version, _ = runtime_api_version()
    return cache_root() / f"lib-{source_hash()}-ort{version}"


def cached_library() -> tuple[Path | None, str]:
    """``(library, "")`` when the cache holds a valid library for these sources and this onnxruntime, else
    ``(None, why not)``."""
    d = _entry_dir()
    lib, meta_path = d / LIB_NAME, d / "build.json"
    if not lib.is_file():
        return None, "not built yet"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None, f"{meta_path} is missing or unreadable"
    if hashlib.sha256(lib.read_bytes()).hexdigest() != meta.get("sha256"):
        return None, f"{lib} does not match its recorded sha256 (corrupt)"
    tag = library_tag(lib)
    if tag is None or tag["source"] != source_hash():
        return None, f"{lib} was built from other sources (stale)"
    return lib, ""


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not Linux/macOS: no lock
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _compiler() -> str:
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if c and shutil.which(c):
            return c
    raise OrtOpsError("no C++ compiler found (set CXX, or install g++ or clang++)")


def _run_all(cmds: list[list[str]]) -> None:
    """Run compile commands two at a time; OrtOpsError with the first error line of a failure."""
    for i in range(0, len(cmds), 2):
        batch = cmds[i : i + 2]
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in batch]
        for p, c in zip(procs, batch, strict=True):
            _, err = p.communicate()
            if p.returncode != 0:
                lines = [ln for ln in err.splitlines() if "error" in ln] or err.splitlines() or ["no output"]
                raise OrtOpsError(f"compiling {Path(c[-3]).name} failed: {lines[0].strip()}")


_VARIANTS = (  # (namespace, name, flags): the x86-64 kernel variants beside the portable baseline
    ("qwha_v3", "x86-64-v3", ["-march=x86-64-v3"]),
    ("qwha_v4", "x86-64-v4", ["-march=x86-64-v4"]),
)


def _compile(cxx: str, headers: Headers, out: Path, tmp: Path) -> list[str]:
    """Compile and link the library into ``out``; returns the kernel variants it holds (a variant the compiler
    cannot target is left out; the library picks the best one the CPU runs)."""
    common = [cxx, *_FLAGS, f"-I{_CSRC}"]
    base_march = ["-march=x86-64", "-mtune=generic"] if _is_x86_64() else []
    kernel = str(_CSRC / _KERNEL_SRC)
    objs = [tmp / "qwha_baseline.o"]
    cmds = [[*common, *base_march, "-DQWHA_NS=qwha_baseline", "-c", kernel, "-o", str(objs[0])]]
    variants, defines = ["baseline"], []
    if _is_x86_64():
        for ns, name, flags in _VARIANTS:
            probe = subprocess.run([cxx, *flags, "-E", "-x", "c++", os.devnull], capture_output=True)
            if probe.returncode != 0:  # e.g. a compiler older than x86-64-v4
                continue
            objs.append(tmp / f"{ns}.o")
            cmds.append([*common, *flags, f"-DQWHA_NS={ns}", "-c", kernel, "-o", str(objs[-1])])
            variants.append(name)
            defines.append(f"-DQWHA_HAVE_{ns.split('_')[1].upper()}")
    for src in _COMMON_SRC:
        obj = tmp / (Path(src).stem + ".o")
        defs = [f'-DQWHA_SOURCE_HASH="{source_hash()}"', f"-I{headers.path}", *defines]
        cmds.append([*common, *base_march, *defs, "-c", str(_CSRC / src), "-o", str(obj)])
        objs.append(obj)
    _run_all(cmds)
    exports = tmp / "exports.map"
    exports.write_text("{ global: RegisterCustomOps; Qwha*; local: *; };\n")
    link = [cxx, "-shared", *[str(o) for o in objs], "-o", str(out), f"-Wl,--version-script={exports}", "-s"]
    static = ["-static-libstdc++", "-static-libgcc", "-Wl,--exclude-libs,ALL"]
    r = subprocess.run(link + static, capture_output=True, text=True)
    if r.returncode != 0:  # no static libstdc++ here: link it dynamically
        r = subprocess.run(link, capture_output=True, text=True)
    if r.returncode != 0:
        raise OrtOpsError(f"linking {LIB_NAME} failed: {(r.stderr.strip().splitlines() or ['?'])[0]}")
    return variants


def build_library(
    headers: str | os.PathLike[str] | None = None,
    fetch: bool = False,
    force: bool = False,
    say: Callable[[str], None] = lambda _: None,
) -> Path:
    """The cached library, built first when missing, stale or corrupt (or ``force``); OrtOpsError says why not.

    ``fetch``: when no headers are on the machine, download Debian's (``build-ops`` only)."""
    if sys.platform not in ("linux", "darwin"):
        raise OrtOpsError(f"the native qwha ops are built on Linux and macOS only, not {sys.platform}")
    root = cache_root()
    given = find_headers(headers) if headers is not None else None  # named headers are checked even when cached
    with _locked(root):
        lib, why = cached_library()
        if lib is not None and not force:
            return lib
        try:
            found = given or find_headers()
        except OrtOpsError:
            if not fetch:
                raise
            found = fetch_debian_headers(say)
        version, runtime = runtime_api_version()
        cxx = _compiler()
        say(
            f"building {LIB_NAME} ({'rebuild: ' + why if why != 'not built yet' else 'first build'}) with {cxx}, "
            f"headers {found.path} (C API {found.api_version}), for onnxruntime {version}"
        )
        final = _entry_dir()
        with tempfile.TemporaryDirectory(prefix=".build-", dir=root) as tmp:
            t = Path(tmp)
            stage = t / "entry"
            stage.mkdir()
            variants = _compile(cxx, found, stage / LIB_NAME, t)
            meta = {
                "source_hash": source_hash(),
                "onnxruntime": version,
                "runtime_api": runtime,
                "api_version": found.api_version,
                "headers": str(found.path),
                "headers_origin": found.origin,
                "compiler": cxx,
                "variants": variants,
                "sha256": hashlib.sha256((stage / LIB_NAME).read_bytes()).hexdigest(),
            }
            (stage / "build.json").write_text(json.dumps(meta, indent=2) + "\n")
            if final.exists():  # a stale or corrupt entry (readers re-check under the lock)
                shutil.rmtree(final)
            os.replace(stage, final)
        for old in root.glob(f"lib-*-ort{version}"):  # entries of older sources for this onnxruntime
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        say(f"built {final / LIB_NAME} (kernels: {', '.join(variants)})")
        return final / LIB_NAME

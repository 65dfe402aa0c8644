"""llama.cpp's own HF -> GGUF converter, obtained once from the package index.

The only maintained copy of upstream's converter on PyPI is the llama.cpp that the `llama-cpp-python` sdist vendors
(the `gguf` package is upstream's file library, without the converter): its `convert_hf_to_gguf.py`, the
`conversion/` package that script imports and the matching `gguf-py/gguf/`.
That sdist (pinned version, pinned sha256) is fetched with pip once, checked, and only those files (about 2 MB of
its 76 MB) are copied into $SQLTUNE_HOME/tools/ (default ~/.cache/sqltune), never into the checkout. The converter
then runs as a child of the current Python with its own gguf-py first on PYTHONPATH (the installed `gguf` may be
another version than the one it was written with).

SQLTUNE_NO_DOWNLOAD=1 forbids the download: the cached copy is used or the command fails with one line.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from sqltune.errors import SqltuneError

PACKAGE, VERSION = "llama-cpp-python", "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"  # PyPI's, checked by pip and by us
INSIDE = f"llama_cpp_python-{VERSION}/vendor/llama.cpp"  # where the sdist keeps llama.cpp
KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "gguf-py/LICENSE", "LICENSE")
SCRIPT = "convert_hf_to_gguf.py"
MARKER = "sqltune_source.txt"  # written last: a folder without it is not a finished copy
NO_DOWNLOAD = "SQLTUNE_NO_DOWNLOAD"
NEEDS = ("torch", "numpy", "sentencepiece", "transformers", "yaml", "tqdm", "requests")  # the converter's imports


def folder() -> Path:
    """Where the converter's files live: $SQLTUNE_HOME/tools/llama.cpp-from-llama-cpp-python-<version>."""
    from sqltune.catalog import home

    return home() / "tools" / f"llama.cpp-from-{PACKAGE}-{VERSION}"


def cached() -> Path | None:
    path = folder()
    return path if (path / MARKER).is_file() and (path / SCRIPT).is_file() else None


def downloads_off() -> bool:
    return os.environ.get(NO_DOWNLOAD, "").strip().lower() not in ("", "0", "false", "no")


def converter() -> Path:
    """The folder holding convert_hf_to_gguf.py, fetched on first use (one line when it cannot be had)."""
    found = cached()
    if found is not None:
        return found
    if downloads_off():
        raise SqltuneError(f"llama.cpp's converter is not in {folder()} and downloads are off ({NO_DOWNLOAD}="
                           f"{os.environ[NO_DOWNLOAD]}): unset it once, or run `make install`, to fetch "
                           f"{PACKAGE}=={VERSION} from PyPI")
    from sqltune.lock import held

    target = folder()
    target.parent.mkdir(parents=True, exist_ok=True)
    with held(target.with_name(target.name + ".lock"), "another sqltune is fetching llama.cpp's converter",
              "wait for it to finish"):
        if cached() is not None:  # the other one finished it while we waited
            return target
        print(f"fetching llama.cpp's converter once: {PACKAGE}=={VERSION} (a 76 MB sdist) from PyPI", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
            sdist = _download(Path(tmp))
            staged = Path(tmp) / "llama.cpp"
            _extract(sdist, staged)
            (staged / MARKER).write_text(f"{PACKAGE}=={VERSION} sha256 {SHA256}\nfiles: {', '.join(KEEP)} of "
                                         f"{INSIDE}/ (MIT licence: LICENSE)\n")
            if target.exists():  # an unfinished copy (no marker) from a run that was killed
                shutil.rmtree(target)
            os.replace(staged, target)
    return target


def _download(into: Path) -> Path:
    """pip download of the pinned sdist, hash-checked by pip (--require-hashes) and again here."""
    requirements = into / "requirements.txt"
    requirements.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{SHA256}\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                           "--require-hashes", "--disable-pip-version-check", "-q", "-d", str(into / "dl"),
                           "-r", str(requirements)], capture_output=True, text=True)
    sdist = into / "dl" / SDIST
    if proc.returncode != 0 or not sdist.is_file():
        lines = [x.strip() for x in (proc.stderr + proc.stdout).splitlines()
                 if x.strip() and not x.startswith("WARNING")]
        if any("DO NOT MATCH THE HASHES" in x for x in lines):
            raise SqltuneError(f"could not fetch llama.cpp's converter: the downloaded {SDIST} does not match its "
                               "pinned sha256 (nothing was kept)")
        raise SqltuneError(f"could not fetch llama.cpp's converter ({PACKAGE}=={VERSION} from PyPI): "
                           f"{(lines or ['pip download failed'])[-1]}")
    digest = hashlib.sha256()
    with open(sdist, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() != SHA256:
        raise SqltuneError(f"could not fetch llama.cpp's converter: {SDIST} has sha256 {digest.hexdigest()[:16]}…, "
                           f"not the pinned {SHA256[:16]}… (nothing was kept)")
    return sdist


def _wanted(name: str) -> str | None:
    """The path inside llama.cpp of a member we keep, else None (links, absolute paths and '..' never)."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not name.startswith(INSIDE + "/"):
        return None
    rel = name[len(INSIDE) + 1:]
    keep = any(rel == k if not k.endswith("/") else rel.startswith(k) for k in KEEP)
    return rel if keep and "__pycache__" not in path.parts else None


def _extract(sdist: Path, out: Path) -> None:
    """Copy the kept plain files out of the sdist (read and written by us: no link or special file is made)."""
    count = 0
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            rel = _wanted(member.name)
            if rel is None or not member.isfile():
                continue
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
            count += 1
    if not (out / SCRIPT).is_file() or not (out / "gguf-py" / "gguf" / "__init__.py").is_file():
        raise SqltuneError(f"{SDIST} does not hold {INSIDE}/{SCRIPT} and gguf-py as expected ({count} files kept)")


def missing_modules() -> list[str]:
    """The converter's imports this Python lacks (looked up, not imported)."""
    import importlib.util

    return [name for name in NEEDS if importlib.util.find_spec(name) is None]


def environment(tool: Path) -> dict[str, str]:
    """The child's environment: the vendored gguf-py first on PYTHONPATH, no model hub."""
    path = [str(tool / "gguf-py")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

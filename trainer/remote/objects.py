"""The object store named by checkpoint.remote, through fsspec (s3fs for s3://, gcsfs for
gs://, fsspec itself for file:// and the rest). Credentials and endpoints come from each
library's standard environment and files (AWS_ENDPOINT_URL, AWS_PROFILE, ~/.aws/...;
STORAGE_EMULATOR_HOST, GOOGLE_APPLICATION_CREDENTIALS...): none is ever read, printed or
written here, and a URL that carries one is refused.

Every upload is checked against what was sent: the object's size, and on GCS its md5Hash
(on S3, botocore sends a CRC32 of each PUT's body, which S3 checks before it stores it)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import socket
import time
from urllib.parse import urlsplit

BIG = 64 << 20  # files up to this size are read once, hashed and sent from memory


class RemoteError(Exception):
    """A store operation failed; str() is one line naming the store and the reason."""


def check_url(url: str) -> str | None:
    """What is wrong with `url` as checkpoint.remote (None: nothing)."""
    parts = urlsplit(str(url))
    if "://" not in str(url) or not parts.scheme:
        return f"received {url!r}; expected a URL such as s3://bucket/prefix or gs://bucket/prefix"
    if "@" in parts.netloc or parts.query:
        return (
            "received a URL with credentials or options in it; it would be written to the "
            "run's logs and config. Use the provider's environment variables or config files"
        )
    try:
        import fsspec
    except ImportError:
        return "needs the remote extra: pip install 'resumable-trainer[remote]'"
    if parts.scheme not in fsspec.available_protocols():
        known = ", ".join(p for p in ("s3", "gs", "file") if p in fsspec.available_protocols())
        return f"received {url!r}; unknown protocol {parts.scheme!r} (e.g. {known})"
    return None


def describe(e: BaseException) -> str:
    """One line for a failed store call: the error's own words, never a traceback."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, FileNotFoundError) and "bucket" not in text.lower():
        text = f"not found: {text}"
    return text[:300]


def _options(protocol: str) -> dict:
    """Library settings that keep a dead store from holding a call for minutes: our callers
    retry with their own backoff (trainer/remote/uploader.py)."""
    if protocol == "s3":
        config = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}}
        return {"config_kwargs": config}
    if protocol in ("file", "local"):
        return {"auto_mkdir": True}  # as an object store does: no directories to make first
    return {}


class Store:
    """One run's prefix in an object store. Paths given to its methods are relative to it."""

    def __init__(self, url: str):
        # gcsfs's experimental zonal/HNS layer asks a gRPC service for each bucket's type
        # before an operation, and does not remember a failed answer: against an emulator,
        # or on a network without that service, each call waited up to 60 s (measured). The
        # JSON API it falls back to serves every bucket; the variable still decides if set.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        import fsspec

        for name in ("gcsfs", "google.auth", "aiobotocore", "botocore"):  # their retries' chatter
            logging.getLogger(name).setLevel(logging.ERROR)
        self.url = str(url).rstrip("/")
        protocol = urlsplit(self.url).scheme
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **_options(protocol))
        except Exception as e:  # a missing library, a malformed URL
            raise RemoteError(f"{self.url}: {describe(e)}") from None
        self.root = self.root.rstrip("/")
        # GCS: a store that reports an MD5 to check against (and see _pipe)
        self._gcs = protocol in ("gs", "gcs")

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def where(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    # ------------------------------------------------------------ writes
    def put_file(self, local: str, rel: str, size: int | None = None) -> int:
        """Upload `local` as `rel`, then check the object against the bytes sent (size, MD5).
        `size`: what the file must hold (the manifest's record). Returns the bytes sent."""
        have = os.path.getsize(local)
        if size is not None and have != size:
            raise RemoteError(f"{local} holds {have} bytes, its manifest says {size}")
        if have <= BIG:
            with open(local, "rb") as f:
                self.put_bytes(rel, f.read())
        else:
            self.fs.put_file(local, self.path(rel))
            self._check(rel, have, None)
        return have

    def put_bytes(self, rel: str, data: bytes) -> None:
        self._pipe(rel, data)
        self._check(rel, len(data), hashlib.md5(data).digest() if self._gcs else None)

    def _pipe(self, rel: str, data: bytes) -> None:
        """Send `data` as object `rel`. On GCS, bytes that end in a CR go as a resumable
        upload: gcsfs sends smaller objects as one multipart body whose parts end at a bare
        LF, and a MIME parser may read the CR before it as part of the delimiter and drop it
        (gcp-storage-emulator stores "abc\r" as "abc", measured; the size check then fails
        every retry). A resumable upload sends the bytes as they are."""
        if self._gcs and data.endswith(b"\r"):
            self.fs.pipe_file(self.path(rel), data, chunksize=len(data))
            return
        self.fs.pipe_file(self.path(rel), data)

    def _check(self, rel: str, size: int, md5: bytes | None) -> None:
        with contextlib.suppress(AttributeError):
            self.fs.invalidate_cache(self.path(rel))
        info = self.fs.info(self.path(rel))
        if int(info.get("size", -1)) != size:
            raise RemoteError(f"{self.where(rel)}: {info.get('size')} bytes stored, {size} sent")
        stored = _stored_md5(info)
        if md5 is not None and stored is not None and stored != md5:
            raise RemoteError(f"{self.where(rel)}: stored MD5 differs from the bytes sent")

    def remove(self, rels: list[str]) -> None:
        """Delete objects (missing ones are not an error), in the order given."""
        for rel in rels:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(rel))

    # ------------------------------------------------------------ reads
    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def get_file(self, rel: str, local: str) -> None:
        """Download `rel` to `local` through a temporary name (never a torn file)."""
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        tmp = f"{local}.part-{os.getpid()}"
        try:
            self.fs.get_file(self.path(rel), tmp)
            os.replace(tmp, local)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def list(self, rel: str) -> list[str]:
        """Names of the objects directly under `rel` (none if it does not exist)."""
        return [p.rsplit("/", 1)[-1] for p in self._ls(rel) if p]

    def find(self, rel: str) -> list[str]:
        """Every object under `rel`, as paths relative to `rel`."""
        base = self.path(rel)
        with contextlib.suppress(AttributeError):
            self.fs.invalidate_cache(base)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        return sorted(p[len(base) + 1 :] for p in found if p.startswith(base + "/"))

    def _ls(self, rel: str) -> list[str]:
        base = self.path(rel)
        with contextlib.suppress(AttributeError):
            self.fs.invalidate_cache(base)
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        return [e["name"].rstrip("/") for e in entries if e.get("type") != "directory"]

    # ------------------------------------------------------------ start-up
    def probe(self) -> None:
        """Write, read back and delete a probe object: RemoteError (one line) if the store
        is unreachable, missing, read-only or refuses the credentials."""
        rel = f".probe-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        data = os.urandom(64)
        try:
            self.put_bytes(rel, data)
            if self.read_bytes(rel) != data:
                raise RemoteError("the probe object read back differs from what was written")
            self.remove([rel])
        except RemoteError as e:
            raise RemoteError(f"{self.url}: {e}") from None
        except Exception as e:
            raise RemoteError(f"{self.url}: {describe(e)}") from None


def _stored_md5(info: dict) -> bytes | None:
    """The MD5 a store reports for an object, where it is one: GCS's md5Hash. Not S3's
    ETag: under SSE-KMS or SSE-C it is no MD5 of the data; there botocore sends a CRC32 of
    each PUT's body that S3 checks before it stores the object."""
    if info.get("md5Hash"):  # GCS: base64
        with contextlib.suppress(ValueError):
            return base64.b64decode(info["md5Hash"])
    return None

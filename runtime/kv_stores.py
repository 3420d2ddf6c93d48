"""The lower tiers of the KV cache: KV blocks as bytes, by key, in host memory, a local
directory or an S3-compatible object store.

A key names one block of one model: the model's identity and the chained hash of every
token up to the block's end (runtime/kv_offload.py makes them), so two artifacts never
share a block and equal keys mean equal KV. At tensor parallelism each rank stores its own
slice of a block (its KV heads) under the same key with its rank appended to the object's
name (`KEY.rank1.kv`), so no rank ever reads another's slice.

    HostStore       host memory, LRU within a byte budget (its copy buffers pinned on a GPU host)
    DirectoryStore  one file per block under a directory
    S3Store         one object per block under s3://bucket/prefix, through boto3

Disk and object-store blocks carry a sha256 of their payload: a block that reads back
different (a torn write, a flipped bit, someone else's file) is a failed load, and the
engine computes the block instead. Their errors raise `StoreError`; the caller counts
them and carries on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import torch

from braze.ir.errors import BrazeError

log = logging.getLogger("braze.runtime")

MAGIC = b"BRAZEKV1"
_HEADER = len(MAGIC) + 32          # magic, then the payload's sha256


class StoreError(Exception):
    """A lower tier failed to read or write a block (counted, never fatal)."""


class CorruptBlock(StoreError):
    """A block read back, and not as it was written (the tier itself works)."""


def seal(payload: bytes) -> bytes:
    return MAGIC + hashlib.sha256(payload).digest() + payload


def unseal(data: bytes, key: str, where: str) -> bytes:
    if len(data) < _HEADER or data[:len(MAGIC)] != MAGIC:
        raise CorruptBlock(f"KV block {key} in {where} is not a braze KV block")
    payload = data[_HEADER:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC):_HEADER]:
        raise CorruptBlock(f"KV block {key} in {where} is corrupt (checksum mismatch)")
    return payload


class HostStore:
    """Blocks as host tensors, least recently used evicted first once `capacity_bytes`
    is reached. Thread-safe: a background stager adds blocks read from a lower tier."""

    name = "host"

    def __init__(self, capacity_bytes: int, block_bytes: int, pin: bool = False):
        if capacity_bytes < block_bytes:
            raise BrazeError(f"the host KV tier ({capacity_bytes} bytes) cannot hold one block "
                             f"({block_bytes} bytes); give it more memory (--kv-offload-cpu-gb)")
        self.capacity_blocks = capacity_bytes // block_bytes
        self.block_bytes = block_bytes
        self.pin = pin
        self._blocks: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            t = self._blocks.get(key)
            if t is not None:
                self._blocks.move_to_end(key)
            return t

    def put(self, key: str, block: torch.Tensor) -> None:
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return
            while len(self._blocks) >= self.capacity_blocks:
                self._blocks.popitem(last=False)
                self.evictions += 1
            if block.untyped_storage().nbytes() > self.block_bytes:
                # a row of a many-block copy buffer: kept as a view, it would keep the
                # whole buffer alive and the tier past its budget
                block = block.clone()
            self._blocks[key] = block

    def new_buffer(self, num_blocks: int) -> torch.Tensor:
        """Host memory for `num_blocks` blocks, pinned where that makes copies asynchronous."""
        return torch.empty((num_blocks, self.block_bytes), dtype=torch.uint8,
                           pin_memory=self.pin)


class DirectoryStore:
    """One file per block, written to a temporary name and renamed, so a reader never sees
    a half-written block. At most `capacity_bytes` of block files: the least recently used
    (written or read) are deleted for room. The files an earlier run left (a restart) are
    found at start, reused, and counted against the cap, oldest first to go. A block file
    that reads back corrupt is deleted (it is computed, and stored again)."""

    name = "disk"

    def __init__(self, path, suffix: str = "", capacity_bytes: int | None = None):
        self.root = Path(path).expanduser()
        self.suffix = suffix            # ".rankR" at tensor parallelism
        self.capacity_bytes = capacity_bytes        # None: no cap
        self.evictions = 0
        self._lock = threading.Lock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BrazeError(f"KV offload directory {self.root} cannot be created ({e}); "
                             f"pass a writable --kv-offload-dir") from None
        # every store would fail, counted but never said: one write now says it
        try:
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise BrazeError(f"KV offload directory {self.root} cannot be written ({e}); "
                             f"pass a writable --kv-offload-dir") from None
        # key -> file size, least recently used first
        self._files: OrderedDict[str, int] = OrderedDict()
        self.bytes = 0
        self._scan()
        with self._lock:
            self._evict(0)

    @property
    def where(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{self.suffix}.kv"

    def _scan(self) -> None:
        """The block files already here (an earlier run's), oldest modified first."""
        tail = f"{self.suffix}.kv"
        found = []
        for sub in self.root.iterdir():
            if len(sub.name) != 2 or not sub.is_dir():
                continue
            for f in sub.iterdir():
                key = f.name[:-len(tail)]
                if not f.name.endswith(tail) or len(key) != 32 or not key.startswith(sub.name):
                    continue            # another rank's, a temporary, not a block
                try:
                    st = f.stat()
                except OSError:
                    continue
                found.append((st.st_mtime, key, st.st_size))
        for _, key, size in sorted(found):
            self._files[key] = size
            self.bytes += size

    def _evict(self, room: int) -> None:
        """Delete least recently used block files until `room` more bytes fit the cap
        (with the lock held)."""
        cap = self.capacity_bytes
        if cap is None:
            return
        while self._files and self.bytes + room > cap:
            key, size = self._files.popitem(last=False)
            self.bytes -= size
            self.evictions += 1
            try:
                self._path(key).unlink()
            except OSError:             # gone already (another process sharing the tier)
                pass

    def _forget(self, key: str) -> None:
        with self._lock:
            size = self._files.pop(key, None)
            if size is not None:
                self.bytes -= size

    def contains(self, key: str) -> bool:
        return self._path(key).is_file()

    def get(self, key: str) -> bytes | None:
        p = self._path(key)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            self._forget(key)
            return None
        except OSError as e:
            raise StoreError(f"KV block {key} cannot be read from {p} ({e})") from None
        try:
            payload = unseal(data, key, str(p))
        except CorruptBlock:
            self._forget(key)
            try:
                p.unlink()
            except OSError:
                pass
            raise
        with self._lock:
            if key in self._files:
                self._files.move_to_end(key)
            else:                       # written by another process sharing the tier
                self._files[key] = len(data)
                self.bytes += len(data)
        try:
            os.utime(p)                 # a restart's scan finds it recently used
        except OSError:
            pass
        return payload

    def put(self, key: str, payload: bytes) -> None:
        p = self._path(key)
        data = seal(payload)
        cap = self.capacity_bytes
        if cap is not None and len(data) > cap:
            raise StoreError(f"KV block {key} ({len(data)} bytes) is larger than the disk "
                             f"tier's cap ({cap} bytes, --kv-offload-dir-gb)")
        with self._lock:
            if key in self._files and p.is_file():      # equal keys: equal KV
                self._files.move_to_end(key)
                return
            self._evict(len(data))
        tmp = None
        try:
            p.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-")
            try:
                f = os.fdopen(fd, "wb")
            except OSError:
                os.close(fd)
                raise
            with f:
                f.write(data)
            os.replace(tmp, p)
        except OSError as e:            # a full disk among them
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            raise StoreError(f"KV block {key} cannot be written to {p} ({e})") from None
        with self._lock:
            old = self._files.pop(key, 0)
            self._files[key] = len(data)
            self.bytes += len(data) - old
            self._evict(0)


class S3Store:
    """One object per block under `s3://bucket/prefix`. Credentials, region and endpoint
    come from boto3's usual sources (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_DEFAULT_REGION, AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 for an S3-compatible
    server, ~/.aws/config)."""

    name = "s3"

    def __init__(self, url: str, client=None, suffix: str = ""):
        u = urlparse(url)
        self.suffix = suffix            # ".rankR" at tensor parallelism
        if u.scheme != "s3" or not u.netloc:
            raise BrazeError(f"--kv-offload-s3 wants s3://BUCKET[/PREFIX], got {url!r}; the "
                             f"address of an S3-compatible server (MinIO, Ceph, ...) goes in "
                             f"AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3)")
        self.bucket, self.prefix = u.netloc, u.path.strip("/")
        self.url = url
        if client is None:
            client = self._connect()
        self.client = client

    @property
    def where(self) -> str:
        return self.url

    def _connect(self):
        """boto3's client, checked once: without credentials every store and load would
        fail (counted, never said), and a bucket that does not exist is a wrong flag, so
        both are refused here; a store that cannot be reached now may be down for a while
        (its failures are counted and the blocks computed), so that is a warning."""
        try:
            import boto3
        except ImportError:
            raise BrazeError("--kv-offload-s3 needs the boto3 package: "
                             "pip install boto3") from None
        from botocore.config import Config
        session = boto3.Session()
        if session.get_credentials() is None:
            raise BrazeError(f"--kv-offload-s3 {self.url}: no AWS credentials found; set "
                             f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, "
                             f"~/.aws/credentials, an instance role) for the bucket")
        # a tier that is down must cost a step little: two tries, short timeouts
        client = session.client("s3", config=Config(
            retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=2,
            read_timeout=10))
        try:
            client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            if _not_found(e):
                raise BrazeError(f"--kv-offload-s3 {self.url}: bucket {self.bucket!r} does "
                                 f"not exist at {client.meta.endpoint_url}; create it or fix "
                                 f"the URL (or AWS_ENDPOINT_URL)") from None
            if _error_code(e) == "403":
                self._check_credentials(client)
                log.warning("KV tier %s: the bucket cannot be listed with these credentials "
                            "(403); braze needs s3:GetObject and s3:PutObject on its objects, "
                            "and braze_kv_offload_failures_total counts the misses", self.url)
                return client
            log.warning("KV tier %s cannot be reached now (%s): its blocks are computed "
                        "instead until it can, and braze_kv_offload_failures_total counts "
                        "the misses", self.url, e)
        return client

    def _check_credentials(self, client) -> None:
        """HeadBucket answered 403, which says no more (a HEAD has no body): a GET does. A
        key id or secret the endpoint refuses fails every store and load, so it is refused
        here; a missing permission may be only the listing's (a policy that grants the
        objects alone), so it is not."""
        try:
            client.get_object(Bucket=self.bucket, Key=self._key("braze-credentials-check"))
        except Exception as e:
            code = _error_code(e)
            if code in BAD_CREDENTIALS:
                raise BrazeError(f"--kv-offload-s3 {self.url}: {client.meta.endpoint_url} "
                                 f"refuses these AWS credentials ({code}); check "
                                 f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                                 f"AWS_PROFILE, AWS_SESSION_TOKEN) for this "
                                 f"endpoint") from None

    def _key(self, key: str) -> str:
        name = f"{key}{self.suffix}.kv"
        return f"{self.prefix}/{name}" if self.prefix else name

    def contains(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as e:
            if _not_found(e):
                return False
            raise StoreError(f"KV block {key}: {self.url} cannot be queried ({e})") from None

    def get(self, key: str) -> bytes | None:
        try:
            data = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as e:
            if _not_found(e):
                return None
            raise StoreError(f"KV block {key} cannot be read from {self.url} ({e})") from None
        return unseal(data, key, self.url)

    def put(self, key: str, payload: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=seal(payload))
        except Exception as e:
            raise StoreError(f"KV block {key} cannot be written to {self.url} ({e})") from None


# S3 error codes that mean the credentials themselves are wrong (not a permission)
BAD_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                   "ExpiredToken", "InvalidClientTokenId")


def _error_code(e: Exception):
    return (getattr(e, "response", None) or {}).get("Error", {}).get("Code")


def _not_found(e: Exception) -> bool:
    return _error_code(e) in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")

"""Ed25519 signatures of artifacts, and the keys a host signs with and trusts.

A signature covers manifest.json byte for byte, and the manifest holds the sha256 of every
other file, so it covers the whole artifact, cubins included (which, unlike plans and
kernel sources, cannot be regenerated cheaply to check them). It is written beside the
manifest as signature.json:

    {"format": "braze-signature", "algorithm": "ed25519", "key_id": "ed25519:1a2b...",
     "public_key": "<base64 of the 32-byte key>", "signature": "<base64>"}

Keys live in the user's braze configuration directory ($XDG_CONFIG_HOME/braze, else
~/.config/braze):

    signing-key.pem          the per-user private key, made on the first `braze compile`
                             (mode 0600); `braze compile --sign KEY` uses another
    trusted-keys/*.pub       public keys whose signed artifacts run with no flags; the
                             per-user key's own public half is put here when it is made,
                             so what you compiled yourself loads as it is

Key files are PEM (`openssl genpkey -algorithm ed25519`) or OpenSSH (`ssh-keygen -t
ed25519`). A key directory that other users can write to is refused, as ssh refuses one.
Shared by the compiler (signs) and the runtime (checks); imports neither.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from braze.artifact import MANIFEST, SIGNATURE
from braze.ir.errors import BrazeError

FORMAT = "braze-signature"
DEFAULT_KEY = "signing-key.pem"
TRUSTED_DIR = "trusted-keys"
KEY_SUFFIXES = (".pub", ".pem")


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "braze"


def default_trusted_dir() -> Path:
    return config_dir() / TRUSTED_DIR


def key_id(raw_public: bytes) -> str:
    return "ed25519:" + hashlib.sha256(raw_public).hexdigest()[:16]


def _crypto(module: str):
    """A module of the `cryptography` package, or a clear error when it is not installed
    (an install with --no-deps, as on a GPU image with no network)."""
    import importlib
    try:
        return importlib.import_module(f"cryptography.{module}")
    except ImportError:
        raise BrazeError("artifact signatures (Ed25519) need the cryptography package, which "
                         "is not installed: pip install 'cryptography>=41'") from None


def _ed25519():
    ed25519 = _crypto("hazmat.primitives.asymmetric.ed25519")
    return ed25519


def _raw(public_key) -> bytes:
    s = _crypto("hazmat.primitives.serialization")
    return public_key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)


# -- private keys ---------------------------------------------------------------------------

def load_private_key(path) -> object:
    """An Ed25519 private key from a PEM or OpenSSH file (not passphrase-protected)."""
    s = _crypto("hazmat.primitives.serialization")
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BrazeError(f"signing key {path} cannot be read ({e.strerror}); make one with "
                         f"`openssl genpkey -algorithm ed25519 -out {path}`") from None
    key = None
    for load in (s.load_pem_private_key, s.load_ssh_private_key):
        try:
            key = load(data, password=None)
            break
        except TypeError:        # encrypted
            raise BrazeError(f"signing key {path} is protected by a passphrase; braze signs "
                             f"with an unencrypted key file (keep it mode 0600)") from None
        except Exception:        # not this format, or not a key at all
            continue
    if not isinstance(key, _ed25519().Ed25519PrivateKey):
        raise BrazeError(f"signing key {path} is not an Ed25519 private key in PEM or OpenSSH "
                         f"format (make one with `openssl genpkey -algorithm ed25519 -out KEY`)")
    return key


def default_private_key(log=None):
    """The per-user signing key, made (with its public half in trusted-keys/) on first use;
    None, with a warning, where the configuration directory cannot be written."""
    s = _crypto("hazmat.primitives.serialization")
    path = config_dir() / DEFAULT_KEY
    if path.exists():
        return load_private_key(path)
    key = _ed25519().Ed25519PrivateKey.generate()
    pem = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    public = key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH)
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    try:
        config_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
        (config_dir() / TRUSTED_DIR).mkdir(exist_ok=True, mode=0o700)
        if not _create_exclusive(path, pem, 0o600):
            return load_private_key(path)           # another process made it first
        # user@host.pub may hold an earlier key of this user (signing-key.pem was deleted
        # or lost): it stays trusted, for what it signed, and the new one goes beside it
        pub = config_dir() / TRUSTED_DIR / f"{who}.pub"
        if not _create_exclusive(pub, public + f" braze {who}\n".encode(), 0o644):
            pub = pub.with_name(f"{who}-{key_id(_raw(key.public_key()))[len('ed25519:'):]}.pub")
            _create_exclusive(pub, public + f" braze {who}\n".encode(), 0o644)
    except OSError as e:
        if log:
            log(f"warning: the artifact is not signed: cannot make the per-user key {path} "
                f"({e.strerror}); loading it will verify it by regenerating its kernels instead")
        return None
    if log:
        log(f"made your braze signing key {path} ({key_id(_raw(key.public_key()))}); artifacts "
            f"you compile are signed with it. To run them on another host, copy "
            f"{pub} into that host's "
            f"~/.config/braze/{TRUSTED_DIR}/ or a --trusted-keys DIR")
    return key


def _create_exclusive(path: Path, data: bytes, mode: int) -> bool:
    """Write `path` whole or not at all, never over an existing file: False if it exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


# -- public keys ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    raw: bytes
    file: Path


def trusted_keys(extra_dir=None) -> dict[bytes, TrustedKey]:
    """The public keys this user trusts: the per-user trusted-keys/ directory (if it exists)
    and `extra_dir` (which must)."""
    out: dict[bytes, TrustedKey] = {}
    dirs = [default_trusted_dir()]
    if extra_dir is not None:
        extra_dir = Path(extra_dir)
        if not extra_dir.is_dir():
            raise BrazeError(f"--trusted-keys {extra_dir} is not a directory of public keys")
        dirs.append(extra_dir)
    for d in dirs:
        if not d.is_dir():
            continue
        _check_private_to_owner(d)
        for f in sorted(d.iterdir()):
            if f.suffix in KEY_SUFFIXES and f.is_file():
                _check_private_to_owner(f)
                raw = _load_public(f)
                out.setdefault(raw, TrustedKey(key_id(raw), raw, f))
    return out


def _check_private_to_owner(path: Path) -> None:
    st = path.stat()
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or st.st_uid not in (os.getuid(), 0):
        raise BrazeError(f"trusted key {'directory' if path.is_dir() else 'file'} {path} can be "
                         f"changed by other users, so anyone could make braze trust their key; "
                         f"make it yours and not writable by others (chmod go-w {path})")


def _load_public(path: Path) -> bytes:
    s = _crypto("hazmat.primitives.serialization")
    data = path.read_bytes()
    for load in (s.load_pem_public_key, s.load_ssh_public_key):
        try:
            key = load(data.strip())
        except Exception:         # not this format
            continue
        if isinstance(key, _ed25519().Ed25519PublicKey):
            return _raw(key)
    raise BrazeError(f"trusted key file {path} is not an Ed25519 public key in PEM or OpenSSH "
                     f"format (`openssl pkey -in KEY -pubout`, or an ssh-ed25519 line)")


# -- signatures -----------------------------------------------------------------------------

def sign_artifact(root: Path, key) -> str:
    """Write root/signature.json over root/manifest.json's bytes; -> the key id."""
    root = Path(root)
    raw = _raw(key.public_key())
    doc = {"format": FORMAT, "algorithm": "ed25519", "key_id": key_id(raw),
           "public_key": base64.b64encode(raw).decode(),
           "signature": base64.b64encode(key.sign((root / MANIFEST).read_bytes())).decode()}
    (root / SIGNATURE).write_text(json.dumps(doc, indent=1) + "\n")
    return doc["key_id"]


@dataclass(frozen=True)
class Signature:
    key_id: str
    raw: bytes
    valid: bool          # the signature matches the manifest's bytes


def read_signature(root: Path, manifest_bytes: bytes) -> Signature | None:
    """The artifact's signature checked against `manifest_bytes` (the manifest exactly as it
    was read for loading); None if it has none."""
    path = Path(root) / SIGNATURE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_bytes()[: 1 << 16])
        raw = base64.b64decode(doc["public_key"], validate=True)
        sig = base64.b64decode(doc["signature"], validate=True)
        if doc.get("format") != FORMAT or doc.get("algorithm") != "ed25519":
            raise ValueError("not a braze ed25519 signature")
        public = _ed25519().Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise BrazeError(f"{path} is not a valid braze signature ({str(e)[:120]})") from None
    InvalidSignature = _crypto("exceptions").InvalidSignature
    try:
        public.verify(sig, manifest_bytes)
        valid = True
    except InvalidSignature:
        valid = False
    return Signature(key_id(raw), raw, valid)

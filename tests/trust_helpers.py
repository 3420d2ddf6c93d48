"""The attacker's tools for the trust tests: copy an artifact, edit its files, recompute the
manifest's sha256 entries so they match again (the hashes live in the manifest, so by
themselves they prove nothing), sign it, and make keys."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from braze.artifact import MANIFEST, SIGNATURE, sha256_file


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def manifest(art: Path) -> dict:
    return json.loads((art / MANIFEST).read_text())


def write_manifest(art: Path, m: dict) -> None:
    (art / MANIFEST).write_text(json.dumps(m, indent=1) + "\n")


def rehash(art: Path, keep_signature: bool = False) -> None:
    """List every regular file again with its current sha256, as whoever edited them would."""
    m = manifest(art)
    m["files"] = {p.relative_to(art).as_posix(): sha256_file(p) for p in sorted(art.rglob("*"))
                  if p.is_file() and not p.is_symlink() and p.name not in (MANIFEST, SIGNATURE)}
    write_manifest(art, m)
    if not keep_signature:
        (art / SIGNATURE).unlink(missing_ok=True)


def payload(marker: Path) -> str:
    """Python that proves it ran by creating `marker` (and does nothing else)."""
    return f"open({str(marker)!r}, 'w').write('ran')\n"


def make_key(directory: Path, name: str = "ci", fmt: str = "pem") -> tuple[Path, Path]:
    """A fresh Ed25519 key pair: (private key file, public key file in `directory`/keys)."""
    key = Ed25519PrivateKey.generate()
    if fmt == "pem":
        private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                    ser.NoEncryption())
        public = key.public_key().public_bytes(ser.Encoding.PEM,
                                               ser.PublicFormat.SubjectPublicKeyInfo)
    else:
        private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH,
                                    ser.NoEncryption())
        public = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
    keys = directory / "keys"
    keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    priv = directory / f"{name}.key"
    priv.write_bytes(private)
    priv.chmod(0o600)
    pub = keys / f"{name}.pub"
    pub.write_bytes(public)
    return priv, pub


def another_host(home: Path) -> dict:
    """The environment of a user with another home and braze configuration (another host:
    its own per-user key, none of ours), for cli_helpers.run(env=...)."""
    home.mkdir(parents=True, exist_ok=True)
    return {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}

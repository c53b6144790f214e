"""The service's Ed25519 signing key and the public keys it has ever signed with.

The current private key is ``FINDLADY_SIGNING_KEY`` (base64 of the 32-byte seed) or, unset,
``data_dir/signing.key``, generated on first use like the other secrets (mode 0600). Rotation
(``rotate``) keeps the retired public key in ``data_dir/signing-keys/<key_id>.pub`` so reports
signed before it still verify; retired keys may also be given as
``FINDLADY_SIGNING_PUBLIC_KEYS`` (comma-separated base64 of the 32 raw bytes). The key files
are re-read on each use, so a rotation by another process takes effect without a restart.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from app.core.config import Settings, _file_secret


class SigningKeyError(ValueError):
    """A configured key that is not base64 of 32 bytes."""


def _decode32(text: str, what: str) -> bytes:
    text = text.strip()
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_" if ("-" in text or "_" in text) else None)
    except (binascii.Error, ValueError):
        raise SigningKeyError(f"{what} is not base64") from None
    if len(raw) != 32:
        raise SigningKeyError(f"{what} must be base64 of 32 bytes, got {len(raw)}")
    return raw


class SigningKeys:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.key_file = settings.data_dir / "signing.key"
        self.retired_dir = settings.data_dir / "signing-keys"

    def current(self) -> Ed25519PrivateKey:
        s = self.settings.signing_key
        if s is not None:
            return Ed25519PrivateKey.from_private_bytes(_decode32(s.get_secret_value(), "FINDLADY_SIGNING_KEY"))
        # token_urlsafe(32) is base64url of 32 random bytes: a fresh Ed25519 seed.
        return Ed25519PrivateKey.from_private_bytes(_decode32(_file_secret(self.key_file), str(self.key_file)))

    def public_keys(self) -> list[Ed25519PublicKey]:
        """The current key first, then every retired one (setting, then folder; no duplicates)."""
        from findlady_core.signing import raw_public

        keys = [self.current().public_key()]
        texts = [t for t in (self.settings.signing_public_keys or "").split(",") if t.strip()]
        if self.retired_dir.is_dir():
            texts += [p.read_text() for p in sorted(self.retired_dir.glob("*.pub"))]
        seen = {raw_public(keys[0])}
        for i, text in enumerate(texts):
            raw = _decode32(text, f"retired signing key {i}")
            if raw not in seen:
                seen.add(raw)
                keys.append(Ed25519PublicKey.from_public_bytes(raw))
        return keys

    def rotate(self) -> str:
        """Retire the file key (its public half stays published) and start a new one; returns
        the new key id. A key given by setting is rotated by changing the setting instead."""
        from findlady_core.signing import key_id, public_entry, raw_public

        if self.settings.signing_key is not None:
            raise SigningKeyError("FINDLADY_SIGNING_KEY is set: rotate by setting a new key and adding the old "
                                  "public key to FINDLADY_SIGNING_PUBLIC_KEYS")
        old = self.current().public_key()
        self.retired_dir.mkdir(parents=True, exist_ok=True)
        entry = public_entry(old)
        (self.retired_dir / f"{entry['key_id']}.pub").write_text(entry["public_key"] + "\n")
        tmp = self.key_file.with_name(f".{self.key_file.name}.{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        os.replace(tmp, self.key_file)
        return key_id(raw_public(self.current().public_key()))

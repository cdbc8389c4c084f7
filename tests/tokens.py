"""Keys and tokens for the authentication tests (made fresh for each test session)."""

from __future__ import annotations

import json
import time
from functools import cache
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SECRET = "s3cret-for-tests-only-0123456789abcdef"  # HS256 wants 32+ bytes


def claims(**extra: Any) -> dict[str, Any]:
    return {
        "sub": "alice",
        "exp": int(time.time()) + 600,
        "groups": ["chat", "team.*"],
        "publish": ["chat"],
        **extra,
    }


def hs256(secret: str = SECRET, **extra: Any) -> str:
    return jwt.encode(claims(**extra), secret, algorithm="HS256")


@cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@cache
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def rs256(kid: str | None = None, **extra: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(**extra), rsa_key(), algorithm="RS256", headers=headers)


def es256(**extra: Any) -> str:
    return jwt.encode(claims(**extra), ec_key(), algorithm="ES256")


def write_jwks(path: Path, kid: str) -> Path:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key().public_key()))
    path.write_text(json.dumps({"keys": [{**jwk, "kid": kid, "alg": "RS256", "use": "sig"}]}))
    return path


def unsigned(**extra: Any) -> str:
    """An `alg: none` token: no signature at all."""
    return jwt.encode(claims(**extra), None, algorithm="none")  # type: ignore[arg-type]

"""TLS files from command lines and settings, loaded once before anything serves or dials with them: uvicorn and
gRPC read them only inside their start-up (a traceback, or gRPC's C core logging and carrying on), and OpenSSL asks
the terminal for the passphrase of an encrypted key."""

from __future__ import annotations

import ssl
from pathlib import Path

# OpenSSL's words (Python's and gRPC's alike) for a failed TLS handshake -> what to do about it
TLS_HINTS = {
    "unable to get local issuer certificate": "to trust a private CA or a self-signed server, give its PEM with "
    "{ca_flag}",
    "self-signed certificate": "to trust a self-signed server, give its certificate with {ca_flag}",
    "self signed certificate": "to trust a self-signed server, give its certificate with {ca_flag}",
    "WRONG_VERSION_NUMBER": "that port does not speak TLS: use {plain}",
}


def tls_hint(message: str, ca_flag: str = "--ca-cert", plain: str = "http:// or grpc://") -> str:
    """What to do about the failed TLS handshake an error message describes, as " (...)"; "" for other errors."""
    hint = next((hint for sign, hint in TLS_HINTS.items() if sign in message), None)
    return f" ({hint.format(ca_flag=ca_flag, plain=plain)})" if hint else ""


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    raise _EncryptedKey


def check_server_files(certfile: Path, keyfile: Path) -> None:
    """ValueError saying why when the PEM certificate chain and its key cannot serve TLS together."""
    for path in (certfile, keyfile):
        _check_readable(path)
    _check_certificates(certfile)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A password callback instead of None: without one OpenSSL prompts on the terminal for an encrypted key.
        context.load_cert_chain(certfile, keyfile, password=_no_password)
    except _EncryptedKey:
        raise ValueError(
            f"{keyfile} is encrypted; give the key without its passphrase (openssl pkey -in KEY -out PLAIN)"
        ) from None
    except ssl.SSLError as error:
        problem = (
            f"is not the private key of {certfile}'s certificate"
            if error.reason == "KEY_VALUES_MISMATCH"
            else "holds no PEM private key"
        )
        raise ValueError(f"{keyfile} {problem}") from None


def _check_readable(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    try:
        path.read_bytes()
    except OSError as error:  # e.g. a key mounted 0600 for root into an image that runs as another user
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None


def _check_certificates(path: Path) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as error:
        raise ValueError(f"{path} holds no PEM certificate ({error.reason or error})") from None


def client_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client's TLS context trusting `ca_file` (PEM), else the system's certificate authorities; ValueError
    saying why when the file holds none."""
    if ca_file is None:
        return ssl.create_default_context()
    _check_readable(ca_file)
    _check_certificates(ca_file)
    return ssl.create_default_context(cafile=ca_file)

"""TLS files from command lines and settings, loaded once before anything serves or dials with them: uvicorn and
gRPC read them only inside their start-up (a traceback, or gRPC's C core logging and carrying on), and OpenSSL asks
the terminal for the passphrase of an encrypted key."""

from __future__ import annotations

import argparse
import os
import re
import ssl
from pathlib import Path

from cryptography import x509

# OpenSSL's words (Python's and gRPC's alike) for a failed TLS handshake -> what to do about it
TLS_HINTS = {
    "unable to get local issuer certificate": "to trust a private CA or a self-signed server, give its PEM with "
    "{ca_flag}",
    "self-signed certificate": "to trust a self-signed server, give its certificate with {ca_flag}",
    "self signed certificate": "to trust a self-signed server, give its certificate with {ca_flag}",
    "WRONG_VERSION_NUMBER": "that port does not speak TLS: use {plain}",
    # gRPC over TLS at a TLS port that speaks HTTP/1.1 only (an HTTPS server) or nothing gRPC knows
    "missing selected ALPN property": "that TLS port does not speak gRPC; for an HTTPS port use https://",
}

# A server that refuses a client certificate, or misses one it requires, closes the connection without a TLS alert
# (uvicorn's asyncio and gRPC alike, measured): the client sees only a connection closed before any answer.
CLOSED_SIGNS = (
    "Server disconnected without sending a response",  # httpx
    "Remote end closed connection without response",  # urllib
    "Socket closed",  # gRPC
    "connection closed",  # geventhttpclient (tritonclient.http)
    "UNEXPECTED_EOF_WHILE_READING",  # OpenSSL under TLS 1.2
)


CLIENT_FLAGS = (
    (
        "--ca-cert",
        "RESNET_CA_CERT",
        "PEM file of the certificate authorities to trust for https:// and grpcs:// (a private CA or a self-signed "
        "server; default: the system's)",
    ),
    (
        "--client-cert",
        "RESNET_CLIENT_CERT",
        "PEM certificate (chain) to present to a server that requires client certificates (mutual TLS), with "
        "--client-key",
    ),
    ("--client-key", "RESNET_CLIENT_KEY", "PEM private key of --client-cert, not encrypted"),
)


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """--ca-cert, --client-cert and --client-key, for a command that dials https:// or grpcs://: files, None when
    neither the flag nor its RESNET_* variable gives one."""
    for flag, variable, text in CLIENT_FLAGS:
        parser.add_argument(
            flag, type=Path, default=os.environ.get(variable) or None, help=f"{text} (env {variable})"
        )


def tls_hint(message: str, ca_flag: str = "--ca-cert", plain: str = "http:// or grpc://") -> str:
    """What to do about the failed TLS handshake an error message describes, as " (...)"; "" for other errors."""
    hint = next((hint for sign, hint in TLS_HINTS.items() if sign in message), None)
    return f" ({hint.format(ca_flag=ca_flag, plain=plain)})" if hint else ""


def closed_before_answer(message: str) -> bool:
    return any(sign in message for sign in CLOSED_SIGNS)


def client_certificate_hint(
    message: str, presented: bool, cert_flag: str = "--client-cert", other_port: str = ""
) -> str:
    """What to try when a TLS server closed the connection before answering: it may want a client certificate
    (mutual TLS), or not accept the one presented; `other_port` names another cause to try. "" for other errors."""
    if not closed_before_answer(message):
        return ""
    if presented:
        hint = (
            "if it requires client certificates, it did not accept yours: is yours issued for client use by a CA "
            "it trusts, and not revoked?"
        )
    else:
        hint = f"if it requires client certificates, give yours with {cert_flag}"
    return f" (the server closed the connection: {hint}{'; ' + other_port if other_port else ''})"


def handshake_hint(
    message: str,
    client_cert: bool | None,
    other_port: str = "",
    *,
    ca_flag: str = "--ca-cert",
    cert_flag: str = "--client-cert",
    plain: str = "http:// or grpc://",
) -> str:
    """What to do about a failed connection: `client_cert` says whether it presented a client certificate, None
    for a plain connection (where a closed socket means something else)."""
    hint = tls_hint(message, ca_flag, plain)
    if hint or client_cert is None:
        return hint
    return client_certificate_hint(message, client_cert, cert_flag, other_port)


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    raise _EncryptedKey


def check_key_pair(certfile: Path, keyfile: Path) -> None:
    """ValueError saying why when the PEM certificate chain and its key cannot serve together, as a server's or a
    client's."""
    load_key_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), certfile, keyfile)


def load_key_pair(context: ssl.SSLContext, certfile: Path, keyfile: Path) -> None:
    """`context` presenting the certificate chain in `certfile` with its key; ValueError saying why it cannot."""
    for path in (certfile, keyfile):
        _check_readable(path)
    _check_certificates(certfile)
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


def check_authorities(path: Path) -> None:
    """ValueError saying why when `path` is not a readable PEM file of certificates to trust."""
    _check_readable(path)
    _check_certificates(path)


def _check_certificates(path: Path) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as error:
        raise ValueError(f"{path} holds no PEM certificate ({error.reason or error})") from None


def load_revocation_lists(path: Path, authorities: Path) -> list[x509.CertificateRevocationList]:
    """The PEM certificate revocation lists in `path`, each signed by an authority in `authorities`; ValueError
    saying why when there is none or one is not (OpenSSL would then refuse every client of that authority)."""
    _check_readable(path)
    blocks = re.findall(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", path.read_bytes(), re.DOTALL)
    if not blocks:
        raise ValueError(f"{path} holds no PEM certificate revocation list (-----BEGIN X509 CRL-----)")
    signers = x509.load_pem_x509_certificates(authorities.read_bytes())
    lists = []
    for block in blocks:
        try:
            revocations = x509.load_pem_x509_crl(block)
        except ValueError as error:
            raise ValueError(f"{path}: a revocation list does not parse ({error})") from None
        if not any(signed_by(revocations, signer) for signer in signers):
            raise ValueError(
                f"{path}: the revocation list of {revocations.issuer.rfc4514_string()} is not signed by an "
                f"authority in {authorities}"
            )
        lists.append(revocations)
    return lists


def signed_by(revocations: x509.CertificateRevocationList, authority: x509.Certificate) -> bool:
    if revocations.issuer != authority.subject:
        return False
    try:
        return revocations.is_signature_valid(authority.public_key())  # type: ignore[arg-type]
    except TypeError:  # a key type that cannot sign a CRL
        return False


def client_context(ca_file: Path | None, key_pair: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """A client's TLS context trusting `ca_file` (PEM), else the system's certificate authorities, and presenting
    `key_pair` (certificate chain, key) to a server that asks for a client certificate; ValueError saying why when
    a file cannot serve."""
    if ca_file is not None:
        check_authorities(ca_file)
    context = ssl.create_default_context(cafile=ca_file)
    if key_pair is not None:
        load_key_pair(context, *key_pair)
    return context

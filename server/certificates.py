"""The gateway's TLS files, read again when they change on disk (a certificate renewed by cert-manager or certbot, a
Kubernetes secret updated in place): new connections on the HTTPS and the gRPC port get the new certificate, key
and client CA, open connections keep theirs, nothing restarts. A pair that does not load (a renewal half written, a
key that is not the certificate's) is logged and the files in use are kept."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from cryptography import x509

from cli.tls import check_authorities, check_key_pair, load_revocation_lists
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("resnet.tls")
EXPIRY_WARNING = timedelta(days=14)
# as IANA numbers them, which ASGI's TLS extension asks for
TLS_VERSIONS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def asgi_tls_extension(ssl_object: ssl.SSLObject) -> dict[str, object]:
    """ASGI's `scope["extensions"]["tls"]` for a connection whose handshake is done. The chain is the client's own
    certificate only: Python before 3.13 gives no more of what the client sent."""
    der = ssl_object.getpeercert(binary_form=True)
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": subject_name(der) if der else None,
        "client_cert_error": None,  # a certificate that did not verify ended the handshake
        "tls_version": TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": _cipher_suite_number(ssl_object),
    }


@functools.lru_cache(maxsize=1024)
def subject_name(certificate: bytes) -> str:
    """A certificate's subject as RFC 4514 writes it (`CN=alice,O=Example`), from PEM or DER."""
    if certificate.startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(certificate).subject.rfc4514_string()
    return x509.load_der_x509_certificate(certificate).subject.rfc4514_string()


def grpc_client_certificate(context: grpc.aio.ServicerContext) -> str | None:
    """The subject of the certificate a gRPC client presented (mutual TLS), else None."""
    presented = context.auth_context().get("x509_pem_cert")
    return subject_name(presented[0]) if presented else None


def _cipher_suite_number(ssl_object: ssl.SSLObject) -> int | None:
    cipher = ssl_object.cipher()
    if cipher is None:
        return None
    # OpenSSL's id for a suite is 0x03000000 plus the suite's two-byte IANA number
    numbers = {suite["name"]: suite["id"] & 0xFFFF for suite in ssl_object.context.get_ciphers()}
    return numbers.get(cipher[0])


class WatchedFiles:
    """Files looked at now and then: `changed()` says whether any of them changed since the last look."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self._stamp = self._now()

    def changed(self) -> bool:
        stamp = self._now()
        if stamp == self._stamp:
            return False
        self._stamp = stamp  # a refused change is tried again at the next change, not at every look
        return True

    def _now(self) -> tuple[tuple[int, int, int], ...]:
        # os.stat follows symbolic links: a Kubernetes secret swaps its ..data link, which changes the inode
        stamps = []
        for path in self.paths:
            try:
                found = os.stat(path)
                stamps.append((found.st_ino, found.st_mtime_ns, found.st_size))
            except OSError:  # gone for the moment (a renewal in progress): a change like any other
                stamps.append((0, 0, 0))
        return tuple(stamps)


async def watch(reload_if_changed: Callable[[], object], interval_s: float) -> None:
    """Call `reload_if_changed` every `interval_s` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        reload_if_changed()


@dataclass(frozen=True)
class Revocations:
    """One authority's revocation list, as the per-call check reads it."""

    next_update: datetime | None
    serials: frozenset[int]


class ServingCertificates:
    """The certificate, key and client CA both ports serve, and what watches them.

    HTTPS: `uvicorn_context` is uvicorn's `ssl_context_factory`; it gives uvicorn's SSLContext a server-name
    callback, which OpenSSL calls on every ClientHello (with or without SNI), and which hands the new connection the
    current context (a new SSLContext replaces certificate, key and trusted client CAs alike; loading into the old one
    could add CAs but not drop them). gRPC: dynamic credentials, whose fetcher gRPC calls before each handshake."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.certfile, self.keyfile = settings.ssl_certfile, settings.ssl_keyfile
        self.client_ca, self.crl = settings.ssl_client_ca, settings.ssl_crl
        watched = (self.certfile, self.keyfile, self.client_ca, self.crl)
        self.files = WatchedFiles([path for path in watched if path])
        self.interval_s = settings.ssl_reload_s
        self.metrics = metrics
        self.make_https_context: Callable[[], ssl.SSLContext] | None = None
        self.https_context: ssl.SSLContext | None = None
        self._lock = threading.Lock()
        self._material = self._read()
        self.revocations = self._read_revocations()
        self.generation = 0
        self._note_expiry()

    def uvicorn_context(self, _config, default_factory: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        """uvicorn's context, built by uvicorn from its settings; `default_factory` builds the next ones."""

        def make_https_context() -> ssl.SSLContext:
            context = default_factory()
            if self.crl:  # uvicorn has no setting for revocation lists; OpenSSL reads them from a CA file
                context.load_verify_locations(cafile=self.crl)
                context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            return context

        self.make_https_context = make_https_context
        self.https_context = make_https_context()
        self.https_context.sni_callback = self._current_https
        return self.https_context

    def refusal(self, certificate_pem: bytes) -> str | None:
        """Why a client certificate is refused by the revocation lists, as OpenSSL rules for HTTPS, or None. gRPC
        (grpcio) takes no revocation list, so its calls are checked with this (`RevocationInterceptor`)."""
        certificate = _certificate(certificate_pem)
        with self._lock:
            own = self.revocations.get(certificate.issuer)
        expired = own is not None and own.next_update is not None and own.next_update < datetime.now(UTC)
        if own is not None and not expired and certificate.serial_number not in own.serials:
            return None  # the common case, without naming the issuer
        issuer = certificate.issuer.rfc4514_string()
        if own is None:
            return f"no revocation list of its authority {issuer} is loaded (--ssl-crl)"
        if expired:
            return f"the revocation list of its authority {issuer} expired on {own.next_update:%Y-%m-%d %H:%M} UTC"
        return f"it is revoked by its authority {issuer}"

    def _current_https(
        self, connection: ssl.SSLObject, _server_name: str | None, _context: ssl.SSLContext
    ) -> None:
        connection.context = self.https_context

    def grpc_credentials(self) -> grpc.ServerCredentials:
        served = -1

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal served
            with self._lock:
                if served == self.generation:
                    return None  # keep the one in use
                served = self.generation
                key, chain, client_ca = self._material
            return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=client_ca)

        return grpc.dynamic_ssl_server_credentials(
            fetch(), fetch, require_client_authentication=self.client_ca is not None
        )

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed since the last look; True when new connections now get them."""
        if not self.files.changed():
            return False
        try:
            check_key_pair(self.certfile, self.keyfile)
            if self.client_ca:
                check_authorities(self.client_ca)
            material = self._read()
            revocations = self._read_revocations()
            https_context = self.make_https_context() if self.make_https_context else None
        except (ValueError, OSError) as error:  # ssl.SSLError is an OSError
            log.warning("TLS files changed but do not load, the ones in use are kept: %s", error)
            self._count("refused")
            return False
        with self._lock:
            self._material = material
            self.revocations = revocations
            self.https_context = https_context
            self.generation += 1
        log.info("TLS files reloaded (%s): new connections get them", ", ".join(map(str, self.files.paths)))
        self._count("reloaded")
        self._note_expiry()
        return True

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.tls_reloads.labels(outcome=outcome).inc()

    def _note_expiry(self) -> None:
        """The served certificate's end of validity, as a metric to alert on, and a warning when it is near: OpenSSL
        serves an expired certificate without a word, and only the clients refuse it."""
        try:
            expires = x509.load_pem_x509_certificate(self._material[1]).not_valid_after_utc
        except ValueError as error:  # OpenSSL took it; cryptography is stricter about some encodings
            log.warning("TLS certificate %s: cannot read its expiry date: %s", self.certfile, error)
            return
        if self.metrics is not None:
            self.metrics.tls_expiry.set(expires.timestamp())
        left = expires - datetime.now(UTC)
        if left < EXPIRY_WARNING:
            state = (
                f"expired on {expires:%Y-%m-%d %H:%M} UTC"
                if left.total_seconds() < 0
                else f"expires in {left.days} days"
            )
            then = (
                "the gateway picks a renewal in place up" if self.interval_s else "then restart the gateway"
            )
            log.warning("TLS certificate %s %s: renew it (%s)", self.certfile, state, then)
        else:
            log.info("TLS certificate %s valid until %s UTC", self.certfile, f"{expires:%Y-%m-%d %H:%M}")

    def _read_revocations(self) -> dict[x509.Name, Revocations]:
        if not (self.crl and self.client_ca):
            return {}
        lists = load_revocation_lists(self.crl, self.client_ca)
        _note_revocations(lists, self.crl, self.client_ca, self.metrics)
        # cryptography looks a serial number up entry by entry: 1.2 ms a call against a list of 10,000
        return {
            crl.issuer: Revocations(crl.next_update_utc, frozenset(entry.serial_number for entry in crl))
            for crl in lists
        }

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        client_ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return Path(self.keyfile).read_bytes(), Path(self.certfile).read_bytes(), client_ca


@functools.lru_cache(maxsize=1024)
def _certificate(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _note_revocations(
    revocations: list[x509.CertificateRevocationList], path: Path, client_ca: Path, metrics: Metrics | None
) -> None:
    """When the next lists are due, as a metric to alert on (OpenSSL refuses every client of an authority whose list
    expired), and a warning for an authority with no list or an expired one: its clients are all refused."""
    listed = {crl.issuer for crl in revocations}
    for authority in x509.load_pem_x509_certificates(Path(client_ca).read_bytes()):
        if authority.subject not in listed:
            log.warning(
                "%s has no revocation list of %s: clients with certificates it issued are refused",
                path,
                authority.subject.rfc4514_string(),
            )
    due = [crl.next_update_utc for crl in revocations if crl.next_update_utc is not None]
    if metrics is not None and due:
        metrics.crl_next_update.set(min(due).timestamp())
    for crl in revocations:
        if crl.next_update_utc is not None and crl.next_update_utc < datetime.now(UTC):
            log.warning(
                "%s: the revocation list of %s expired on %s UTC: its clients are refused until a new one is in place",
                path,
                crl.issuer.rfc4514_string(),
                f"{crl.next_update_utc:%Y-%m-%d %H:%M}",
            )

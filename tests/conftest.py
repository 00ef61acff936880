from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from tests.grpc_support import UNLOADED_MODEL, write_pipeline_repository
from tests.support import SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the project; tests that need real data skip cleanly without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def imagenet_samples(shared_data: Path) -> list[Path]:
    photos = sorted((shared_data / "imagenet-samples").glob("*.JPEG"))
    if not photos:
        pytest.skip("no ImageNet sample photos in shared data")
    return photos


@pytest.fixture(scope="module")
def pipeline_repository(tmp_path_factory) -> Path:
    """`colors`, `colors_preprocess` and `colors_pipeline`, laid out as `resnet export` writes them (per module)."""
    return write_pipeline_repository(tmp_path_factory.mktemp("pipeline-repository"))


@pytest.fixture(scope="module")
def pipeline_triton(tmp_path_factory):
    """A real Triton (nvidia-pytriton's CPU build) serving the models of `pipeline_repository`; skipped where it is
    missing. Its repository holds a `blank` family too, which it does not load (explicit model control mode): its
    index lists those as Triton does, and what reads the index must see that only `colors*` are ready."""
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")
    from export.triton_server import TritonServer

    repository = write_pipeline_repository(tmp_path_factory.mktemp("triton-repository"))
    # it sorts before colors: what does not tell loaded from listed picks it first
    write_pipeline_repository(repository, UNLOADED_MODEL)
    log_path = tmp_path_factory.mktemp("triton-logs") / "triton.log"
    loaded = ["colors", "colors_preprocess", "colors_pipeline"]
    with TritonServer(repository, log_path=log_path, models=loaded) as server:
        yield server


def in_days(days: int) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)


@pytest.fixture(scope="session")
def certificates(tmp_path_factory) -> dict[str, Path]:
    """A CA, the gateway's certificate and key (for 127.0.0.1 and localhost), an encrypted copy of the key, a
    client's certificate and key from the same CA, another client's to revoke (`revoked_*`), a stranger's from
    another CA (`stranger_ca`), and renewals of the gateway's: one valid 400 days (`renewed_cert`, `renewed_key`),
    one 5 (`expiring_*`); the CA's key (`ca_key`) signs revocation lists. trustme issues every certificate for server
    and client use."""
    folder = tmp_path_factory.mktemp("tls")
    authority, stranger_authority = trustme.CA(), trustme.CA()
    names = ["ca", "ca_key", "cert", "key", "encrypted_key", "other_key", "stranger_ca"]
    owners = ("client", "revoked", "stranger", "renewed", "expiring")
    names += [f"{owner}_{part}" for owner in owners for part in ("cert", "key")]
    files = {name: folder / f"{name}.pem" for name in names}
    authority.cert_pem.write_to_path(str(files["ca"]))
    authority.private_key_pem.write_to_path(str(files["ca_key"]))
    stranger_authority.cert_pem.write_to_path(str(files["stranger_ca"]))
    server = authority.issue_cert("127.0.0.1", "localhost")
    for prefix, issued in [
        ("", server),
        ("client_", authority.issue_cert("client.example", common_name="client.example")),
        ("revoked_", authority.issue_cert("revoked.example", common_name="revoked.example")),
        ("stranger_", stranger_authority.issue_cert("stranger.example")),
        ("renewed_", authority.issue_cert("127.0.0.1", "localhost", not_after=in_days(400))),
        ("expiring_", authority.issue_cert("127.0.0.1", "localhost", not_after=in_days(5))),
    ]:
        issued.cert_chain_pems[0].write_to_path(str(files[f"{prefix}cert"]))
        issued.private_key_pem.write_to_path(str(files[f"{prefix}key"]))
    authority.issue_cert("elsewhere").private_key_pem.write_to_path(str(files["other_key"]))
    key = serialization.load_pem_private_key(server.private_key_pem.bytes(), password=None)
    files["encrypted_key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return files

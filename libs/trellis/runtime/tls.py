"""Mutual TLS between services: one certificate, its key and the CA that signs peers.

``TRELLIS_TLS_CERT_FILE``, ``TRELLIS_TLS_KEY_FILE`` and ``TRELLIS_TLS_CA_FILE`` (PEM)
go together. With all three a service's server accepts only clients presenting a
certificate signed by that CA (``require_client_auth``), and its channels dial other
services with the same certificate and key, trusting servers signed by the CA. With
none, everything is plaintext; a partial set stops the service at start-up.

The certificate is both a server and a client certificate (extended key usages
serverAuth and clientAuth) and must name, as a subjectAltName, every host clients
reach it by (``executor``, ``executor.trellis.svc``, ``127.0.0.1``...): gRPC checks
the server's name against the target's host.

Inside the mesh, mTLS is what makes ``x-tenant-id`` trustworthy: only holders of a
certificate signed by the CA (the Trellis services) can call the planner, gateway,
cache and cost accounting, and they forward the tenant the executor authenticated.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

#: Settings fields (and so variables TRELLIS_TLS_*) of the three files, in this order.
FIELDS = ("tls_cert_file", "tls_key_file", "tls_ca_file")
_PEM = b"-----BEGIN "


class TlsConfigError(ValueError):
    """The TLS files are incomplete or unreadable."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM contents of this service's certificate chain, private key and peers' CA."""

    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def read(cls, cert_file: Path, key_file: Path, ca_file: Path) -> TlsFiles:
        contents = []
        for name, path in zip(FIELDS, (cert_file, key_file, ca_file), strict=True):
            try:
                data = Path(path).read_bytes()
            except OSError as error:
                raise TlsConfigError(f"{_variable(name)}: cannot read {path} ({error})") from None
            if _PEM not in data:
                raise TlsConfigError(f"{_variable(name)}: {path} holds no PEM block")
            contents.append(data)
        return cls(*contents)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Serve TLS with this certificate and require a client certificate from the CA."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Dial with this certificate and key, trusting servers signed by the CA."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def _variable(name: str) -> str:
    return f"TRELLIS_{name.upper()}"


def tls_files(
    cert_file: Path | None, key_file: Path | None, ca_file: Path | None
) -> TlsFiles | None:
    """The TLS files when all three are given, None when none are; else an error."""
    given = dict(zip(FIELDS, (cert_file, key_file, ca_file), strict=True))
    missing = [_variable(n) for n, path in given.items() if path is None]
    if len(missing) == len(FIELDS):
        return None
    if missing:
        present = [_variable(n) for n, path in given.items() if path is not None]
        raise TlsConfigError(
            f"{', '.join(present)} set without {', '.join(missing)}: mTLS needs all three "
            f"of {', '.join(_variable(n) for n in FIELDS)} (or none for plaintext)"
        )
    assert cert_file and key_file and ca_file
    return TlsFiles.read(cert_file, key_file, ca_file)


def from_settings(settings: object) -> TlsFiles | None:
    """The TLS files of a settings object with ``tls_*_file`` fields (None: plaintext)."""
    return tls_files(*(getattr(settings, name, None) for name in FIELDS))


def from_env(env: Mapping[str, str] = os.environ) -> TlsFiles | None:
    """The TLS files named by TRELLIS_TLS_* in ``env`` (for clients such as the CLI)."""
    paths = (env.get(_variable(name), "").strip() for name in FIELDS)
    return tls_files(*(Path(path) if path else None for path in paths))

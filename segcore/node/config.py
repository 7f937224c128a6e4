"""The DICOM node's settings: who it is, who may send to it, where results go, its limits."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

from segcore.errors import SegcoreError

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 characters, no backslash or control


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity: AE title, host and (for a destination) port."""

    ae_title: str
    host: str
    port: int | None = None

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}" + (f":{self.port}" if self.port is not None else "")


def check_ae_title(title: str, what: str) -> str:
    if not _AE_TITLE.match(title) or not title.strip():
        raise SegcoreError(f"{what} {title!r} is not a DICOM AE title (1-16 characters, no '\\\\')")
    return title


def parse_peer(text: str, what: str, with_port: bool) -> Peer:
    """``AET@HOST:PORT`` (a destination) or ``AET@HOST`` (an allowed sender; HOST may be ``*``)."""
    pattern = r"^([^@]+)@([^:@\s]+):(\d+)$" if with_port else r"^([^@]+)@([^@\s]+)$"
    match = re.match(pattern, text.strip())
    example = "PLANNING@10.0.0.5:104" if with_port else "PLANNING@10.0.0.5"
    if not match:
        raise SegcoreError(f"{what} {text!r}: write it as AET@HOST{':PORT' if with_port else ''}, e.g. {example}")
    port = int(match.group(3)) if with_port else None
    if port is not None and not 0 < port < 65536:
        raise SegcoreError(f"{what} {text!r}: the port must be 1-65535")
    return Peer(check_ae_title(match.group(1), what), match.group(2), port)


@dataclass
class NodeConfig:
    """Everything `prostateseg serve` is told. Sizes in bytes, times in seconds."""

    spool: Path
    destination: Peer
    port: int = 11112
    ae_title: str = "PROSTATESEG"
    bind: str = "0.0.0.0"
    task: str = "prostate"
    model: str | None = None
    device: str = "auto"
    formats: tuple[str, ...] = ("rtstruct",)
    roi_names: dict[str, str] | None = None
    allow: list[Peer] = field(default_factory=list)  # empty: only the destination's AE title and host
    quiet_seconds: float = 10.0
    max_associations: int = 10
    max_instance_bytes: int = 64 << 20
    max_spool_bytes: int = 20 << 30
    log_patient_names: bool = False
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # given: callers must show a certificate it signed
    tls_destination: bool = False  # send results over TLS too (this node's certificate; --tls-ca checks the peer)
    retry_seconds: tuple[float, float] = (5.0, 600.0)  # first and longest wait between sending attempts

    def __post_init__(self):
        check_ae_title(self.ae_title, "--ae-title")
        if self.task not in ("prostate", "organs"):
            raise SegcoreError(f"--task must be prostate or organs, not {self.task!r}")
        if not 0 < self.port < 65536:
            raise SegcoreError(f"--port {self.port}: must be 1-65535")
        if not 0 <= self.quiet_seconds <= 3600:
            raise SegcoreError(f"--quiet-seconds {self.quiet_seconds}: must be 0-3600")
        unknown = [f for f in self.formats if f not in ("rtstruct", "dicom-seg")]
        if unknown or not self.formats:
            raise SegcoreError(f"--formats {','.join(self.formats)}: a node sends rtstruct and/or dicom-seg")
        if (self.tls_certificate is None) != (self.tls_key is None):
            raise SegcoreError("TLS needs both --tls-cert and --tls-key")
        if self.tls_ca is not None and self.tls_certificate is None:
            raise SegcoreError("--tls-ca (checking callers' certificates) needs --tls-cert and --tls-key")
        if self.tls_destination and self.tls_certificate is None:
            raise SegcoreError("--tls-destination needs --tls-cert and --tls-key")
        for limit, value in (("--max-associations", self.max_associations),
                             ("--max-instance-mb", self.max_instance_bytes), ("--max-spool-gb", self.max_spool_bytes)):
            if value <= 0:
                raise SegcoreError(f"{limit} must be positive")

    @property
    def allowed(self) -> list[Peer]:
        return self.allow or [Peer(self.destination.ae_title, self.destination.host)]

    def is_allowed(self, calling_ae: str, host: str) -> bool:
        calling_ae = calling_ae.strip()
        return any(peer.ae_title == calling_ae and (peer.host == "*" or host in addresses(peer.host))
                   for peer in self.allowed)

    def ssl_context(self, server: bool):
        """The TLS context for serving (or, `server` False, for sending), or None without TLS."""
        if self.tls_certificate is None or (not server and not self.tls_destination):
            return None
        import ssl

        purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
        context = ssl.create_default_context(purpose, cafile=str(self.tls_ca) if self.tls_ca else None)
        context.load_cert_chain(str(self.tls_certificate), str(self.tls_key))
        if server:
            context.verify_mode = ssl.CERT_REQUIRED if self.tls_ca else ssl.CERT_NONE
        else:
            context.check_hostname = False  # peers are named by address in DICOM configurations
            context.verify_mode = ssl.CERT_REQUIRED if self.tls_ca else ssl.CERT_NONE
        return context


@functools.lru_cache(maxsize=64)
def addresses(host: str) -> frozenset[str]:
    """A host name's IP addresses (an address stands for itself); looked up once per name."""
    import socket

    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        found = set()
    return frozenset(found | {host})

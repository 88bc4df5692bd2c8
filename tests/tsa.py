"""A local RFC 3161 timestamp authority: a real HTTP server with its own CA, made at run time.

Tests and the stamping benchmark point the signer at it; pyHanko's ``DummyTimeStamper``
builds the responses (signed TSTInfo, TSA certificate embedded), this module only carries
them over HTTP the way a public TSA does (`application/timestamp-query` in,
`application/timestamp-reply` out).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from asn1crypto import cms, core, tsp
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pyhanko.sign import general
from pyhanko.sign.general import simple_cms_attribute
from pyhanko.sign.timestamps import DummyTimeStamper
from pyhanko_certvalidator.registry import SimpleCertificateStore

Handler = Callable[[web.Request], Awaitable[web.Response]]


@dataclass(frozen=True)
class LocalTsa:
    url: str
    root: asn1_x509.Certificate
    """The CA that issued the TSA's certificate: the trust root for its tokens."""

    requests: list[int]
    """One entry per timestamp request served (for assertions on how often it was asked)."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _tsa_credentials() -> tuple[x509.Certificate, rsa.RSAPrivateKey, x509.Certificate]:
    """A TSA certificate (critical timeStamping EKU), its key, and the root CA that issued it."""
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = (
        x509.CertificateBuilder()
        .subject_name(_name("Meterai Test TSA Root"))
        .issuer_name(_name("Meterai Test TSA Root"))
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), False)
        .sign(root_key, hashes.SHA256())
    )
    tsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tsa = (
        x509.CertificateBuilder()
        .subject_name(_name("Meterai Test TSA"))
        .issuer_name(root.subject)
        .public_key(tsa_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .sign(root_key, hashes.SHA256())
    )
    return tsa, tsa_key, root


def _asn1(certificate: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(certificate.public_bytes(serialization.Encoding.DER))


class _LoadedKeyTimeStamper(DummyTimeStamper):
    """pyHanko's test TSA re-parses its RSA key for every token (27 ms, more than the rest
    of a request); a real TSA keeps it loaded, and so does this one."""

    def __init__(self, key: rsa.RSAPrivateKey, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._key = key

    def _sign_tst_info(
        self, tst_info_data: bytes, md_algorithm: str, dt: datetime.datetime
    ) -> tuple[bytes, cms.CMSAttributes]:
        # As pyHanko's own (0.38), but with the key object it keeps.
        digest = hashlib.new(md_algorithm, tst_info_data).digest()
        signed_attrs = cms.CMSAttributes(
            [
                simple_cms_attribute("content_type", "tst_info"),
                simple_cms_attribute("signing_time", cms.Time({"utc_time": core.UTCTime(dt)})),
                simple_cms_attribute(
                    "signing_certificate", general.as_signing_certificate(self.tsa_cert)
                ),
                simple_cms_attribute("message_digest", digest),
            ]
        )
        algorithm = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384()}[md_algorithm]
        signature = self._key.sign(signed_attrs.dump(), padding.PKCS1v15(), algorithm)
        return signature, signed_attrs


@contextmanager
def local_tsa(delay_seconds: float = 0.0) -> Iterator[LocalTsa]:
    """Run a timestamp authority on 127.0.0.1 in a thread of its own until the block ends;
    each answer takes at least `delay_seconds` (as a remote one does)."""
    tsa_cert, tsa_key, root = _tsa_credentials()
    key_info = tsa_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    stamper = _LoadedKeyTimeStamper(
        tsa_key,
        tsa_cert=_asn1(tsa_cert),
        tsa_key=asn1_keys.PrivateKeyInfo.load(key_info),
        certs_to_embed=SimpleCertificateStore.from_certs([_asn1(root)]),
    )
    served: list[int] = []

    async def timestamp(request: web.Request) -> web.Response:
        if request.content_type != "application/timestamp-query":
            return web.Response(status=415)
        query = tsp.TimeStampReq.load(await request.read())
        if delay_seconds:
            await asyncio.sleep(delay_seconds)
        reply = stamper.request_tsa_response(query)
        served.append(1)
        return web.Response(body=reply.dump(), content_type="application/timestamp-reply")

    with serve(timestamp) as url:
        yield LocalTsa(url=url, root=_asn1(root), requests=served)


@contextmanager
def serve(handler: Handler) -> Iterator[str]:
    """Serve ``handler`` for POST / on 127.0.0.1, from a thread with its own event loop (so
    that synchronous code under test can call it); yields the URL."""
    app = web.Application()
    app.router.add_post("/", handler)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.SockSite(runner, listener).start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="local-http", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise TimeoutError("the local HTTP server did not start")
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        listener.close()


def unreachable_url() -> str:
    """A local URL where nothing listens (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/"

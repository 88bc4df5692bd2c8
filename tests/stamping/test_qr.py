"""The stamp's QR codes are the `qrcode` library's, mask choice included, only made faster."""

from __future__ import annotations

import random

import pytest
import qrcode
from qrcode.util import lost_point

from services.stamping.qr import _pack, penalty, qr_modules

URL_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/:.-_?=&%"


def stock_modules(data: str) -> list[list[bool]]:
    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, border=0)
    qr.add_data(data)
    qr.make(fit=True)
    modules: list[list[bool]] = qr.modules
    return modules


def test_verify_urls_get_the_same_symbol_as_from_qrcode() -> None:
    rng = random.Random(20241)
    serial_characters = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for base in ("http://127.0.0.1:8000", "https://meterai.example.id", "https://e-meterai.co.id"):
        for _ in range(60):
            serial = "".join(rng.choice(serial_characters) for _ in range(22))
            url = f"{base}/verify/{serial}"
            assert qr_modules(url) == stock_modules(url), url


@pytest.mark.parametrize("length", [1, 17, 40, 80, 150, 300, 600])
def test_other_sizes_get_the_same_symbol_as_from_qrcode(length: int) -> None:
    rng = random.Random(length)
    for _ in range(12):
        data = "".join(rng.choice(URL_CHARACTERS) for _ in range(length))
        assert qr_modules(data) == stock_modules(data), data


@pytest.mark.parametrize("size", [21, 25, 33, 57, 101])
def test_penalty_is_qrcodes_lost_point(size: int) -> None:
    rng = random.Random(size)
    for darkness in (0.1, 0.3, 0.5, 0.7, 0.9):
        for _ in range(8):
            modules = [[rng.random() < darkness for _ in range(size)] for _ in range(size)]
            assert penalty(_pack(modules), size) == lost_point(modules)
    # Whole symbols, finder patterns and all.
    symbol = stock_modules("https://meterai.example.id/verify/2C5NV74I6D0HJ1EZ000DU9")
    assert penalty(_pack(symbol), len(symbol)) == lost_point(symbol)


def test_qrcode_is_the_pinned_release() -> None:
    """qr.py relies on qrcode's makeImpl, data_cache and modules; the tests above prove it
    for this release, so a new one must be tested before it is pinned."""
    from importlib.metadata import version

    assert version("qrcode") == "8.2"

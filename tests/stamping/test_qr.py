"""The stamp's QR codes: level M symbols that an independent reader (zbar) decodes back to
exactly what was encoded, from one module to the largest symbol."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
import zxingcpp
from PIL import Image

from services.stamping.qr import MAX_BYTES, qr_modules
from tests.pdftools import require

URL_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/:.-_?=&%"
SERIAL_CHARACTERS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
QUIET_ZONE = 4  # modules of white around the symbol, as ISO/IEC 18004 asks of a printout


def png(modules: list[list[bool]], path: Path, scale: int = 4) -> Path:
    """The symbol as a black-on-white image with its quiet zone."""
    side = (len(modules) + 2 * QUIET_ZONE) * scale
    image = Image.new("L", (side, side), 255)
    for row, line in enumerate(modules):
        for col, dark in enumerate(line):
            if dark:
                left, top = (col + QUIET_ZONE) * scale, (row + QUIET_ZONE) * scale
                image.paste(0, (left, top, left + scale, top + scale))
    image.save(path)
    return path


def zbar_decode(images: list[Path]) -> list[str]:
    """What zbar reads from each image, in order (one zbarimg run for all of them)."""
    result = subprocess.run(
        [require("zbarimg"), "--quiet", "--raw", "-Sdisable", "-Sqrcode.enable", *images],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def assert_square_symbol(modules: list[list[bool]]) -> None:
    size = len(modules)
    assert size >= 21 and (size - 17) % 4 == 0, size  # version (size - 17) / 4
    assert all(len(row) == size for row in modules)
    # The three finder patterns' outer rings: seven dark modules along each edge.
    for top, left in ((0, 0), (0, size - 7), (size - 7, 0)):
        assert all(modules[top][left + k] and modules[top + 6][left + k] for k in range(7))
        assert all(modules[top + k][left] and modules[top + k][left + 6] for k in range(7))


def test_verify_urls_decode_back_exactly(tmp_path: Path) -> None:
    rng = random.Random(20241)
    urls = []
    for base in ("http://127.0.0.1:8000", "https://meterai.example.id", "https://e-meterai.co.id"):
        for _ in range(20):
            serial = "".join(rng.choice(SERIAL_CHARACTERS) for _ in range(22))
            urls.append(f"{base}/verify/{serial}")
    images = []
    for number, url in enumerate(urls):
        modules = qr_modules(url)
        assert_square_symbol(modules)
        images.append(png(modules, tmp_path / f"{number}.png"))
    assert zbar_decode(images) == urls


@pytest.mark.parametrize("length", [1, 17, 80, 300, 1000, MAX_BYTES])
def test_any_length_up_to_the_capacity_decodes_back_exactly(length: int, tmp_path: Path) -> None:
    rng = random.Random(length)
    data = ["".join(rng.choice(URL_CHARACTERS) for _ in range(length)) for _ in range(3)]
    images = []
    for number, text in enumerate(data):
        modules = qr_modules(text)
        assert_square_symbol(modules)
        images.append(png(modules, tmp_path / f"{number}.png", scale=3))
    assert zbar_decode(images) == data


def test_symbols_use_error_correction_level_m(tmp_path: Path) -> None:
    url = "https://meterai.example.id/verify/2C5NV74I6D0HJ1EZ000DU9"
    found = zxingcpp.read_barcode(Image.open(png(qr_modules(url), tmp_path / "m.png")))
    assert found is not None
    assert found.text == url
    assert found.ec_level == "M"


def test_data_longer_than_any_qr_code_is_a_value_error() -> None:
    qr_modules("x" * MAX_BYTES)
    with pytest.raises(ValueError, match="too long"):
        qr_modules("x" * (MAX_BYTES + 1))

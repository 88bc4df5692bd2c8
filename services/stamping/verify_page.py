"""The verification pages for people (Bahasa Indonesia): what the QR code on every stamp opens,
and the answer to a document uploaded from a browser.

Plain HTML without scripts or external resources: it loads fast on a phone, reads well with a
screen reader (landmarks, a heading per section, a description list, text that never relies on
colour alone), and works without JavaScript.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from html import escape

from services.stamping.schemas import SerialStatus, VerificationOut
from services.stamping.verification import Verdict

# Indonesia keeps no daylight saving time; WIB is UTC+7 all year.
WIB = timezone(timedelta(hours=7), "WIB")
_MONTHS = (
    "Januari",
    "Februari",
    "Maret",
    "April",
    "Mei",
    "Juni",
    "Juli",
    "Agustus",
    "September",
    "Oktober",
    "November",
    "Desember",
)

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; background: #f4f6f8; color: #1b1f24;
       line-height: 1.5; }
main { max-width: 36rem; margin: 1.5rem auto; padding: 1.5rem; background: #fff;
       border-radius: .75rem; }
h1 { font-size: 1.4rem; margin-top: 0; }
h2 { font-size: 1.1rem; margin-top: 2rem; }
.verdict { padding: .75rem 1rem; border-radius: .5rem; border-left: .4rem solid; }
.ok { background: #e7f5ec; border-color: #1a7f37; }
.warn { background: #fff4e5; border-color: #9a6700; }
.bad { background: #fdecec; border-color: #b42318; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .4rem 1rem; }
dt { font-weight: 600; }
dd { margin: 0; overflow-wrap: anywhere; }
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 1em; }
label, input, button { font-size: 1rem; }
button { padding: .6rem 1.2rem; margin-top: .75rem; }
.muted { color: #5b6470; font-size: .9rem; }
@media (max-width: 30rem) { dl { grid-template-columns: 1fr; } dd { margin-bottom: .5rem; } }
"""

_VERDICTS: dict[Verdict, tuple[str, str, str]] = {
    Verdict.valid: (
        "ok",
        "Sah",
        "e-Meterai asli, sesuai catatan kami, dan dokumen tidak diubah setelah pembubuhan.",
    ),
    Verdict.modified: (
        "warn",
        "Dokumen diubah",
        "e-Meterai asli, tetapi dokumen diubah setelah e-Meterai dibubuhkan.",
    ),
    Verdict.unrecorded: (
        "bad",
        "Tidak sesuai catatan",
        "Dokumen ini bukan dokumen yang kami bubuhi e-Meterai dengan nomor seri tersebut.",
    ),
    Verdict.untrusted: (
        "bad",
        "Tidak sah",
        "Tanda tangan elektroniknya tidak dibuat oleh penerbit e-Meterai.",
    ),
    Verdict.invalid: (
        "bad",
        "Tidak sah",
        "Tanda tangan elektronik e-Meterai rusak, atau isi dokumen yang ditandatangani diubah.",
    ),
    Verdict.not_stamped: ("warn", "Tanpa e-Meterai", "Dokumen ini tidak memuat e-Meterai."),
}


def wants_html(accept: str | None) -> bool:
    """True if the client prefers HTML to JSON (browsers); `*/*` and no header mean JSON.

    Each offer gets the quality of the most specific media range that matches it; a tie goes
    to the offer the client named explicitly, and to JSON if it named neither.
    """
    if not accept:
        return False
    html = _quality(accept, "text", "html")
    json = max(_quality(accept, "application", "json"), _quality(accept, "application", "*"))
    if html[0] != json[0]:
        return html[0] > json[0]
    return html[0] > 0 and html[1] > json[1]


def _quality(accept: str, maintype: str, subtype: str) -> tuple[float, int]:
    """(quality, specificity) of the best range in `accept` matching `maintype/subtype`."""
    best = (0.0, -1)
    for part in accept.split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        main, _, sub = media.lower().partition("/")
        if main == maintype and (sub == subtype or subtype == "*" and sub.endswith("json")):
            specificity = 2
        elif main == maintype and sub == "*":
            specificity = 1
        elif main == "*" and sub == "*":
            specificity = 0
        else:
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = max(0.0, min(1.0, float(value)))
                except ValueError:
                    quality = 0.0
        if specificity > best[1]:
            best = (quality, specificity)
    return best[0], best[1]


def rupiah(amount: int) -> str:
    """`Rp 10.000`: Indonesian thousands separators."""
    return "Rp " + f"{amount:,}".replace(",", ".")


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "–"
    local = moment.astimezone(WIB)
    text = (
        f"{local.day} {_MONTHS[local.month - 1]} {local.year} pukul "
        f"{local.hour:02d}.{local.minute:02d}.{local.second:02d} WIB"
    )
    return f'<time datetime="{escape(moment.isoformat())}">{text}</time>'


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="id">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="robots" content="noindex">\n'
        f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def _upload_form() -> str:
    return (
        '<section aria-labelledby="periksa">\n<h2 id="periksa">Periksa dokumen Anda</h2>\n'
        "<p>Unggah berkas PDF yang dibubuhi e-Meterai untuk memeriksa keaslian tanda tangan "
        "elektroniknya dan apakah dokumen diubah setelah pembubuhan.</p>\n"
        '<form method="post" action="/api/v1/verify" enctype="multipart/form-data">\n'
        '<label for="berkas">Berkas PDF</label><br>\n'
        '<input id="berkas" name="file" type="file" accept="application/pdf,.pdf" required>'
        '<br>\n<button type="submit">Periksa dokumen</button>\n</form>\n</section>'
    )


def serial_page(status: SerialStatus) -> str:
    """The page the QR code opens: the serial's state, date, tariff and document hash."""
    if status.state == "stamped":
        verdict = (
            '<p class="verdict ok" role="status"><strong>Tercatat.</strong> '
            "e-Meterai dengan nomor seri ini telah dibubuhkan pada sebuah dokumen.</p>"
        )
        state = "Sudah dibubuhkan"
    else:
        verdict = (
            '<p class="verdict warn" role="status"><strong>Sedang diproses.</strong> '
            "e-Meterai dengan nomor seri ini sedang dibubuhkan. Muat ulang halaman ini "
            "sebentar lagi.</p>"
        )
        state = "Sedang diproses"
    digest = f"<code>{escape(status.sha256)}</code>" if status.sha256 else "–"
    body = (
        "<h1>Verifikasi e-Meterai</h1>\n"
        f"{verdict}\n<dl>\n"
        f"<dt>Nomor seri</dt><dd><code>{escape(status.serial)}</code></dd>\n"
        f"<dt>Status</dt><dd>{state}</dd>\n"
        f"<dt>Waktu pembubuhan</dt><dd>{_when(status.stamped_at)}</dd>\n"
        f"<dt>Nilai meterai</dt><dd>{rupiah(status.tariff.amount)}</dd>\n"
        f"<dt>Sidik dokumen (SHA-256)</dt><dd>{digest}</dd>\n</dl>\n"
        '<p class="muted">Sidik dokumen adalah ringkasan unik berkas yang dibubuhi e-Meterai: '
        "berkas yang diubah sedikit pun memiliki sidik yang berbeda.</p>\n" + _upload_form()
    )
    return _page(f"Verifikasi e-Meterai {status.serial}", body)


def not_found_page(serial: str) -> str:
    """No stamp with this serial (or not a serial at all)."""
    shown = escape(serial[:64])
    body = (
        "<h1>Nomor seri tidak ditemukan</h1>\n"
        '<p class="verdict bad" role="status"><strong>Tidak tercatat.</strong> '
        f"Tidak ada e-Meterai yang dibubuhkan dengan nomor seri <code>{shown}</code>.</p>\n"
        "<p>Periksa kembali penulisannya: nomor seri terdiri atas 22 huruf kapital dan angka, "
        "tercetak di bawah kode QR pada e-Meterai.</p>\n" + _upload_form()
    )
    return _page("Nomor seri tidak ditemukan", body)


def result_page(result: VerificationOut) -> str:
    """The answer to a document uploaded from a browser."""
    tone, label, sentence = _VERDICTS[result.verdict]
    rows = [f"<dt>Sidik dokumen (SHA-256)</dt><dd><code>{escape(result.sha256)}</code></dd>"]
    for index, stamp in enumerate(result.stamps, start=1):
        prefix = f"e-Meterai {index}: " if len(result.stamps) > 1 else ""
        changed = "Ya" if stamp.changed_after_stamping else "Tidak"
        serial = escape(stamp.serial) if stamp.serial else "–"
        link = f'<a href="/verify/{serial}">{serial}</a>' if stamp.serial else serial
        rows += [
            f"<dt>{prefix}Nomor seri</dt><dd><code>{link}</code></dd>",
            f"<dt>{prefix}Ditandatangani</dt><dd>{_when(stamp.signed_at)}</dd>",
            f"<dt>{prefix}Tanda tangan utuh</dt><dd>{'Ya' if stamp.intact else 'Tidak'}</dd>",
            f"<dt>{prefix}Penerbit dipercaya</dt><dd>{'Ya' if stamp.trusted else 'Tidak'}</dd>",
            f"<dt>{prefix}Diubah setelah pembubuhan</dt><dd>{changed}</dd>",
        ]
    if result.tariff is not None:
        rows.append(f"<dt>Nilai meterai</dt><dd>{rupiah(result.tariff.amount)}</dd>")
    body = (
        "<h1>Hasil pemeriksaan dokumen</h1>\n"
        f'<p class="verdict {tone}" role="status"><strong>{label}.</strong> {sentence}</p>\n'
        "<dl>\n" + "\n".join(rows) + "\n</dl>\n" + _upload_form()
    )
    return _page(f"Hasil pemeriksaan: {label}", body)


_PROBLEMS = {
    "payload_too_large": ("Berkas terlalu besar", "Ukuran berkas melebihi batas unggahan."),
    "not_pdf": ("Bukan berkas PDF", "Hanya berkas PDF yang dapat diperiksa."),
    "unsupported_media_type": ("Bukan berkas PDF", "Unggah berkas PDF melalui formulir."),
    "malformed_multipart": ("Unggahan gagal", "Unggahan tidak lengkap; coba lagi."),
    "invalid_request": ("Berkas belum dipilih", "Pilih berkas PDF yang akan diperiksa."),
    "invalid_pdf": ("Berkas PDF rusak", "Berkas PDF rusak atau tidak dapat dibaca."),
    "encrypted_pdf": ("Berkas PDF terenkripsi", "Berkas PDF terenkripsi tidak memuat e-Meterai."),
    "too_complex": ("Berkas PDF terlalu rumit", "Berkas PDF terlalu rumit untuk diperiksa."),
    "verification_busy": ("Layanan sedang sibuk", "Coba lagi dalam beberapa saat."),
    "verification_unavailable": ("Layanan belum tersedia", "Coba lagi dalam beberapa saat."),
}


def problem_page(code: str) -> str:
    """A refused upload, for browsers (the JSON problem's `code` says which)."""
    title, sentence = _PROBLEMS.get(
        code, ("Permintaan tidak dapat diproses", "Periksa berkas Anda dan coba lagi.")
    )
    body = (
        f'<h1>{title}</h1>\n<p class="verdict bad" role="alert">{sentence}</p>\n' + _upload_form()
    )
    return _page(title, body)

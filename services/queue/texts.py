"""Every word the applicant's pages show, in Bahasa Indonesia (the default) and English.

One table for both sides: the server renders the pages with it, and embeds it in each page for
the scripts, so a language switch needs no reload. `{name}` marks a value filled in later.
Keys starting with `err_` explain a problem document's `code` in plain language.
"""

from __future__ import annotations

from typing import Final

DEFAULT_LANGUAGE: Final = "id"

TEXTS: Final[dict[str, dict[str, str]]] = {
    "id": {
        "lang_name": "Bahasa Indonesia",
        "locale": "id-ID",
        "brand": "e-Meterai",
        "room_title": "Antrean pembelian e-Meterai",
        "room_intro": "Anda berada di ruang tunggu. Halaman ini memperbarui posisi Anda secara "
        "otomatis; biarkan tetap terbuka. Memuat ulang halaman atau membuka tab baru tidak "
        "menghilangkan tempat Anda.",
        "connecting": "Menghubungkan ke antrean…",
        "preparing": "Menyiapkan antrean…",
        "preparing_note": "Browser Anda sedang menjalankan pemeriksaan keamanan singkat. "
        "Jangan tutup halaman ini.",
        "prequeue_title": "Penjualan belum dibuka",
        "prequeue_countdown": "Dibuka dalam {time}",
        "prequeue_note": "Anda sudah terdaftar. Posisi Anda muncul di sini saat penjualan dibuka.",
        "waiting_title": "Anda dalam antrean",
        "paused_title": "Antrean sedang dijeda",
        "paused_note": "Petugas menjeda antrean untuk sementara. Tempat Anda tetap aman; "
        "halaman ini berlanjut sendiri saat antrean dibuka kembali.",
        "admitted_title": "Giliran Anda!",
        "admitted_note": "Silakan lanjut membeli e-Meterai. Anda akan diarahkan otomatis.",
        "continue": "Lanjut ke pembelian",
        "expired_title": "Nomor antrean Anda kedaluwarsa",
        "expired_note": "Halaman ini terlalu lama tidak memeriksa antrean, sehingga tempat Anda "
        "dilepas. Ambil nomor baru untuk masuk kembali.",
        "rejoin": "Ambil nomor antrean baru",
        "people_ahead": "Anda di urutan ke-{n}",
        "people_ahead_one": "Anda berikutnya",
        "eta_label": "Perkiraan waktu tunggu",
        "eta_unknown": "belum dapat diperkirakan",
        "eta_under_minute": "kurang dari 1 menit",
        "eta_minutes": "sekitar {m} menit",
        "eta_hours": "sekitar {h} jam {m} menit",
        "progress_label": "Kemajuan antrean",
        "progress_value": "{p}% menuju giliran Anda",
        "updated_label": "Terakhir diperbarui",
        "retry_offline": "Koneksi terputus. Mencoba lagi dalam {s} detik…",
        "retry_busy": "Server sedang sibuk. Mencoba lagi dalam {s} detik…",
        "retry_limited": "Terlalu banyak permintaan dari jaringan Anda. Mencoba lagi dalam "
        "{s} detik…",
        "retry_problem": "{problem} Mencoba lagi dalam {s} detik…",
        "noscript_room": "JavaScript tidak aktif. Gunakan halaman antrean tanpa JavaScript:",
        "noscript_link": "buka halaman status antrean",
        "join_intro": "Ambil nomor antrean untuk membeli e-Meterai. Setelah itu halaman ini "
        "memuat ulang sendiri secara berkala dan menunjukkan posisi Anda.",
        "join_button": "Ambil nomor antrean",
        "refresh_note": "Halaman ini memuat ulang sendiri dalam {s} detik.",
        "refresh_now": "Perbarui sekarang",
        "buy_title": "Beli e-Meterai",
        "buy_intro": "Giliran Anda sudah tiba. Pesan meterai, bayar, lalu unggah dokumen PDF "
        "Anda untuk dibubuhi e-Meterai.",
        "not_admitted_title": "Belum giliran Anda",
        "not_admitted_note": "Halaman pembelian terbuka setelah Anda melewati antrean, dan sesi "
        "pembelian berlaku terbatas. Kembali ke antrean: jika giliran Anda sudah tiba, Anda "
        "langsung diarahkan ke sini lagi.",
        "back_to_room": "Kembali ke antrean",
        "step_buy": "1. Pesan meterai",
        "price_note": "Harga Rp 10.000 per meterai.",
        "quantity_label": "Jumlah meterai",
        "buy_button": "Pesan meterai",
        "working": "Memproses…",
        "reservation_title": "Pesanan Anda",
        "payment_reference": "Kode pembayaran",
        "amount": "Jumlah yang harus dibayar",
        "pay_before": "Bayar sebelum",
        "status_label": "Status",
        "purchase_pending_payment": "Menunggu pembayaran",
        "purchase_paid": "Lunas: meterai sudah menjadi milik Anda",
        "purchase_expired": "Kedaluwarsa: tidak dibayar tepat waktu; pesan lagi bila perlu",
        "payment_help": "Bayar jumlah di atas melalui penyedia pembayaran (transfer bank, "
        "virtual account, atau dompet digital) dan cantumkan kode pembayaran persis seperti "
        "tertulis. Halaman ini memeriksa pembayaran secara otomatis. Jika belum dibayar sebelum "
        "batas waktu, pesanan batal dan meterai dilepas.",
        "step_upload": "2. Unggah dokumen",
        "upload_help": "Hanya PDF. Tanda tangani dokumen lebih dulu: setelah dibubuhi meterai, "
        "dokumen tidak boleh diubah. Meterai dibubuhkan di halaman terakhir kecuali Anda memilih "
        "halaman lain.",
        "file_label": "Dokumen PDF",
        "page_label": "Halaman (kosongkan untuk halaman terakhir)",
        "upload_button": "Unggah dan bubuhkan meterai",
        "jobs_title": "Dokumen Anda",
        "job_queued": "Menunggu giliran pembubuhan…",
        "job_signing": "Sedang dibubuhi meterai…",
        "job_done": "Selesai",
        "job_failed": "Gagal: {reason}",
        "serial_label": "Nomor seri meterai",
        "download": "Unduh PDF bermeterai",
        "noscript_buy": "Pembelian dan unggah dokumen memerlukan JavaScript. Aktifkan "
        "JavaScript lalu muat ulang halaman ini.",
        "err_generic": "Terjadi masalah: {detail}",
        "err_network": "Tidak dapat terhubung. Periksa koneksi internet Anda lalu coba lagi.",
        "err_nocrypto": "Browser ini tidak dapat menjalankan pemeriksaan keamanan antrean. "
        "Gunakan browser versi terbaru.",
        "err_pow_required": "Antrean sedang memerlukan pemeriksaan keamanan yang berjalan dengan "
        "JavaScript. Aktifkan JavaScript lalu buka kembali halaman ini.",
        "err_rate_limited": "Terlalu banyak permintaan dari jaringan Anda. Tunggu sebentar lalu "
        "coba lagi.",
        "err_http_429": "Terlalu banyak permintaan dari jaringan Anda. Tunggu sebentar lalu "
        "coba lagi.",
        "err_unavailable": "Layanan sedang sibuk. Coba lagi sebentar lagi.",
        "err_room_unavailable": "Antrean sedang tidak dapat dihubungi sebentar. Tempat Anda "
        "tetap tersimpan; halaman ini mencoba lagi dengan sendirinya.",
        "err_database_unavailable": "Layanan sedang sibuk. Coba lagi sebentar lagi.",
        "err_internal_error": "Terjadi kesalahan di server kami. Coba lagi sebentar lagi.",
        "err_missing_credentials": "Sesi pembelian Anda sudah habis atau belum dimulai. Kembali "
        "ke antrean untuk melanjutkan.",
        "err_invalid_admission": "Sesi pembelian Anda sudah habis. Kembali ke antrean untuk "
        "melanjutkan.",
        "err_applicant_limit": "Setiap pemohon dapat memegang paling banyak {max_stamps} "
        "meterai, dan Anda sudah memegang {held}.",
        "err_quantity_too_large": "Jumlahnya terlalu banyak: paling banyak {max_quantity} "
        "meterai per pesanan.",
        "err_sold_out": "Maaf, meterai sedang habis. Coba lagi beberapa saat lagi.",
        "err_invalid_request": "Isian belum benar. Periksa lalu coba lagi.",
        "err_no_unused_serial": "Anda belum punya meterai lunas yang belum dipakai. Pesan dan "
        "bayar meterai lebih dulu.",
        "err_serial_unavailable": "Meterai itu tidak dapat dipakai. Pesan dan bayar meterai "
        "lebih dulu.",
        "err_not_pdf": "Berkas itu bukan PDF. Unggah dokumen dalam format PDF.",
        "err_unsupported_media_type": "Berkas itu bukan PDF. Unggah dokumen dalam format PDF.",
        "err_payload_too_large": "Berkas terlalu besar untuk diunggah.",
        "err_invalid_pdf": "PDF ini rusak atau tidak dapat dibaca. Simpan ulang sebagai PDF "
        "lalu coba lagi.",
        "err_encrypted_pdf": "PDF ini dilindungi kata sandi. Unggah versi tanpa kata sandi.",
        "err_certified_no_changes": "Pembuat PDF ini mengunci dokumennya dari perubahan, "
        "sehingga tidak dapat dibubuhi meterai.",
        "err_certified_pdf": "PDF ini bersertifikat; membubuhkan meterai akan merusak "
        "sertifikasinya.",
        "err_no_pages": "PDF ini tidak punya halaman.",
        "err_page_out_of_range": "Halaman yang dipilih tidak ada di dokumen ini.",
        "err_box_off_page": "Meterai tidak muat di halaman itu. Pilih halaman lain.",
        "err_box_too_small": "Ruang untuk meterai terlalu kecil.",
        "err_already_stamped": "Dokumen ini sudah dibubuhi meterai tersebut.",
        "err_too_complex": "PDF ini terlalu rumit untuk diproses. Cetak ulang sebagai PDF "
        "(Print to PDF) lalu unggah lagi.",
        "err_malformed_multipart": "Unggahan tidak lengkap. Coba lagi.",
        "err_not_found": "Data tidak ditemukan.",
        "err_not_ready": "Dokumen belum selesai dibubuhi meterai.",
        "err_idempotency_key_reused": "Permintaan ganda terdeteksi. Muat ulang halaman lalu "
        "coba lagi.",
    },
    "en": {
        "lang_name": "English",
        "locale": "en-GB",
        "brand": "e-Meterai",
        "room_title": "e-Meterai purchase queue",
        "room_intro": "You are in the waiting room. This page updates your position by itself; "
        "keep it open. Reloading the page or opening another tab does not lose your place.",
        "connecting": "Connecting to the queue…",
        "preparing": "Preparing your place in the queue…",
        "preparing_note": "Your browser is running a short security check. Please keep this "
        "page open.",
        "prequeue_title": "The sale has not opened yet",
        "prequeue_countdown": "Opens in {time}",
        "prequeue_note": "You are registered. Your position appears here when the sale opens.",
        "waiting_title": "You are in the queue",
        "paused_title": "The queue is paused",
        "paused_note": "Operators have paused the queue for now. Your place is safe; this page "
        "carries on by itself when the queue reopens.",
        "admitted_title": "It's your turn!",
        "admitted_note": "Please go on to buy your e-Meterai. You will be taken there "
        "automatically.",
        "continue": "Continue to purchase",
        "expired_title": "Your queue ticket has expired",
        "expired_note": "This page did not check the queue for too long, so your place was "
        "released. Take a new number to join again.",
        "rejoin": "Take a new queue number",
        "people_ahead": "You are number {n} in line",
        "people_ahead_one": "You are next",
        "eta_label": "Estimated wait",
        "eta_unknown": "cannot be estimated yet",
        "eta_under_minute": "under a minute",
        "eta_minutes": "about {m} min",
        "eta_hours": "about {h} h {m} min",
        "progress_label": "Queue progress",
        "progress_value": "{p}% of the way to your turn",
        "updated_label": "Last updated",
        "retry_offline": "Connection lost. Trying again in {s} seconds…",
        "retry_busy": "The server is busy. Trying again in {s} seconds…",
        "retry_limited": "Too many requests from your network. Trying again in {s} seconds…",
        "retry_problem": "{problem} Trying again in {s} seconds…",
        "noscript_room": "JavaScript is off. Use the queue page that works without it:",
        "noscript_link": "open the queue status page",
        "join_intro": "Take a queue number to buy e-Meterai. This page then reloads by itself "
        "from time to time and shows your position.",
        "join_button": "Take a queue number",
        "refresh_note": "This page reloads by itself in {s} seconds.",
        "refresh_now": "Update now",
        "buy_title": "Buy e-Meterai",
        "buy_intro": "It's your turn. Order your stamps, pay, then upload your PDF to have the "
        "e-Meterai affixed.",
        "not_admitted_title": "It's not your turn yet",
        "not_admitted_note": "The purchase page opens once you have passed the queue, and a "
        "purchase session lasts a limited time. Go back to the queue: if your turn has come, "
        "you are sent straight back here.",
        "back_to_room": "Back to the queue",
        "step_buy": "1. Order stamps",
        "price_note": "Rp 10,000 per stamp.",
        "quantity_label": "Number of stamps",
        "buy_button": "Order stamps",
        "working": "Working…",
        "reservation_title": "Your order",
        "payment_reference": "Payment reference",
        "amount": "Amount to pay",
        "pay_before": "Pay before",
        "status_label": "Status",
        "purchase_pending_payment": "Waiting for payment",
        "purchase_paid": "Paid: the stamps are yours",
        "purchase_expired": "Expired: not paid in time; order again if you need to",
        "payment_help": "Pay the amount above through the payment provider (bank transfer, "
        "virtual account or e-wallet), quoting the payment reference exactly as shown. This page "
        "checks for your payment by itself. If it is not paid before the deadline, the order is "
        "cancelled and the stamps are released.",
        "step_upload": "2. Upload your document",
        "upload_help": "PDF only. Sign your document first: once stamped it must not be "
        "changed. The stamp goes on the last page unless you choose another.",
        "file_label": "PDF document",
        "page_label": "Page (leave empty for the last page)",
        "upload_button": "Upload and stamp",
        "jobs_title": "Your documents",
        "job_queued": "Waiting to be stamped…",
        "job_signing": "Being stamped…",
        "job_done": "Done",
        "job_failed": "Failed: {reason}",
        "serial_label": "Stamp serial number",
        "download": "Download the stamped PDF",
        "noscript_buy": "Buying and uploading need JavaScript. Turn JavaScript on and reload "
        "this page.",
        "err_generic": "Something went wrong: {detail}",
        "err_network": "Cannot connect. Check your internet connection and try again.",
        "err_nocrypto": "This browser cannot run the queue's security check. Please use an "
        "up-to-date browser.",
        "err_pow_required": "The queue currently needs a security check that runs with "
        "JavaScript. Turn JavaScript on and open this page again.",
        "err_rate_limited": "Too many requests from your network. Wait a moment and try again.",
        "err_http_429": "Too many requests from your network. Wait a moment and try again.",
        "err_unavailable": "The service is busy. Try again shortly.",
        "err_room_unavailable": "The queue cannot be reached for a moment. Your place is kept; "
        "this page tries again by itself.",
        "err_database_unavailable": "The service is busy. Try again shortly.",
        "err_internal_error": "Something went wrong on our side. Try again shortly.",
        "err_missing_credentials": "Your purchase session has ended or not started yet. Go "
        "back to the queue to continue.",
        "err_invalid_admission": "Your purchase session has ended. Go back to the queue to "
        "continue.",
        "err_applicant_limit": "Each applicant may hold at most {max_stamps} stamps, and you "
        "already hold {held}.",
        "err_quantity_too_large": "That is too many: at most {max_quantity} stamps per order.",
        "err_sold_out": "Sorry, stamps are sold out right now. Try again in a while.",
        "err_invalid_request": "Something in the form is not right. Check it and try again.",
        "err_no_unused_serial": "You have no paid, unused stamp yet. Order and pay for one first.",
        "err_serial_unavailable": "That stamp cannot be used. Order and pay for one first.",
        "err_not_pdf": "That file is not a PDF. Upload your document as a PDF.",
        "err_unsupported_media_type": "That file is not a PDF. Upload your document as a PDF.",
        "err_payload_too_large": "The file is too large to upload.",
        "err_invalid_pdf": "This PDF is damaged or cannot be read. Save it as a PDF again and "
        "retry.",
        "err_encrypted_pdf": "This PDF is password-protected. Upload a version without a password.",
        "err_certified_no_changes": "The author of this PDF locked it against changes, so it "
        "cannot be stamped.",
        "err_certified_pdf": "This PDF is certified; stamping it would break the certification.",
        "err_no_pages": "This PDF has no pages.",
        "err_page_out_of_range": "The page you chose is not in this document.",
        "err_box_off_page": "The stamp does not fit on that page. Choose another page.",
        "err_box_too_small": "The space for the stamp is too small.",
        "err_already_stamped": "This document already carries that stamp.",
        "err_too_complex": "This PDF is too complex to process. Print it to PDF again and "
        "upload that.",
        "err_malformed_multipart": "The upload was incomplete. Try again.",
        "err_not_found": "Not found.",
        "err_not_ready": "The document has not been stamped yet.",
        "err_idempotency_key_reused": "A duplicate request was detected. Reload the page and "
        "try again.",
    },
}


def language(requested: str | None) -> str:
    """The page language for a `?lang=` value: a known one, else the default."""
    return requested if requested in TEXTS else DEFAULT_LANGUAGE

"""Request-body decompression with a hard size limit.

Why streaming: a gzip bomb (a few KiB that inflate to gigabytes) must be
refused before it is inflated, so the body is inflated in bounded chunks and
the limit is checked after every chunk instead of calling ``gzip.decompress``.
"""

from __future__ import annotations

import zlib

from tailscope.errors import BadPayload, PayloadTooLarge

# Inflate at most this many bytes per step, so memory stays bounded by the
# limit plus one chunk whatever the compression ratio.
_CHUNK = 1 << 20

ACCEPTED_ENCODINGS = ("identity", "gzip", "deflate")


def decompress(body: bytes, content_encoding: str | None, *, limit: int) -> bytes:
    """Return ``body`` decoded per ``Content-Encoding``.

    Args:
        body: the raw request body.
        content_encoding: the header value (``None``/empty/``identity``, ``gzip``
            or ``x-gzip``, ``deflate``); case and surrounding spaces ignored.
        limit: the most bytes the decoded body may have.

    Raises:
        PayloadTooLarge: the decoded body would exceed ``limit`` (checked while
            inflating, so a bomb is never fully inflated).
        BadPayload: unknown or stacked encodings, corrupt or truncated data.
    """
    enc = (content_encoding or "identity").strip().lower()
    if enc in ("", "identity"):
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is {len(body)} bytes, over the limit of {limit} bytes")
        return body
    if enc in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif enc == "deflate":
        # RFC 9110 "deflate" is zlib-wrapped; some clients send raw deflate.
        zlib_header = len(body) >= 2 and (body[0] & 0x0F) == 8 and ((body[0] << 8) | body[1]) % 31 == 0
        wbits = zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS
    else:
        raise BadPayload(
            f"unsupported Content-Encoding {content_encoding!r}; accepted: {', '.join(ACCEPTED_ENCODINGS)}"
        )
    return _inflate(body, wbits, limit, enc)


def _inflate(body: bytes, wbits: int, limit: int, enc: str) -> bytes:
    out: list[bytes] = []
    size = 0
    data = body
    try:
        while True:  # one iteration per gzip member (RFC 1952 allows several)
            d = zlib.decompressobj(wbits)
            while True:
                # Ask for at most one byte more than the limit allows, in chunks.
                piece = d.decompress(data, min(_CHUNK, limit - size + 1))
                size += len(piece)
                if size > limit:
                    raise PayloadTooLarge(f"{enc} body inflates to more than the limit of {limit} bytes")
                out.append(piece)
                data = d.unconsumed_tail
                if d.eof:
                    break
                if not data and not piece:
                    raise BadPayload(f"{enc} body is truncated (no end of stream)")
            data = d.unused_data
            if not data or wbits <= 16:
                break
    except zlib.error as exc:
        raise BadPayload(f"corrupt {enc} body: {exc}") from None
    return b"".join(out)

"""Image loading: any accepted source -> RGB uint8 pixels (H, W, 3), upright, alpha composited onto white.

Sources: a local path (str or Path, or a file:// URL), an http(s) URL (timeout over the whole download,
byte cap, User-Agent, bounded redirects), a `data:image/<type>;base64,...` URL, raw bytes, a PIL image,
or a numpy array (H, W), (H, W, 1|3|4) of uint8 / uint16 / bool / float in [0, 1].

A server sets stricter ImageLimits: no local files, or only those inside one folder (real paths, so
neither `..` nor a symlink leads out of it), and no URL whose host resolves to a loopback, private,
link-local or otherwise non-public address (checked on every redirect hop, and the checked address is the
one connected to, so a DNS answer that changes between check and connect cannot slip through).

Two steps, so a request can be planned and refused before any pixel is decoded:
  open_image(src)  -> OpenedImage: header read only (size after EXIF rotation, format, animated?);
                      the pixel cap (decompression bombs) is checked here.
  .decode()        -> np.ndarray uint8 (H, W, 3), C-contiguous.
`load_image(src)` does both.

Pixel modes follow mistral_common (`_convert_to_rgb`: anything not RGB goes through RGBA and is pasted onto
white), with two deliberate differences: 16-bit modes (I;16*, I) are scaled to 8 bits (v * 255 / 65535,
rounded) instead of saturating at 255, and the EXIF orientation is applied (mistral_common applies none;
users expect phone photos upright). Animated images: the first frame, with an AnimatedImageWarning, or an
AnimatedImageError when `allow_animated=False`.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import re
import socket
import struct
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import image_cache
from .image_cache import CachedImage, encoded_key
from .errors import (AnimatedImageError, AnimatedImageWarning, ImageDecodeError, ImageError, ImageFetchError,
                     ImageSourceError, ImageTooLargeError, describe_source)

ImageSource = Any  # str | os.PathLike | bytes | PIL.Image.Image | np.ndarray

USER_AGENT = "pixtral_rt/0.1 (+image fetch; python-urllib)"

_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the PIL transpose that makes the image upright (same table as PIL.ImageOps.exif_transpose)
_ORIENT_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# data-URL MIME type -> Pillow formats the bytes may have (MIME types not listed here are not cross-checked)
_FORMATS_FOR_MIME = {
    "image/png": {"PNG"}, "image/apng": {"PNG"}, "image/jpeg": {"JPEG", "MPO"}, "image/jpg": {"JPEG", "MPO"},
    "image/pjpeg": {"JPEG", "MPO"}, "image/gif": {"GIF"}, "image/webp": {"WEBP"}, "image/bmp": {"BMP"},
    "image/x-ms-bmp": {"BMP"}, "image/tiff": {"TIFF"}, "image/x-icon": {"ICO"},
    "image/vnd.microsoft.icon": {"ICO"},
}
_NO_SPACE = {ord(c): None for c in " \t\r\n\f\v"}
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*):")
_BASE64ISH = re.compile(r"^[A-Za-z0-9+/_\-\s]+={0,2}\s*$")
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class ImageLimits:
    """Operator limits for loading one image. The defaults suit the CLI on the user's own machine; a server
    narrows local-file access and refuses private addresses (pixtral_rt.serve)."""

    max_pixels: int = 64 * 1024 * 1024   # width * height from the header, before decoding
    max_bytes: int = 64 * 1024 * 1024    # encoded size (download, file or data URL)
    timeout: float = 10.0                 # seconds for a whole http(s) download, connect included
    max_redirects: int = 5
    user_agent: str = USER_AGENT
    allow_animated: bool = True           # False: refuse animated input instead of taking frame 0
    allow_local_files: bool = True        # False for servers that must not read the local disk
    local_files_root: str | None = None   # with allow_local_files: only files whose real path is inside it
    allow_private_urls: bool = True       # False: refuse hosts resolving to non-public addresses (SSRF guard)
    apply_exif_orientation: bool = True


DEFAULT_LIMITS = ImageLimits()


@dataclass
class OpenedImage:
    """An image whose header has been read and checked; `decode()` produces the pixels."""

    name: str                  # printable name of the source, used in every error message
    width: int                 # after EXIF orientation
    height: int
    format: str | None         # Pillow's format name ("PNG", "JPEG", ...) or None for arrays / PIL input
    mode: str
    orientation: int = 1
    animated: bool = False
    n_bytes: int = 0                    # encoded size (0: not from encoded bytes)
    n_frames: object = 1                # of an animated image ("several" when its container does not say)
    _pil: Image.Image | None = None
    _array: np.ndarray | None = None
    cache_key: bytes | None = None      # image_cache key of its encoded bytes: decode() stores the pixels there
    cached: CachedImage | None = None   # the cache entry its pixels came from (or went to)

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def decode(self) -> np.ndarray:
        """RGB uint8 pixels, shape (height, width, 3), C-contiguous."""
        if self._array is not None:
            return self._array
        im = self._pil
        assert im is not None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's palette-transparency and bomb warnings
                if self.animated:
                    im.seek(0)
                im.load()
                rgb = _to_rgb(im)
                if self.orientation in _ORIENT_TRANSPOSE:
                    rgb = rgb.transpose(_ORIENT_TRANSPOSE[self.orientation])
                arr = np.asarray(rgb, dtype=np.uint8)
        except ImageError:
            raise
        except Exception as exc:  # noqa: BLE001 - Pillow raises OSError/SyntaxError/ValueError/EOFError...
            raise ImageDecodeError(f"image {self.name} ({self.format or 'unknown format'}) is corrupt or "
                                   f"truncated and cannot be decoded: {exc}", self.name) from exc
        if arr.shape != (self.height, self.width, 3):
            raise ImageDecodeError(f"image {self.name} decoded to shape {arr.shape}, expected "
                                   f"{(self.height, self.width, 3)} from its header", self.name)
        self._array = np.ascontiguousarray(arr)
        self._pil = None
        if self.cache_key is not None:
            self.cached = CachedImage(self.width, self.height, self.format, self.mode, self.orientation,
                                      self.animated, self.n_frames, self.n_bytes, self._array)
            image_cache.CACHE.put(self.cache_key, self.cached)     # marks the pixels read-only
        return self._array


def load_image(source: ImageSource, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Load any accepted source as RGB uint8 (H, W, 3). Raises an ImageError subclass naming the source."""
    return open_image(source, limits).decode()


def open_image(source: ImageSource, limits: ImageLimits = DEFAULT_LIMITS) -> OpenedImage:
    """Read the header of `source` and check it (pixel cap, animation); no full decode yet."""
    if isinstance(source, OpenedImage):
        return source
    if isinstance(source, Image.Image):
        return _open_pil(source, describe_source(source), limits)
    if isinstance(source, np.ndarray):
        return _open_array(source, limits)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _open_bytes(bytes(source), describe_source(source), limits)
    if isinstance(source, os.PathLike):
        return _open_path(os.fspath(source), limits)
    if isinstance(source, str):
        return _open_string(source, limits)
    raise ImageSourceError(f"unsupported image source type {type(source).__name__}: pass a path, an http(s) "
                           "or data: URL, bytes, a PIL image or a numpy array", describe_source(source))


# --------------------------------------------------------------------------------------------- sources
def _open_string(s: str, limits: ImageLimits) -> OpenedImage:
    name = describe_source(s)
    stripped = s.strip()
    m = _SCHEME.match(stripped)
    scheme = m.group(1).lower() if m else ""
    if len(scheme) == 1 and os.name == "nt":  # "C:\..." is a Windows drive, not a scheme
        scheme = ""
    if scheme == "data":
        # the same data URL again (a chat's history re-sends its images): no base64, no decode
        key = encoded_key(stripped, limits.apply_exif_orientation) if image_cache.CACHE.max_bytes else None
        hit = _from_cache(key, name, limits)
        if hit is not None:
            return hit
        data, mime = _decode_data_url(stripped, name)
        opened = _open_bytes(data, name, limits, key=key)
        _check_mime(mime, opened, name)
        return opened
    if scheme in ("http", "https"):
        return _open_bytes(fetch_url(stripped, limits), name, limits)
    if scheme == "file":
        parsed = urllib.parse.urlparse(stripped)
        if parsed.netloc not in ("", "localhost"):
            raise ImageSourceError(f"file URL {name} names host {parsed.netloc!r}: only local files "
                                   "(file:///absolute/path) can be read", name)
        return _open_path(urllib.parse.unquote(parsed.path), limits)
    if scheme and stripped[len(scheme) + 1:].startswith("//"):
        raise ImageSourceError(f"image URL {name} has unsupported scheme {scheme!r}: use http(s)://, data:image/"
                               "...;base64,... or a local path", name)
    if _is_readable_file(s, limits, name):
        return _open_path(s, limits)
    if len(stripped) >= 32 and _BASE64ISH.match(stripped) and not stripped.endswith((".png", ".jpg", ".jpeg")):
        raise ImageSourceError(f"image {name} looks like raw base64 without the data-URL prefix: send it as "
                               "'data:image/png;base64,<payload>' (or image/jpeg, image/webp...)", name)
    if scheme:
        raise ImageSourceError(f"image reference {name} has unsupported scheme {scheme!r}: use http(s)://, "
                               "data:image/...;base64,... or a local path", name)
    return _open_path(s, limits)  # raises, naming why: local files not allowed, outside the folder, missing


def _decode_data_url(url: str, name: str) -> tuple[bytes, str]:
    head, sep, payload = url.partition(",")
    if not sep:
        raise ImageSourceError(f"data URL {name} has no ',' separating the header from the payload", name)
    params = head[len("data:"):].split(";")
    mime = params[0].strip().lower() or "text/plain"
    if "base64" not in [p.strip().lower() for p in params[1:]]:
        raise ImageSourceError(f"data URL {name} is not base64-encoded: use 'data:{mime};base64,<payload>'", name)
    if not mime.startswith("image/"):
        raise ImageSourceError(f"data URL {name} declares MIME type {mime!r}, not an image/* type", name)
    compact = urllib.parse.unquote(payload) if "%" in payload else payload
    if any(c in compact for c in " \t\r\n\f\v"):      # a regex pass over a 4 MB payload costs ~100 ms
        compact = compact.translate(_NO_SPACE)
    if not compact:
        raise ImageDecodeError(f"data URL {name} has an empty payload (0 bytes)", name)
    try:
        alt = b"-_" if ("-" in compact or "_" in compact) else None
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), altchars=alt, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageSourceError(f"data URL {name}: payload is not valid base64 ({exc})", name) from exc
    return data, mime


def _check_mime(mime: str, opened: OpenedImage, name: str) -> None:
    allowed = _FORMATS_FOR_MIME.get(mime)
    if allowed is not None and opened.format not in allowed:
        raise ImageSourceError(f"data URL {name} declares {mime} but its bytes are {opened.format}: fix the MIME "
                               "type or the payload", name)


def _allowed_local_path(path: str, limits: ImageLimits, name: str) -> str:
    """The real path (symlinks and '..' resolved) to read for `path`, or ImageSourceError when the limits
    forbid local files or the real path lies outside `limits.local_files_root`. The file is then opened by
    that real path; only a folder that untrusted users cannot write to is safe to allow (one who can could
    swap a symlink in between)."""
    if not limits.allow_local_files:
        raise ImageSourceError(f"image {name}: local files are not allowed here; send an http(s) URL or a "
                               "data: URL", name)
    try:
        real = os.path.realpath(path)
    except ValueError as exc:  # an embedded NUL byte
        raise ImageSourceError(f"image path {name} is not a valid path: {exc}", name) from exc
    if limits.local_files_root is not None:
        root = os.path.realpath(limits.local_files_root)
        if os.path.commonpath([real, root]) != root:
            # the folder itself is not named: it is the operator's business, not the client's
            raise ImageSourceError(f"image {name} is outside the folder that local images may be read from", name)
    return real


def _is_readable_file(path: str, limits: ImageLimits, name: str) -> bool:
    """An existing file that the limits allow; the disk is not probed for a path outside them (a client must
    not learn which files exist there)."""
    try:
        return os.path.isfile(_allowed_local_path(path, limits, name))
    except ImageSourceError:
        return False


def check_local_file(path: str, name: str | None = None) -> None:
    """ImageSourceError unless `path` exists and is not a directory: the one wording of these two mistakes,
    for the loader and for the CLI's checks before the model loads (`--image`, `/image`)."""
    name = name or describe_source(path)
    if os.path.isdir(path):
        raise ImageSourceError(f"image path {name} is a directory, not a file: give an image file's path", name)
    if not os.path.exists(path):
        raise ImageSourceError(f"image file {name} does not exist", name)


def _open_path(path: str, limits: ImageLimits) -> OpenedImage:
    name = describe_source(path)
    real = _allowed_local_path(path, limits, name)
    check_local_file(real, name)
    try:
        size = os.path.getsize(real)
        if size > limits.max_bytes:
            raise ImageTooLargeError(f"image file {name} is {size} bytes, over the cap of {limits.max_bytes}", name)
        with open(real, "rb") as f:
            data = f.read()
    except OSError as exc:  # unreadable (permissions), or removed / replaced since the check
        raise ImageSourceError(f"image file {name} cannot be read: {exc}", name) from exc
    return _open_bytes(data, name, limits)


# ------------------------------------------------------------------------------------------ http(s) URLs
# a host name after IDNA encoding: LDH labels ('_' too: real DNS names carry it), an optional final dot
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits only: str.isdigit() also takes superscripts and other scripts' digits
_DIGITS = re.compile(r"[0-9]{1,19}")  # a Content-Length worth reading (the byte count while reading caps any size)
# everything printable in ASCII stays as written (existing %XX escapes included); only non-ASCII is encoded
_ASCII_PRINTABLE = "".join(chr(c) for c in range(0x21, 0x7F))


def checked_http_url(url: str, label: str | None = None, error: type[ImageError] = ImageSourceError) -> str:
    """`url` checked as an http(s) image URL and made ready to send: IDNA-encoded host, non-ASCII in the path
    and query percent-encoded (UTF-8, as browsers do), fragment dropped. Anything urllib / http.client would
    choke on later (no host, credentials, a bad port, unbalanced IPv6 brackets, spaces or control characters,
    an impossible host name) raises `error` here, naming the part that is wrong. `label` starts the message
    (default "image URL '<url>'")."""
    name = describe_source(url)
    label = label or f"image URL {name}"
    _refuse_unprintable(url, label, name, error)
    parts = _split(url, label, name, error)
    if parts.scheme.lower() not in ("http", "https"):
        raise error(f"{label} is a non-http(s) URL (scheme {parts.scheme!r}): only http:// and https:// URLs are "
                    "fetched", name)
    netloc = _host_and_port(parts.netloc, label, name, error)
    path, query = (urllib.parse.quote(p, safe=_ASCII_PRINTABLE) for p in (parts.path, parts.query))
    return urllib.parse.urlunsplit((parts.scheme.lower(), netloc, path, query, ""))


def _refuse_unprintable(url: str, label: str, name: str, error: type[ImageError]) -> None:
    # before parsing: urlsplit silently deletes tabs and newlines, and http.client refuses any of these later
    for i, c in enumerate(url):
        if c.isspace() or unicodedata.category(c).startswith("C"):  # spaces, controls, lone surrogates, ...
            raise error(f"{label} contains the character {c!r} (U+{ord(c):04X}) at position {i}: "
                        "percent-encode it (a space is %20)", name)


def _split(url: str, label: str, name: str, error: type[ImageError]) -> urllib.parse.SplitResult:
    try:
        return urllib.parse.urlsplit(url)
    except ValueError as exc:  # an unbalanced '[' / ']', IPv4 in brackets, a host whose NFKC form holds '/?#@:'
        hint = ": an IPv6 address is written [2001:db8::1], [2001:db8::1]:8080" if "[" in url or "]" in url else ""
        raise error(f"{label} has an invalid host ({exc}){hint}", name) from exc


def _host_and_port(netloc: str, label: str, name: str, error: type[ImageError]) -> str:
    """The netloc to send ('host', 'host:port', '[v6]:port'), the host IDNA-encoded."""
    if "@" in netloc:
        raise error(f"{label} contains credentials (the part before '@'): credentials in an image URL are "
                    "refused; make the image readable without them or send it as a data: URL", name)
    if netloc.startswith("["):
        end = netloc.find("]")
        host, rest = (netloc[1:end], netloc[end + 1:]) if end > 0 else (netloc[1:], None)
        if rest is None or (rest and not rest.startswith(":")):
            raise error(f"{label} has an invalid IPv6 host {describe_source(netloc, 60)}: write it as "
                        "[2001:db8::1] or [2001:db8::1]:8080", name)
        ascii_host, port = f"[{_ipv6(host, label, name, error)}]", rest[1:] if rest else None
    else:
        host, sep, port = netloc.partition(":")
        if "[" in netloc or "]" in netloc or ":" in port:
            raise error(f"{label} has an invalid host {describe_source(netloc, 60)}: brackets and a second ':' "
                        "belong only to an IPv6 address, written [2001:db8::1]", name)
        ascii_host, port = _host_name(host, label, name, error), port if sep else None
    return ascii_host + _port(port, label, name, error)


def _ipv6(host: str, label: str, name: str, error: type[ImageError]) -> str:
    try:
        if "%" in host:  # a zone index ("fe80::1%25eth0") names one of this machine's interfaces
            raise ValueError("a zone index ('%...') is not accepted")
        return ipaddress.IPv6Address(host).compressed
    except ValueError as exc:
        raise error(f"{label} has an invalid IPv6 address {describe_source(host, 60)} in brackets ({exc})",
                    name) from exc


def _host_name(host: str, label: str, name: str, error: type[ImageError]) -> str:
    """A registered name or IPv4 address, IDNA-encoded (a non-ASCII label becomes its 'xn--' form)."""
    if not host:
        raise error(f"{label} has no host: write it as http(s)://host/path", name)
    shown = describe_source(host, 60)
    if "%" in host:
        raise error(f"{label} has a percent-encoded host {shown}: write the host name as plain text", name)
    try:
        # Python's codec is IDNA 2003 (what socket.getaddrinfo itself would apply); it also refuses empty
        # labels ('a..b') and labels over 63 characters
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError as exc:  # "encoding with 'idna' codec failed (UnicodeError: label too long)"
        reason = re.sub(r"^.*\(UnicodeError: (.*)\)$", r"\1", str(exc))
        raise error(f"{label} has a host name {shown} that is not a valid domain name ({reason})", name) from exc
    if not _HOST_NAME.fullmatch(ascii_host) or len(ascii_host.rstrip(".")) > 253:
        raise error(f"{label} has a host name {shown} that is not a valid domain name: letters, digits, '-' "
                    "and '.' only (at most 253 characters), or an IPv6 address in brackets", name)
    return ascii_host.lower()


def _port(port: str | None, label: str, name: str, error: type[ImageError]) -> str:
    if not port:  # none, or an empty one ("host:/"), which RFC 3986 reads as the scheme's default
        return ""
    if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise error(f"{label} has an invalid port {describe_source(port, 40)}: a port is a number from 1 to "
                    "65535", name)
    return f":{int(port)}"


class _BoundedRedirects(urllib.request.HTTPRedirectHandler):
    """At most `limit` redirects, each to a URL that passes checked_http_url (a bad target is the remote
    server's fault: ImageFetchError, 502)."""

    def __init__(self, limit: int, name: str):
        super().__init__()
        self.limit, self.name, self.count = limit, name, 0

    def http_error_302(self, req, fp, code, msg, headers):  # noqa: D401 - urllib hook
        # urllib parses Location before redirect_request sees it: an unclosed '[' would escape as a ValueError
        location = headers.get("location") or headers.get("uri") or ""
        try:
            urllib.parse.urlparse(location)
        except ValueError as exc:
            fp.close()
            raise ImageFetchError(f"image URL {self.name} redirects to a malformed URL "
                                  f"{describe_source(location)} ({exc})", self.name) from exc
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401 - urllib hook
        self.count += 1
        if self.count > self.limit:
            raise ImageFetchError(f"image URL {self.name}: more than {self.limit} redirects", self.name)
        newurl = checked_http_url(newurl, f"image URL {self.name} redirects to {describe_source(newurl)}, which",
                                  ImageFetchError)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# cloud instance-metadata endpoints (AWS, GCP, Azure, ...): named apart so the refusal says what they are
_METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


def private_address_kind(ip: str) -> str | None:
    """What makes `ip` unfit for a server to fetch from ("loopback", "private", "cloud-metadata", ...), or
    None for a public address. IPv4 addresses embedded in IPv6 (::ffff:a.b.c.d, 6to4) are judged as IPv4."""
    a = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone index ("fe80::1%eth0")
    if a.version == 6:
        a = a.ipv4_mapped or a.sixtofour or a
    if a in _METADATA_ADDRESSES:
        return "cloud-metadata"
    for kind in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):  # specific first
        if getattr(a, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if a.is_global else "non-public"


class _RefusedAddress(Exception):
    """A host resolved to a non-public address. Not an OSError, so urllib does not wrap it as 'unreachable'."""

    def __init__(self, host: str, ip: str, kind: str):
        super().__init__(f"host {host!r} resolves to {ip}, a {kind} address")


def _resolve(host: str, port: int) -> list[str]:
    return list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))


def _check_address(host: str, ip: str) -> None:
    kind = private_address_kind(ip)
    if kind is not None:
        raise _RefusedAddress(host, ip, kind)


def _connect_public(address, timeout, source_address=None) -> socket.socket:
    """socket.create_connection for public hosts only: resolve once, refuse the host if any of its addresses
    is not public, then connect to those same addresses (a second lookup could answer differently)."""
    host, port = address
    ips = _resolve(host, port)
    for ip in ips:
        _check_address(host, ip)
    error: OSError = OSError(f"no address found for {host!r}")
    for ip in ips:
        try:
            return socket.create_connection((ip, port), timeout, source_address)
        except OSError as exc:
            error = exc
    raise error


class _PublicHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _connect_public  # http.client's hook for opening the socket


class _PublicHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _connect_public  # TLS still verifies the certificate against the host name


class _PublicHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_PublicHTTPConnection, req)


class _PublicHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_PublicHTTPSConnection, req, context=self._context)


def _opener(limits: ImageLimits, name: str) -> urllib.request.OpenerDirector:
    handlers: list = [_BoundedRedirects(limits.max_redirects, name)]
    if not limits.allow_private_urls:
        # every hop (redirects included) opens its socket through _connect_public; no proxy, since a proxy
        # would resolve the host itself, out of reach of the check
        handlers += [urllib.request.ProxyHandler({}), _PublicHTTPHandler(), _PublicHTTPSHandler()]
    return urllib.request.build_opener(*handlers)


def fetch_url(url: str, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """Download an http(s) URL: whole-download deadline `limits.timeout`, at most `limits.max_bytes`,
    at most `limits.max_redirects` redirects, with a User-Agent; with `limits.allow_private_urls` False, only
    from public addresses. The URL (and every redirect target) is checked first (checked_http_url). Raises
    ImageSourceError (malformed URL, refused address) / ImageFetchError / ImageTooLargeError, nothing else."""
    name = describe_source(url)
    target = checked_http_url(url)
    deadline = time.monotonic() + limits.timeout
    chunks, total = [], 0
    try:
        opener = _opener(limits, name)
        req = urllib.request.Request(target, headers={"User-Agent": limits.user_agent,
                                                      "Accept": "image/*,*/*;q=0.5"})
        with opener.open(req, timeout=limits.timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and _DIGITS.fullmatch(length) and int(length) > limits.max_bytes:
                raise ImageTooLargeError(f"image URL {name} is {int(length)} bytes (Content-Length), over the cap "
                                         f"of {limits.max_bytes}", name)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ImageFetchError(f"image URL {name}: download not finished within {limits.timeout:g} s",
                                          name)
                if resp.fp is not None and getattr(resp.fp, "raw", None) is not None:
                    try:
                        resp.fp.raw._sock.settimeout(left)  # keep every read inside the overall deadline
                    except Exception:  # noqa: BLE001 - best effort; the socket timeout still bounds each read
                        pass
                n = min(1 << 16, limits.max_bytes + 1 - total)
                chunk = resp.read1(n) if hasattr(resp, "read1") else resp.read(n)  # read1: no waiting for n
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > limits.max_bytes:
                    raise ImageTooLargeError(f"image URL {name} is over the cap of {limits.max_bytes} bytes", name)
    except ImageError:
        raise
    except _RefusedAddress as exc:
        raise ImageSourceError(f"image URL {name} refused: {exc}; this server fetches images from public "
                               "addresses only (the operator may allow others with --allow-private-urls)",
                               name) from exc
    except urllib.error.HTTPError as exc:
        raise ImageFetchError(f"image URL {name}: HTTP {exc.code} {exc.reason}", name) from exc
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise ImageFetchError(f"image URL {name}: no answer within {limits.timeout:g} s (timed out)",
                                  name) from exc
        raise ImageFetchError(f"image URL {name} is unreachable: {reason}", name) from exc
    except (TimeoutError, OSError) as exc:
        kind = "timed out" if isinstance(exc, TimeoutError) or "timed out" in str(exc) else "connection error"
        raise ImageFetchError(f"image URL {name}: {kind} after at most {limits.timeout:g} s ({exc})", name) from exc
    except http.client.InvalidURL as exc:  # a URL http.client refuses although checked_http_url took it
        raise ImageSourceError(f"image URL {name} is malformed: {exc}", name) from exc
    except http.client.HTTPException as exc:  # the host answered, but not in HTTP (BadStatusLine, LineTooLong, ...)
        raise ImageFetchError(f"image URL {name}: the server's answer is not valid HTTP "
                              f"({type(exc).__name__}: {exc})", name) from exc
    except (ValueError, UnicodeError) as exc:  # whatever else urllib finds malformed (UnicodeError included)
        raise ImageSourceError(f"image URL {name} is malformed: {exc}", name) from exc
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------- decoding
def _sniff(data: bytes) -> str:
    head = data[:256].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return " (it is an HTML page, e.g. a saved web page or a server's error page, not an image)"
    if head.startswith((b"{", b"[")):
        return " (it looks like JSON text, not an image)"
    if head.startswith(b"<?xml") or head.startswith(b"<svg"):
        return " (it looks like XML/SVG; vector images are not supported, convert to PNG)"
    return ""


def _open_bytes(data: bytes, name: str, limits: ImageLimits, key: bytes | None = None) -> OpenedImage:
    """key: the image_cache key of the source these bytes came from (a data URL); None: the bytes' own."""
    if not data:
        raise ImageDecodeError(f"image {name} is empty (0 bytes)", name)
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"image {name} is {len(data)} bytes, over the cap of {limits.max_bytes}", name)
    if key is None and image_cache.CACHE.max_bytes:
        key = encoded_key(data, limits.apply_exif_orientation)
        hit = _from_cache(key, name, limits)
        if hit is not None:
            return hit
    try:
        im = _pil_open(data)
    except Image.DecompressionBombError as exc:
        # only when even the format's own opener refuses (WebP checks before it allocates its canvas), so
        # the size is unknown; over Pillow's limit means over ours unless the operator raised ours past it
        if limits.max_pixels <= 2 * (Image.MAX_IMAGE_PIXELS or 0):
            raise ImageTooLargeError(f"image {name} is over the cap of {limits.max_pixels} pixels "
                                     "(decompression-bomb guard): downscale it first", name) from exc
        raise ImageTooLargeError(f"image {name} is over Pillow's own pixel limit ({exc}); raise "
                                 "PIL.Image.MAX_IMAGE_PIXELS to accept it", name) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"image {name} is not a recognised image format{_sniff(data)}", name) from exc
    except Exception as exc:  # noqa: BLE001 - corrupt headers raise many types
        raise ImageDecodeError(f"image {name} has a corrupt header: {exc}", name) from exc
    opened = _open_pil(im, name, limits)
    opened.cache_key, opened.n_bytes = key, len(data)
    return opened


def _from_cache(key: bytes | None, name: str, limits: ImageLimits) -> OpenedImage | None:
    """The decoded image of these encoded bytes if cached, with this request's limits checked again (the
    same checks and messages as a first opening)."""
    e = image_cache.CACHE.get(key) if key is not None else None
    if e is None:
        return None
    if e.n_bytes > limits.max_bytes:
        raise ImageTooLargeError(f"image {name} is {e.n_bytes} bytes, over the cap of {limits.max_bytes}", name)
    if e.width * e.height > limits.max_pixels:
        raise ImageTooLargeError(f"image {name} is {e.width}x{e.height} = {e.width * e.height} pixels, over the "
                                 f"cap of {limits.max_pixels} (decompression-bomb guard): downscale it first", name)
    if e.animated:
        if not limits.allow_animated:
            raise AnimatedImageError(f"image {name} is an animated {e.format} with {e.n_frames} frames; only still "
                                     "images are accepted here", name)
        warnings.warn(AnimatedImageWarning(f"image {name} is an animated {e.format} with {e.n_frames} frames: using "
                                           "the first frame only"), stacklevel=4)
    return OpenedImage(name=name, width=e.width, height=e.height, format=e.format, mode=e.mode,
                       orientation=e.orientation, animated=e.animated, n_bytes=e.n_bytes, n_frames=e.n_frames,
                       _array=e.pixels, cached=e)


def _pil_open(data: bytes) -> Image.Image:
    """Image.open, header only, leaving the pixel verdict to _open_pil (ImageLimits.max_pixels, one cap and
    one message). Image.open refuses images over 2 * Image.MAX_IMAGE_PIXELS (178956970 by default) with
    its own message and number, before the size can be read; that limit is a process-wide global other
    threads rely on, so it is not changed here: the header is read again by the format's own opener."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            return _open_past_pillows_cap(data)


def _open_past_pillows_cap(data: bytes) -> Image.Image:
    """What Image.open had built when its size check refused it: the same walk over Pillow's registered
    openers (Image.ID, Image.OPEN: the registry `Image.register_open` fills), without that check. It reads
    what Image.open had already read, so it allocates nothing more; an opener that checks the size itself
    (WebP) raises DecompressionBombError again."""
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        ok = not accept or accept(prefix)
        if not ok or isinstance(ok, str):  # a str is Pillow's "not this format, and here is why"
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open skips to the next format
            continue
    raise UnidentifiedImageError("no Pillow opener reads this header")


def _open_pil(im: Image.Image, name: str, limits: ImageLimits) -> OpenedImage:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"image {name} has an empty size {w}x{h}", name)
    if w * h > limits.max_pixels:
        raise ImageTooLargeError(f"image {name} is {w}x{h} = {w * h} pixels, over the cap of {limits.max_pixels} "
                                 "(decompression-bomb guard): downscale it first", name)
    try:
        animated = bool(getattr(im, "is_animated", False))
    except Exception as exc:  # noqa: BLE001 - seeking a broken second frame
        raise ImageDecodeError(f"image {name} is corrupt (cannot read its frames): {exc}", name) from exc
    if animated:
        n = getattr(im, "n_frames", "several")
        if not limits.allow_animated:
            raise AnimatedImageError(f"image {name} is an animated {im.format} with {n} frames; only still images "
                                     "are accepted here", name)
        # a warning, so library users can filter it; the CLI prints it and the server logs it as one clean
        # line (errors.route_image_warnings)
        warnings.warn(AnimatedImageWarning(f"image {name} is an animated {im.format} with {n} frames: using the "
                                           "first frame only"), stacklevel=3)
    orientation = 1
    if limits.apply_exif_orientation:
        try:
            orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block must not make the image unusable
            orientation = 1
        if orientation not in range(1, 9):
            orientation = 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return OpenedImage(name=name, width=w, height=h, format=im.format, mode=im.mode, orientation=orientation,
                       animated=animated, n_frames=getattr(im, "n_frames", "several") if animated else 1, _pil=im)


def _to_rgb(im: Image.Image) -> Image.Image:
    """mistral_common's rule: RGB stays; anything else -> RGBA -> pasted onto white -> RGB.
    16-bit single-channel modes are first scaled to 8 bits (mistral_common would saturate them)."""
    if im.mode == "RGB":
        return im
    if im.mode in _16BIT_MODES:
        a = np.asarray(im).astype(np.int64)
        a = np.clip(a, 0, 65535)
        im = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if im.mode != "RGBA":
        im = im.convert("RGBA")
    white = Image.new("RGBA", im.size, "WHITE")
    white.paste(im, (0, 0), im)
    return white.convert("RGB")


def _open_array(a: np.ndarray, limits: ImageLimits) -> OpenedImage:
    name = describe_source(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageSourceError(f"image array {name} must be (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA",
                               name)
    h, w = a.shape[:2]
    if h == 0 or w == 0:
        raise ImageDecodeError(f"image array {name} is empty", name)
    if w * h > limits.max_pixels:
        raise ImageTooLargeError(f"image array {name} has {w * h} pixels, over the cap of {limits.max_pixels}", name)
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
            raise ImageSourceError(f"float image array {name} must hold finite values in [0, 1]", name)
        a = np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ImageSourceError(f"image array {name}: dtype {a.dtype} not supported (uint8, uint16, bool, float "
                               "in [0, 1])", name)
    if a.ndim == 3 and a.shape[2] == 3:
        rgb = np.ascontiguousarray(a)
    else:
        rgb = np.asarray(_to_rgb(Image.fromarray(np.ascontiguousarray(a), mode="L" if a.ndim == 2 else "RGBA")))
    return OpenedImage(name=name, width=w, height=h, format=None, mode="array", _array=np.ascontiguousarray(rgb))


__all__ = ["ImageLimits", "DEFAULT_LIMITS", "OpenedImage", "open_image", "load_image", "fetch_url",
           "private_address_kind", "check_local_file", "checked_http_url", "USER_AGENT"]

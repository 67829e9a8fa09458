"""What a server may read: local files only inside the allowed folder (real paths: no escape by '..' or
symlinks), and image URLs only from public addresses (every redirect hop, the address actually connected
to). Unit level; the only network traffic goes to a local HTTP server on 127.0.0.1, stopped at the end."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from pixtral_rt import images
from pixtral_rt.errors import ImageSourceError
from pixtral_rt.images import ImageLimits, fetch_url, load_image, private_address_kind
from tests.helpers import png_server

_b = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(_b, "PNG")
PNG = _b.getvalue()

STRICT = ImageLimits(allow_local_files=False, allow_private_urls=False, timeout=2.0)


# ------------------------------------------------------------------------------------------ addresses
@pytest.mark.parametrize("ip,kind", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fc00::1", "private"),
    ("169.254.169.254", "cloud-metadata"), ("fd00:ec2::254", "cloud-metadata"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"), ("fe80::1%eth0", "link-local"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"), ("100.64.0.1", "non-public"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"), ("2002:7f00:1::", "loopback"),
])
def test_non_public_addresses_are_named(ip, kind):
    assert private_address_kind(ip) == kind


@pytest.mark.parametrize("ip", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(ip):
    assert private_address_kind(ip) is None


# ------------------------------------------------------------------------------------------ local files
@pytest.fixture
def tree(tmp_path):
    """allowed/in.png, allowed/sub/deep.png, outside.png, allowed/link.png -> outside.png,
    allowed/dirlink -> the parent folder, allowed2/x.png (a sibling whose name starts like 'allowed')."""
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "in.png").write_bytes(PNG)
    (allowed / "sub" / "deep.png").write_bytes(PNG)
    (tmp_path / "outside.png").write_bytes(PNG)
    (allowed / "link.png").symlink_to(tmp_path / "outside.png")
    (allowed / "dirlink").symlink_to(tmp_path)
    (tmp_path / "allowed2").mkdir()
    (tmp_path / "allowed2" / "x.png").write_bytes(PNG)
    return tmp_path


def _rooted(root) -> ImageLimits:
    return ImageLimits(allow_local_files=True, local_files_root=str(root), allow_private_urls=False)


def test_files_inside_the_allowed_folder_load_as_paths_and_file_urls(tree):
    limits = _rooted(tree / "allowed")
    for src in (tree / "allowed" / "in.png", str(tree / "allowed" / "sub" / "deep.png"),
                f"file://{tree}/allowed/in.png", f"file://localhost{tree}/allowed/sub/deep.png",
                str(tree / "allowed" / "sub" / ".." / "in.png")):
        assert load_image(src, limits).shape == (9, 7, 3), src


@pytest.mark.parametrize("rel", ["outside.png", "allowed/../outside.png", "allowed/sub/../../outside.png",
                                 "allowed/link.png", "allowed/dirlink/outside.png", "allowed2/x.png"])
def test_escapes_from_the_allowed_folder_are_refused(tree, rel):
    limits = _rooted(tree / "allowed")
    for src in (f"{tree}/{rel}", f"file://{tree}/{rel}"):
        with pytest.raises(ImageSourceError, match="outside the folder") as e:
            load_image(src, limits)
        assert e.value.status == 400 and str(tree) not in str(e.value).split("is outside")[1]


def test_a_refused_path_does_not_reveal_whether_it_exists(tree):
    limits = _rooted(tree / "allowed")
    msgs = []
    for name in ("outside.png", "no-such-file.png"):
        with pytest.raises(ImageSourceError) as e:
            load_image(str(tree / name), limits)
        msgs.append(str(e.value).replace(name, "X"))
    assert msgs[0] == msgs[1]
    with pytest.raises(ImageSourceError, match="does not exist"):  # inside: a missing file is named as such
        load_image(str(tree / "allowed" / "missing.png"), limits)


def test_no_local_files_at_all_by_default_for_a_server(tree):
    for src in (str(tree / "allowed" / "in.png"), f"file://{tree}/allowed/in.png", "in.png"):
        with pytest.raises(ImageSourceError, match="local files are not allowed"):
            load_image(src, STRICT)
    with pytest.raises(ImageSourceError, match="names host"):
        load_image(f"file://otherhost{tree}/allowed/in.png", _rooted(tree / "allowed"))
    with pytest.raises(ImageSourceError, match="raw base64"):  # still the helpful message, no disk probe
        load_image("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk", STRICT)


def test_the_cli_default_still_reads_any_local_file(tree):
    assert load_image(str(tree / "outside.png")).shape == (9, 7, 3)


# ------------------------------------------------------------------------------------------ URLs
@pytest.fixture(scope="module")
def origin():
    """http://127.0.0.1:PORT serving /img.png, and /to?url=... redirecting (302) to url."""
    with png_server(PNG) as url:
        yield url


def test_loopback_url_refused_by_a_server_and_allowed_by_the_cli(origin):
    with pytest.raises(ImageSourceError, match=r"127\.0\.0\.1, a loopback address") as e:
        load_image(origin + "/img.png", STRICT)
    assert e.value.status == 400 and "/img.png" in str(e.value)
    assert load_image(origin + "/img.png", ImageLimits(timeout=2.0)).shape == (9, 7, 3)
    assert load_image(origin + "/img.png", ImageLimits(allow_private_urls=True, allow_local_files=False)).shape \
        == (9, 7, 3)


def test_a_name_that_resolves_to_loopback_is_refused(origin):
    port = origin.rsplit(":", 1)[1]
    with pytest.raises(ImageSourceError, match="localhost"):
        fetch_url(f"http://localhost:{port}/img.png", STRICT)


@pytest.fixture
def public_test_host(monkeypatch):
    """Pretend 'public.test' is a public host: it resolves to 127.0.0.1 (the origin server) and passes
    the address check; every other host gets the real check. The real resolver never sees 'public.test',
    so a fetch that succeeds connected to the address the check was given."""
    real_resolve, real_check = images._resolve, images._check_address
    monkeypatch.setattr(images, "_resolve",
                        lambda host, port: ["127.0.0.1"] if host == "public.test" else real_resolve(host, port))
    monkeypatch.setattr(images, "_check_address",
                        lambda host, ip: None if host == "public.test" else real_check(host, ip))


def test_redirect_from_a_public_host_to_a_private_address_is_refused(origin, public_test_host):
    port = origin.rsplit(":", 1)[1]
    assert fetch_url(f"http://public.test:{port}/img.png", STRICT) == PNG  # the first hop alone is fine
    with pytest.raises(ImageSourceError, match=r"127\.0\.0\.1, a loopback address"):
        fetch_url(f"http://public.test:{port}/to?url={origin}/img.png", STRICT)
    with pytest.raises(ImageSourceError, match="localhost"):
        fetch_url(f"http://public.test:{port}/to?url=http://localhost:{port}/img.png", STRICT)


def test_a_server_ignores_proxy_settings(origin, public_test_host, monkeypatch):
    # a proxy would resolve the host itself, beyond the address check: a server connects directly
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    port = origin.rsplit(":", 1)[1]
    assert fetch_url(f"http://public.test:{port}/img.png", STRICT) == PNG


def test_paths_are_resolved_with_realpath(tree):
    # the check compares real paths: a root given through a symlink works the same
    (tree / "rootlink").symlink_to(tree / "allowed")
    assert load_image(str(tree / "allowed" / "in.png"), _rooted(tree / "rootlink")).shape == (9, 7, 3)
    assert os.path.realpath(tree / "rootlink") == str((tree / "allowed").resolve())

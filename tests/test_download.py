"""Downloads of upstream weights over real HTTP (a local mirror): whole files land in the
cache; a refused or cut download leaves nothing behind, not even a partial file, and says
what went wrong."""

from __future__ import annotations

import os

import pytest

from models.convert import DownloadError, download

from .http_mirror import http_mirror

PAYLOAD = os.urandom(3 << 20)  # over one read of the downloader: several chunks


@pytest.fixture
def mirror(tmp_path):
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / "weights.pth").write_bytes(PAYLOAD)
    with http_mirror(folder) as url:
        yield url


def _left_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("prefix", ["", "/nolength"])
def test_a_whole_file_lands_in_the_cache(mirror, tmp_path, prefix):
    dest = tmp_path / "cache" / "weights.pth"
    assert download(f"{mirror}{prefix}/weights.pth", dest) == dest
    assert dest.read_bytes() == PAYLOAD
    assert _left_in(dest.parent) == ["weights.pth"]


def test_a_file_in_the_cache_is_not_fetched_again(mirror, tmp_path):
    dest = tmp_path / "cache" / "weights.pth"
    dest.parent.mkdir()
    dest.write_bytes(b"cached")
    assert download(f"{mirror}/no-such-file.pth", dest).read_bytes() == b"cached"


def test_a_cut_connection_fails_and_leaves_nothing(mirror, tmp_path):
    dest = tmp_path / "cache" / "weights.pth"
    with pytest.raises(DownloadError, match=r"after \d[\d.]* MB of 3\.1 MB") as error:
        download(f"{mirror}/cut/weights.pth", dest)
    assert f"{mirror}/cut/weights.pth" in str(error.value)
    assert _left_in(dest.parent) == []  # no partial file to be taken for the whole one later


def test_a_missing_file_names_the_url_and_leaves_nothing(mirror, tmp_path):
    dest = tmp_path / "cache" / "absent.pth"
    with pytest.raises(DownloadError, match=r"HTTP 404") as error:
        download(f"{mirror}/absent.pth", dest)
    assert f"{mirror}/absent.pth" in str(error.value)
    assert _left_in(dest.parent) == []


def test_a_mirror_that_is_not_there(tmp_path):
    from .ports import free_port

    url = f"http://127.0.0.1:{free_port()}/weights.pth"
    with pytest.raises(DownloadError, match="cannot reach") as error:
        download(url, tmp_path / "cache" / "weights.pth")
    assert url in str(error.value)


def test_the_cli_says_what_cut_the_download_in_one_line(mirror, tmp_path, monkeypatch, capsys):
    """`convnext-serve convert <release>` from a mirror that cuts the connection: exit 2, one
    line naming the URL, no traceback, and nothing in the cache."""
    from models.convert import OFFICIAL_RELEASES
    from service.cli import main as cli

    name = OFFICIAL_RELEASES["convnext_tiny_1k"].filename
    (tmp_path / "mirror" / name).write_bytes(PAYLOAD)
    monkeypatch.setenv("CONVNEXT_SERVE_WEIGHTS_URL", f"{mirror}/cut")
    monkeypatch.setenv("CONVNEXT_SERVE_CACHE", str(tmp_path / "cache"))
    assert cli(["convert", "convnext_tiny_1k", "--out", str(tmp_path / "t.safetensors")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("convnext-serve convert: error: "), err
    assert f"{mirror}/cut/{name}: the connection closed after 1.6 MB of 3.1 MB" in last
    assert "Traceback" not in err
    assert _left_in(tmp_path / "cache") == []

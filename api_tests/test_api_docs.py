"""/docs and /redoc work offline: every script, stylesheet and icon they load is served by the API itself."""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings

KINDS = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


class _Assets(HTMLParser):
    """URLs of the scripts and links of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        url = values.get("src") if tag == "script" else values.get("href") if tag == "link" else None
        if url:
            self.urls.append(url)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("docs"), broker_url="filesystem://"))
    with TestClient(app) as http:
        yield http


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_same_origin_assets(client, page):
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "http://" not in response.text and "https://" not in response.text and "//cdn" not in response.text
    parser = _Assets()
    parser.feed(response.text)
    scripts = [u for u in parser.urls if u.endswith(".js")]
    assert scripts, response.text
    for url in parser.urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and url.startswith("/"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        kind = KINDS[url[url.rindex(".") :]]
        assert kind in asset.headers["content-type"], (url, asset.headers["content-type"])
        assert len(asset.content) > 1000, url


def test_openapi_document_lists_enum_values(client):
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    assert components["JobState"]["enum"] == ["queued", "running", "succeeded", "failed", "cancelled"]
    assert components["Method"]["enum"] == ["none", "norm", "tent", "mpl"]
    form = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["adaptation"]["enum"] == ["none", "norm", "tent", "mpl"]
    assert "$ref" not in str(schema["paths"]["/v1/jobs"]["post"]["requestBody"])

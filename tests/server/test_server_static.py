"""Static serving stays inside its folders; Host and CORS guards; the frontend or its placeholder."""

from __future__ import annotations

import asyncio
import dataclasses
import os

import pytest
import pytest_asyncio

from headvis.server.app import create_app

from server_helpers import Api, endpoint

pytestmark = pytest.mark.asyncio

SECRET = "TOP SECRET"


async def _raw_get(client, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    """GET `path` byte for byte (no client-side normalization of `..` or `%2e`)."""
    reader, writer = await asyncio.open_connection(client.server.host, client.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("latin-1"))
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode("utf-8", "replace").partition("\r\n\r\n")
    return int(head.split()[1]), body


@pytest.fixture
def secret(tmp_path):
    """A file beside the data tree that no URL may reach."""
    path = tmp_path / "secret.txt"
    path.write_text(SECRET)
    return path


TRAVERSALS = [
    "/data/../secret.txt", "/data/%2e%2e/secret.txt", "/data/%2E%2E/secret.txt", "/data/..%2fsecret.txt",
    "/data/%2e%2e%2fsecret.txt", "/data/heads/../../secret.txt", "/data/heads/%2e%2e/%2e%2e/secret.txt",
    "/data/..%5csecret.txt", "/data/%5c..%5csecret.txt", "/data//../secret.txt", "/data/.%2e/secret.txt",
    "/../secret.txt", "/%2e%2e/secret.txt", "/data/%00/../secret.txt", "/data/" + "%2e%2e/" * 8 + "etc/passwd",
    f"/data/{'../' * 8}etc/passwd",
]


@pytest.mark.parametrize("path", TRAVERSALS)
async def test_traversal_never_leaves_the_data_tree(client, secret, path):
    status, body = await _raw_get(client, path)
    assert status in (400, 404), (path, status)
    assert SECRET not in body and "root:" not in body


async def test_data_files_are_served_and_folders_are_not_listed(client, data):
    response = await client.get("/data/config.json")
    assert response.status == 200 and response.content_type == "application/json"
    assert (await response.json())["layers"] == [1, 3]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/data/", "/data/heads/", "/data/umap"):
        assert (await client.get(path)).status == 404


async def test_symlinks_out_of_the_tree_are_not_followed(client, data, secret):
    os.symlink(secret, data / "link.txt")
    os.symlink(secret.parent, data / "outside")
    os.symlink(data / "config.json", data / "alias.json")  # inside the tree: fine
    assert (await client.get("/data/link.txt")).status == 404
    status, body = await _raw_get(client, "/data/outside/secret.txt")
    assert status == 404 and SECRET not in body
    assert (await client.get("/data/alias.json")).status == 200


async def test_dotfiles_are_hidden(client, data):
    (data / ".hidden.json").write_text("{}")
    (data / "heads" / ".L1H0.json.x1.tmp").write_text("{}")
    assert (await client.get("/data/.hidden.json")).status == 404
    assert (await client.get("/data/heads/.L1H0.json.x1.tmp")).status == 404


async def test_without_a_built_frontend_root_is_a_placeholder_page(client):
    response = await client.get("/")
    text = await response.text()
    assert response.status == 200 and response.content_type == "text/html"
    assert "not built" in text and 'href="/data/config.json"' in text and 'href="/api/openapi.json"' in text
    assert "scripts/setup.sh" in text and "npm ci" in text  # how to build it
    assert (await client.get("/index.html")).status == 404


async def test_a_built_frontend_is_served_at_root_and_stays_in_its_folder(aiohttp_client, config, lm, tmp_path, secret):
    front = tmp_path / "front"
    (front / "assets").mkdir(parents=True)
    (front / "index.html").write_text("<!doctype html><title>headvis</title>")
    (front / "assets" / "app.js").write_text("console.log(1)")
    client = await aiohttp_client(create_app(dataclasses.replace(config, frontend=front), lm))
    response = await client.get("/")
    assert response.status == 200 and "<title>headvis</title>" in await response.text()
    response = await client.get("/assets/app.js")
    assert response.status == 200 and "javascript" in response.content_type
    for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/assets/../../secret.txt", "/..%2fdata/config.json"):
        status, body = await _raw_get(client, path)
        assert status in (400, 404) and SECRET not in body, path


@pytest.mark.parametrize("host, status", [("evil.example", 403), ("evil.example:8765", 403), ("127.0.0.2", 403),
                                          ("localhost:8765", 200), ("LOCALHOST", 200), ("[::1]:8765", 200),
                                          ("127.0.0.1", 200)])
async def test_only_loopback_host_names_are_answered(client, host, status):
    got, body = await _raw_get(client, "/data/config.json", host=host)
    assert got == status, host
    if status == 403:
        assert "Host header" in body


async def test_cors_is_off_by_default(api):
    response = await api.client.post(endpoint("add_custom_sequence"), headers={"Origin": "http://evil.example"},
                                     json={"context": api.context, "layer": 1, "head": 0, "text": "hi there"})
    assert response.status == 200
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Credentials" not in response.headers
    preflight = await api.client.options(endpoint("add_custom_sequence"), headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status >= 400 and "Access-Control-Allow-Origin" not in preflight.headers


ORIGIN = "http://localhost:5173"


@pytest_asyncio.fixture
async def cors_api(aiohttp_client, config, lm, data) -> Api:
    return Api(await aiohttp_client(create_app(dataclasses.replace(config, allow_origin=ORIGIN), lm)), data)


async def test_allow_origin_answers_a_credentialed_preflight(cors_api):
    """What a browser sends before the reference frontend's fetch(..., {credentials: 'include'}) POST."""
    preflight = await cors_api.client.options(endpoint("project_to_umap"), headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN  # never "*": credentials forbid it
    assert preflight.headers["Access-Control-Allow-Credentials"] == "true"
    assert [m.strip() for m in preflight.headers["Access-Control-Allow-Methods"].split(",")] == ["GET", "HEAD", "POST"]
    assert preflight.headers["Access-Control-Allow-Headers"].lower() == "content-type"
    assert int(preflight.headers["Access-Control-Max-Age"]) > 0
    assert preflight.headers["Vary"] == "Origin"


async def test_allow_origin_lets_that_origin_read_credentialed_replies_and_errors(cors_api, data):
    client = cors_api.client
    response = await client.post(endpoint("add_custom_sequence"), headers={"Origin": ORIGIN, "Cookie": "a=b"},
                                 json={"context": cors_api.context, "layer": 1, "head": 0, "text": "hi there"})
    assert response.status == 200 and (await response.json())["sequence_id"].startswith("c")
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    error = await client.post("/api/nope", json={}, headers={"Origin": ORIGIN})
    assert error.status == 404 and error.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert set(await error.json()) == {"detail"}
    static = await client.get("/data/config.json", headers={"Origin": ORIGIN})
    assert static.headers["Access-Control-Allow-Origin"] == ORIGIN


async def test_allow_origin_opens_cors_to_that_origin_only(cors_api):
    client = cors_api.client
    for origin in ("http://evil.example", "http://localhost:5174", "null"):
        other = await client.get("/data/config.json", headers={"Origin": origin})
        assert "Access-Control-Allow-Origin" not in other.headers and other.headers["Vary"] == "Origin"
        preflight = await client.options(endpoint("add_custom_sequence"), headers={
            "Origin": origin, "Access-Control-Request-Method": "POST"})
        assert preflight.status >= 400 and "Access-Control-Allow-Credentials" not in preflight.headers

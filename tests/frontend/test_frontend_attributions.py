"""The attribution view and its links in a real browser: live through the server with dictionaries, then from the
cached file (no POST), statically with the file copied, statically without it, and the server's refusals.

What is drawn is compared with the file the server wrote: the pairs in order
with their descriptions, the terms adding up to the total shown, a pair's and
a marginal feature's snippets token by token, the OV target, and the
manifest's marks in the sequences tab. Screenshots go to /tmp/attr-*.png.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path

import pytest

from frontend_helpers import Site, missing

try:
    import playwright.sync_api as playwright_api
except ImportError:
    missing("Playwright is not installed: pip install -e '.[dev]'", module=True)
expect = playwright_api.expect

MODEL_TIMEOUT_MS = 90_000  # a request that runs the model on a busy 2-core machine
SCREENSHOTS = Path("/tmp")


def read(path: Path):
    return json.loads(path.read_text())


def shown_edge(data: Path, layer: int = 1, head: int = 0) -> tuple[int, int, int]:
    """(sequence_id, q, k): the strongest pair of the first sequence of the head's top interval."""
    seq = next(s for s in read(data / "heads" / f"L{layer}H{head}.json")["sequences"] if s["interval"] == 10)
    q, k = seq["argmax"]
    return seq["sequence_id"], q, k


def attribution_file(data: Path, kind: str, layer: int, head: int, seq, q: int, k: int) -> Path:
    return data / "attributions" / kind / f"L{layer}H{head}S{seq}Q{q}K{k}.json"


def link(layer: int, head: int, kind: str, seq, q: int, k: int) -> str:
    return f"?layer={layer}&head={head}&attr={kind}&seq={seq}&qpos={q}&kpos={k}"


def four_digits(value: float) -> str:
    """formatValue of the page (d3 '.4~g', with d3's minus sign) for values of ordinary size."""
    return f"{value:.4g}".replace("-", "\u2212")


def token_text(token: str) -> str:
    """tokens.ts tokenText without line breaks."""
    if token == "":
        return "∅"
    if token.strip(" ") == "":
        return "·" * len(token)
    named = {"\n": "↵", "\t": "⇥", "\r": "␍"}
    return "".join(named.get(c, f"\\x{ord(c):02x}") if ord(c) < 32 or ord(c) == 127 else c for c in token)


def requests_of(page) -> list[tuple[str, str]]:
    """(method, url) of every request the page makes from now on."""
    log: list[tuple[str, str]] = []
    page.on("request", lambda r: log.append((r.method, r.url)))
    return log


def open_page(page, site: Site, query: str, mode: str) -> None:
    page.goto(site.url + query)
    expect(page.locator(f".mode[data-mode={mode}]")).to_be_visible()


def post(site: Site, name: str, **fields) -> dict:
    """An endpoint called as the frontend calls it (the context of server_config.json)."""
    body = {"context": read(site.data / "server_config.json")["context"], **fields}
    request = urllib.request.Request(f"{site.url}api/head_vis/public/{name}/v0", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=MODEL_TIMEOUT_MS / 1000) as response:
        return json.loads(response.read())


def check_snippets(panel, snippets: list[dict]) -> None:
    """The panel's snippets are the feature's: same count, tokens, activations, interval, strongest token."""
    rows = panel.locator("li.snippet")
    expect(rows).to_have_count(len(snippets))
    for i, snippet in enumerate(snippets):
        row = rows.nth(i)
        assert row.get_attribute("data-interval") == str(snippet["interval"])
        expect(row.locator(".meta")).to_contain_text(f"interval {snippet['interval']}")
        tokens = row.locator("span.token")
        assert tokens.all_text_contents() == [token_text(t) for t in snippet["tokens"]]
        shaded = [float(a) for a in tokens.evaluate_all("els => els.map(e => e.dataset.activation)")]
        assert shaded == pytest.approx(snippet["activations"], abs=1e-9)
        acts = snippet["activations"]
        if max(acts) > 0:
            expect(row.locator("span.token.peak")).to_have_count(1)
            assert tokens.evaluate_all("els => els.findIndex(e => e.classList.contains('peak'))") == acts.index(max(acts))


def check_report(page, file: dict) -> None:
    """Pairs in order with their descriptions, the terms adding up to the total, the summary."""
    rows = page.locator("table.pairs tbody tr")
    expect(rows).to_have_count(len(file["pairs"]))
    ranked = sorted(file["pairs"], key=lambda p: -abs(p["attribution"]))
    assert [p["attribution"] for p in ranked] == [p["attribution"] for p in file["pairs"]], \
        "the server writes the pairs largest |attribution| first"
    drawn = [float(a) for a in rows.evaluate_all("els => els.map(e => e.dataset.attribution)")]
    assert drawn == [p["attribution"] for p in ranked]
    for side in ("query", "key"):
        texts = page.locator(f"table.pairs td[data-side={side}] .desc").all_text_contents()
        assert texts == [p[f"{side}_description"] for p in ranked], side

    total = page.locator("[data-summary=total]")
    assert float(total.get_attribute("data-value")) == file["total"]
    total_text = total.locator("b").text_content()
    assert float(total_text.replace("\u2212", "-")) == pytest.approx(file["total"], rel=5e-4), total_text
    expect(page.locator("[data-summary=score]")).to_have_text(four_digits(file["score"]))
    terms = {name: float(v) for name, v in page.locator("tr[data-term]").evaluate_all(
        "els => els.map(e => [e.dataset.term, e.dataset.value])")}
    assert terms == {name: v for name, v in file["terms"].items() if v != 0}
    zeros = sum(v == 0 for v in file["terms"].values())
    expect(page.locator("tr[data-zero-terms]")).to_have_count(1 if zeros else 0)
    shown_sum = float(page.locator("[data-terms-sum]").get_attribute("data-terms-sum"))
    assert shown_sum == pytest.approx(sum(terms.values()), abs=1e-9)
    # the terms add up to the total (6-digit rounding of the file), and the sum row says so
    assert shown_sum == pytest.approx(file["total"], rel=1e-4, abs=1e-5)
    expect(page.locator("[data-terms-sum] b")).to_have_text(total_text)  # the sum row reads as the total
    dictionary = file["dictionary"]
    expect(page.locator("[data-summary=dictionary]")).to_contain_text(
        f"{dictionary['name']} at {dictionary['hook']}, {dictionary['d_sae']} features")


def test_a_qk_link_is_computed_by_the_server_then_read_from_its_file(page, live_attr):
    seq, q, k = shown_edge(live_attr.data)
    path = attribution_file(live_attr.data, "qk", 1, 0, seq, q, k)
    assert not path.exists()
    log = requests_of(page)
    with page.expect_response(re.compile(r"/api/head_vis/public/qk_attributions/v0$"), timeout=MODEL_TIMEOUT_MS) as reply:
        open_page(page, live_attr, link(1, 0, "qk", seq, q, k), mode="server")
    assert reply.value.ok, reply.value.text()
    body = reply.value.request.post_data_json
    assert {key: body[key] for key in ("layer", "head", "seq_idx", "query_pos", "key_pos")} == \
        {"layer": 1, "head": 0, "seq_idx": seq, "query_pos": q, "key_pos": k}
    expect(page.locator("[data-source=server]")).to_contain_text(f"data/attributions/qk/L1H0S{seq}Q{q}K{k}.json")
    file = read(path)
    assert read(live_attr.data / "attributions" / "manifest.json") == {f"L1H0S{seq}": {"qk": [[q, k]], "ov": []}}
    assert [m for m, u in log if "/data/attributions/qk/" in u] == [], "a file the manifest did not list was fetched"
    check_report(page, file)

    # the edge in its sequence: the query and key tokens marked
    tokens = read(live_attr.data / "heads" / "L1H0.json")["sequences"]
    record = next(s for s in tokens if s["sequence_id"] == seq)
    expect(page.locator(".edge-tokens span.token")).to_have_count(record["seq_len"])
    expect(page.locator(".edge-tokens span.token.query")).to_have_attribute("data-pos", str(q))
    expect(page.locator(".edge-tokens span.token.key")).to_have_attribute("data-pos", str(k))

    # the strongest pair is shown first; a click on another shows its two features' snippets
    ranked = file["pairs"]
    panel = page.locator("aside.detail-panel")
    expect(panel.locator("[data-side=query] [data-feature]")).to_have_text(f"#{ranked[0]['query_feature']}")
    pick = next(i for i, p in enumerate(ranked) if i > 0 and p["query_snippets"] and p["key_snippets"])
    page.locator(f"table.pairs tr[data-pair='{pick}']").click()
    expect(page.locator(f"table.pairs tr[data-pair='{pick}']")).to_have_class(re.compile(r"\bselected\b"))
    expect(panel.locator("[data-score]")).to_have_text(four_digits(ranked[pick]["attribution"]))
    for side in ("query", "key"):
        part = panel.locator(f"section[data-side={side}]")
        expect(part.locator("[data-feature]")).to_have_text(f"#{ranked[pick][f'{side}_feature']}")
        expect(part.locator("[data-description]")).to_have_text(ranked[pick][f"{side}_description"])
        expect(part.locator("[data-feature-activation]")).to_have_text(four_digits(ranked[pick][f"{side}_activation"]))
        check_snippets(part, ranked[pick][f"{side}_snippets"])
    page.screenshot(path=str(SCREENSHOTS / "attr-qk-live.png"), full_page=True)

    # a key marginal: its snippets alone, then one of its interactions as the pair they make
    marginal = file["key_marginals"][0]
    page.locator("[data-marginals=key] button[data-marginal='0']").click()
    expect(panel.locator("[data-detail]")).to_have_attribute("data-detail", "marginal score")
    expect(panel.locator("section[data-side]")).to_have_count(1)
    check_snippets(panel.locator("section[data-side=key]"), marginal["snippets"])
    expect(panel.locator("button[data-interaction]")).to_have_count(len(marginal["top_interactions"]))
    partner = marginal["top_interactions"][0]
    panel.locator("button[data-interaction='0']").click()
    expect(panel.locator("[data-detail]")).to_have_attribute("data-detail", "pairwise score")
    expect(panel.locator("[data-score]")).to_have_text(four_digits(partner["pairwise_score"]))
    expect(panel.locator("section[data-side=query] [data-description]")).to_have_text(partner["description"])
    check_snippets(panel.locator("section[data-side=query]"), partner["snippets"])

    # reload: the manifest lists the edge, so the file is read and nothing is posted
    log.clear()
    page.reload()
    expect(page.locator("[data-source=file]")).to_contain_text(f"Read from data/attributions/qk/L1H0S{seq}Q{q}K{k}.json")
    check_report(page, file)
    assert [u for m, u in log if m == "POST"] == [], f"the cached attribution was posted for: {log}"
    assert any(u.endswith("/data/attributions/manifest.json") for m, u in log if m == "GET")
    assert any(u.endswith(f"/data/attributions/qk/L1H0S{seq}Q{q}K{k}.json") for m, u in log if m == "GET")
    page.screenshot(path=str(SCREENSHOTS / "attr-qk-cached.png"))


def test_the_sequences_tab_links_a_cell_to_both_attributions_and_marks_cached_ones(page, live_attr):
    seq, q, k = shown_edge(live_attr.data)
    open_page(page, live_attr, "?layer=1&head=0&tab=sequences&interval=10", mode="server")
    article = page.locator(f"article.sequence[data-seq='{seq}']")
    expect(article.locator("[data-cached-count]")).to_have_count(0)
    expect(article.locator("span.token.cached")).to_have_count(0)
    article.locator(f"span.token[data-pos='{q}']").click()
    article.locator(f"span.token[data-pos='{k}']").click()
    for kind in ("qk", "ov"):  # a server is up: both offered, neither cached
        expect(article.locator(f"[data-attribution={kind}]")).to_have_attribute("data-cached", "false")
    with page.expect_response(re.compile(r"/api/head_vis/public/ov_attributions/v0$"), timeout=MODEL_TIMEOUT_MS) as reply:
        article.locator("[data-attribution=ov]").click()
    assert reply.value.ok, reply.value.text()
    expect(page).to_have_url(re.compile(re.escape(link(1, 0, "ov", seq, q, k)) + "$"))
    file = read(attribution_file(live_attr.data, "ov", 1, 0, seq, q, k))
    assert file["target"]["kind"] == "dictionary" and file["target"]["name"] == "L1out"
    check_report(page, file)
    expect(page.locator("[data-summary=target]")).to_contain_text(
        f"the pre-activations of {len(file['target']['features'])} features of L1out at blocks.1.hook_resid_post")
    expect(page.locator("[data-note]")).to_have_text(file["note"])  # L1out has no feature library
    expect(page.locator("table.pairs thead")).to_contain_text("source feature")
    expect(page.locator("table.pairs thead")).to_contain_text("target feature")
    page.screenshot(path=str(SCREENSHOTS / "attr-ov-live.png"))

    page.go_back()  # the manifest now has the edge: the badge, the marks and the link say so, without a reload
    article = page.locator(f"article.sequence[data-seq='{seq}']")
    expect(article.locator("[data-cached-count]")).to_have_text("cached: 0 QK, 1 OV")
    # the URL kept the pinned row and the cell: back shows them again, the link now cached
    expect(article.locator(f".cell-info[data-cell='{q},{k}'] [data-attribution=ov]")).to_have_attribute("data-cached", "true")
    article.locator(".tokens").focus()
    page.keyboard.press("Escape")  # unpinned: at rest the queries with a cached edge are marked
    expect(article.locator("span.token.cached")).to_have_attribute("data-pos", str(q))
    article.locator(f"span.token[data-pos='{q}']").click()
    expect(article.locator("span.token.cached")).to_have_attribute("data-pos", str(k))  # the pinned row's cached key
    article.locator(f"span.token[data-pos='{k}']").click()
    expect(article.locator("[data-attribution=ov]")).to_have_attribute("data-cached", "true")
    expect(article.locator("[data-attribution=qk]")).to_have_attribute("data-cached", "false")


def test_a_layer_without_a_dictionary_shows_the_servers_detail(page, live_attr):
    seq, q, k = shown_edge(live_attr.data, 3, 4)
    with page.expect_response(re.compile(r"/api/head_vis/public/qk_attributions/v0$"), timeout=MODEL_TIMEOUT_MS) as reply:
        open_page(page, live_attr, link(3, 4, "qk", seq, q, k), mode="server")
    assert reply.value.status == 404
    detail = reply.value.json()["detail"]
    assert "layer 3" in detail and "python -m headvis.train_dictionary --layer 3" in detail
    expect(page.locator("[role=alert]")).to_have_text(re.compile(re.escape(f"qk_attributions: {detail}")))
    assert read(live_attr.data / "attributions" / "manifest.json") == {}  # nothing written
    page.screenshot(path=str(SCREENSHOTS / "attr-error.png"))


def test_a_cached_file_copied_to_a_static_site_is_shown_with_no_server(page, live_attr, static_site):
    seq, q, k = shown_edge(live_attr.data)
    file = post(live_attr, "qk_attributions", layer=1, head=0, seq_idx=seq, query_pos=q, key_pos=k)
    shutil.copytree(live_attr.data / "attributions", static_site.data / "attributions", dirs_exist_ok=True)
    log = requests_of(page)
    open_page(page, static_site, link(1, 0, "qk", seq, q, k), mode="static")
    expect(page.locator("[data-source=file]")).to_be_visible()
    check_report(page, file)
    assert not [u for _, u in log if "/api/" in u]
    page.locator("table.pairs tr[data-pair='1']").click()
    check_snippets(page.locator("aside.detail-panel section[data-side=key]"), file["pairs"][1]["key_snippets"])

    # its OV has no file: without a server the page says how to get one
    open_page(page, static_site, link(1, 0, "ov", seq, q, k), mode="static")
    expect(page.locator("[role=alert]")).to_contain_text(
        f"data/attributions/ov/L1H0S{seq}Q{q}K{k}.json does not exist, and attributions are computed by the server: "
        "start python -m headvis.serve --data DIR --dictionary DICT")
    page.screenshot(path=str(SCREENSHOTS / "attr-static-missing.png"))
    assert not [u for _, u in log if f"/attributions/ov/" in u], "a file the manifest does not list was fetched"

    # the sequences tab offers the cached QK only
    open_page(page, static_site, "?layer=1&head=0&tab=sequences&interval=10", mode="static")
    article = page.locator(f"article.sequence[data-seq='{seq}']")
    expect(article.locator("[data-cached-count]")).to_have_text("cached: 1 QK, 0 OV")
    article.locator(f"span.token[data-pos='{q}']").click()
    article.locator(f"span.token[data-pos='{k}']").click()
    expect(article.locator("[data-attribution=qk]")).to_have_attribute("data-cached", "true")
    expect(article.locator("[data-attribution=ov]")).to_have_count(0)
    other = next(p for p in range(1, q) if p != k)  # a cell without a file: no link at all
    article.locator(f"span.token[data-pos='{other}']").click()
    expect(article.locator("[data-attribution]")).to_have_count(0)

    # a manifest that lists a file the tree lacks: said so, not a silent blank
    attribution_file(static_site.data, "qk", 1, 0, seq, q, k).unlink()
    open_page(page, static_site, link(1, 0, "qk", seq, q, k), mode="static")
    expect(page.locator("[role=alert]")).to_contain_text(
        f"data/attributions/manifest.json lists this edge, but data/attributions/qk/L1H0S{seq}Q{q}K{k}.json does not exist")


def test_a_damaged_manifest_is_reported_in_static_mode(page, static_site):
    (static_site.data / "attributions").mkdir(exist_ok=True)
    (static_site.data / "attributions" / "manifest.json").write_text('{"L1H0S0": {"qk": [[1, 0]]}}')
    open_page(page, static_site, link(1, 0, "qk", 0, 1, 0), mode="static")
    expect(page.locator("[role=alert]")).to_contain_text(
        'data/attributions/manifest.json is damaged: "L1H0S0".ov is not a list of [query_pos, key_pos]')
    open_page(page, static_site, "?layer=1&head=0&tab=sequences&interval=10", mode="static")
    expect(page.locator("article.sequence").first).to_be_visible()  # the tab still works, unmarked

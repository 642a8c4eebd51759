"""The built frontend in a real browser, static-only and against the real server (conftest.py has the setup).

Each test loads a page of a tiny real scan and compares what is drawn with the
data files: one point per head placed by its metrics, the tokens and the
attention shading of the head files, the projection's points, the histogram,
the URL state and history, and the server round trips (custom prompts,
projected prompts, saved clusters, the attribution error).
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from frontend_helpers import HEADS, LAYERS, Site, missing

try:
    import playwright.sync_api as playwright_api
except ImportError:
    missing("Playwright is not installed: pip install -e '.[dev]'", module=True)
expect = playwright_api.expect

MODEL_TIMEOUT_MS = 90_000  # a request that runs the model on a busy 2-core machine


def read(path: Path):
    return json.loads(path.read_text())


def coo_rows(seq: dict) -> dict[int, dict[int, float]]:
    """{q: {k: p[q, k]}} of a sequence's stored attention."""
    rows: dict[int, dict[int, float]] = {}
    for idx, value in zip(seq["attention_indices"], seq["attention_values"]):
        q, k = divmod(idx, seq["seq_len"])
        rows.setdefault(q, {})[k] = value
    return rows


def key_maxima(seq: dict) -> list[float]:
    """max over q >= 1 of p[q, k], column 0 left at 0 (as max_activation skips it)."""
    maxima = [0.0] * seq["seq_len"]
    for q, row in coo_rows(seq).items():
        for k, value in row.items():
            if q >= 1 and k >= 1:
                maxima[k] = max(maxima[k], value)
    return maxima


def token_weights(article) -> list[float]:
    return [float(w) for w in article.locator("span.token").evaluate_all("els => els.map(e => e.dataset.weight)")]


def assert_linear(pixels: list[float], values: list[float], what: str) -> None:
    """Pixels are one linear (increasing or decreasing) function of the values: a d3 linear scale placed them."""
    lo, hi = min(range(len(values)), key=values.__getitem__), max(range(len(values)), key=values.__getitem__)
    assert values[hi] > values[lo], f"{what}: all values equal"
    slope = (pixels[hi] - pixels[lo]) / (values[hi] - values[lo])
    assert slope != 0, f"{what}: every point at the same place"
    for pixel, value in zip(pixels, values):
        assert abs(pixel - (pixels[lo] + slope * (value - values[lo]))) < 0.05, f"{what}: {pixel} is off the scale"


def circle_positions(page, selector: str) -> list[tuple[float, float]]:
    return [tuple(p) for p in page.locator(selector).evaluate_all(
        "els => els.map(e => [Number(e.getAttribute('cx')), Number(e.getAttribute('cy'))])")]


def open_page(page, site: Site, query: str = "", mode: str = "static") -> None:
    """Load the page and wait until it knows whether a server is up."""
    page.goto(site.url + query)
    expect(page.locator(f".mode[data-mode={mode}]")).to_be_visible()


# -- overview

def test_overview_draws_one_point_per_head_placed_by_the_chosen_metrics(page, static_site):
    scatter = read(static_site.data / "scatter_data.json")
    open_page(page, static_site)
    points = page.locator("circle.point")
    expect(points).to_have_count(len(LAYERS) * len(HEADS))
    order = [(int(l), int(h)) for l, h in points.evaluate_all("els => els.map(e => [e.dataset.layer, e.dataset.head])")]
    metrics = {(row["layer"], row["head"]): row["metrics"] for row in scatter["heads"]}
    assert sorted(order) == sorted(metrics)

    def check(x: str, y: str) -> list[tuple[float, float]]:
        positions = circle_positions(page, "circle.point")
        assert_linear([p[0] for p in positions], [metrics[head][x] for head in order], f"x = {x}")
        assert_linear([p[1] for p in positions], [metrics[head][y] for head in order], f"y = {y}")
        return positions

    before = check("entropy", "prev_token")  # the defaults
    page.select_option("select[data-axis=x]", "bos")
    expect(page).to_have_url(re.compile(r"\?x=bos$"))
    after = check("bos", "prev_token")
    assert [p[0] for p in after] != [p[0] for p in before] and [p[1] for p in after] == [p[1] for p in before]

    cells = page.locator("a.cell")
    expect(cells).to_have_count(len(order))
    page.select_option("select[data-axis=grid]", "self")
    expect(page).to_have_url(re.compile(r"grid=self"))
    expect(page.locator("a.cell[data-layer='3'][data-head='4']")).to_have_attribute("title", re.compile(r"^L3 H4 · Self: "))


def test_clicking_a_point_opens_its_head_and_history_restores_each_view(page, static_site):
    open_page(page, static_site, "?x=bos")
    page.click("circle.point[data-layer='3'][data-head='4']")
    expect(page).to_have_url(re.compile(r"\?layer=3&head=4&tab=sequences&interval=10$"))
    expect(page.locator("h1")).to_have_text("Layer 3 · Head 4")
    expect(page.locator("[data-nav=next]")).to_have_count(0)  # the last scanned head
    page.click("[data-tab=metrics]")
    expect(page).to_have_url(re.compile(r"tab=metrics"))
    expect(page.locator("rect.bar").first).to_be_visible()
    page.click("[data-nav=prev]")
    expect(page.locator("h1")).to_have_text("Layer 3 · Head 1")
    expect(page.locator("[data-tab=metrics]")).to_have_attribute("aria-current", "page")

    page.go_back()
    expect(page.locator("h1")).to_have_text("Layer 3 · Head 4")
    page.go_back()
    expect(page.locator("[data-tab=sequences]")).to_have_attribute("aria-current", "page")
    page.go_back()
    expect(page.locator("circle.point")).to_have_count(len(LAYERS) * len(HEADS))
    expect(page.locator("select[data-axis=x]")).to_have_value("bos")
    page.go_forward()
    expect(page.locator("h1")).to_have_text("Layer 3 · Head 4")
    expect(page).to_have_url(re.compile(r"\?layer=3&head=4&tab=sequences&interval=10$"))


# -- sequences

def test_a_deep_link_shows_the_intervals_sequences_with_their_tokens_and_key_shading(page, static_site):
    head = read(static_site.data / "heads" / "L3H4.json")
    shown = [s for s in head["sequences"] if s["interval"] == 10]
    assert shown, "the fixture scan keeps sequences in interval 10"
    open_page(page, static_site, "?layer=3&head=4&tab=sequences&interval=10")
    articles = page.locator("article.sequence")
    expect(articles).to_have_count(len(shown))
    for i, seq in enumerate(shown):
        article = articles.nth(i)
        assert article.get_attribute("data-seq") == str(seq["id"])
        spans = article.locator("span.token")
        expect(spans).to_have_count(seq["seq_len"])
        texts = spans.all_text_contents()
        plain = [p for p, t in enumerate(seq["tokens"]) if t.strip() == t and t.isprintable() and t]
        assert plain and all(texts[p] == seq["tokens"][p] for p in plain)
        assert token_weights(article) == pytest.approx(key_maxima(seq), abs=1e-12)
        expect(article.locator("[data-max-activation]")).to_have_text(f"{seq['max_activation']:.4g}")


def test_hovering_a_token_shades_its_row_and_a_click_pins_it(page, static_site):
    head = read(static_site.data / "heads" / "L3H4.json")
    seq = next(s for s in head["sequences"] if s["interval"] == 10)
    q, k = seq["argmax"]
    stored = coo_rows(seq)[q]
    row = [stored.get(key, 0.0) for key in range(seq["seq_len"])]
    open_page(page, static_site, "?layer=3&head=4&tab=sequences&interval=10")
    article = page.locator("article.sequence").first
    default = token_weights(article)

    article.locator(f"span.token[data-pos='{q}']").hover()
    expect(article.locator(".status")).to_contain_text(f"Row of query {q} ")
    assert token_weights(article) == pytest.approx(row, abs=1e-12)
    expect(article.locator("span.token.query")).to_have_attribute("data-pos", str(q))
    expect(article.locator("span.token.top-key")).to_have_attribute("data-pos", str(max(range(len(row)), key=row.__getitem__)))

    article.locator(f"span.token[data-pos='{q}']").click()
    other = 0 if q != 0 else 1
    article.locator(f"span.token[data-pos='{other}']").hover()
    assert token_weights(article) == pytest.approx(row, abs=1e-12), "a pinned row stays while the pointer moves"
    article.locator(f"span.token[data-pos='{k}']").click()
    expect(article.locator(f"[data-cell='{q},{k}']")).to_contain_text(f"p[{q}, {k}] = {seq['max_activation']:.4g}")
    page.keyboard.press("Escape")
    page.mouse.move(0, 0)
    expect(article.locator(".status")).to_contain_text("Shade: the most attention")
    assert token_weights(article) == default


def test_the_interval_selector_shows_counts_and_switches_interval(page, static_site):
    head = read(static_site.data / "heads" / "L1H0.json")
    open_page(page, static_site, "?layer=1&head=0&tab=sequences&interval=10")
    links = page.locator("nav.intervals a")
    expect(links).to_have_count(len(head["interval_counts"]))  # static, no custom file: no "custom"
    expect(page.locator("a[data-interval='4']")).to_contain_text(re.compile(rf"\b{head['interval_counts'][3]} seqs?$"))
    page.click("a[data-interval='4']")
    expect(page).to_have_url(re.compile(r"interval=4$"))
    expect(page.locator("a[data-interval='4']")).to_have_attribute("aria-current", "true")
    ids = [str(s["id"]) for s in head["sequences"] if s["interval"] == 4]
    expect(page.locator("article.sequence")).to_have_count(len(ids))
    assert page.locator("article.sequence").evaluate_all("els => els.map(e => e.dataset.seq)") == ids


# -- projection and metrics

def test_the_projection_draws_every_point_and_a_vector_switch_moves_them(page, static_site):
    projection = read(static_site.data / "umap" / "L1H0.json")
    sequences = {s["id"]: s["tokens"] for s in read(static_site.data / "umap" / "sequences.json")["sequences"]}
    n = len(projection["points"]["seq"])
    open_page(page, static_site, "?layer=1&head=0&tab=projection")
    expect(page.locator("circle.point")).to_have_count(n)

    def check(vector: str) -> list[tuple[float, float]]:
        positions = circle_positions(page, "circle.point")
        coords = projection["pca"][vector]["coords"]
        assert_linear([p[0] for p in positions], [c[0] for c in coords], f"{vector} x")
        assert_linear([p[1] for p in positions], [c[1] for c in coords], f"{vector} y")
        ratio = projection["pca"][vector]["explained_variance_ratio"][0]
        expect(page.locator("figure.chart svg")).to_contain_text(f"PC1 ({100 * ratio:.1f}% of variance)")
        return positions

    q_positions = check("q")
    page.check("input[name=vector][value=k]")
    expect(page).to_have_url(re.compile(r"tab=projection&vector=k$"))
    assert check("k") != q_positions

    # hovering a point shows its token in context
    box = page.locator("figure.chart svg").bounding_box()
    x, y = page.locator("circle.point[data-index='0']").evaluate(
        "e => { const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }")
    assert box is not None
    page.mouse.move(x, y)
    tip = page.locator("[role=tooltip]")
    seq, pos = projection["points"]["seq"][0], projection["points"]["pos"][0]
    expect(tip).to_contain_text(f"sequence {seq} · position {pos}")
    token = sequences[seq][pos]
    if token.strip() == token and token.isprintable():
        expect(tip.locator("b")).to_have_text(token)


def test_the_umap_view_is_offered_only_when_the_head_has_one(page, static_site):
    # L1H0 gets views.umap (mirrored PCA coordinates stand in for a fitted UMAP), L1H1 keeps PCA alone.
    # Written before the first load: a static host's files may come from the browser's cache afterwards.
    path = static_site.data / "umap" / "L1H0.json"
    projection = read(path)
    umap = {v: [[-x, 2 * y] for x, y in projection["pca"][v]["coords"]] for v in ("q", "k", "v", "o")}
    path.write_text(json.dumps({**projection, "views": {"umap": umap}}))

    open_page(page, static_site, "?layer=1&head=1&tab=projection&view=umap")
    expect(page.locator("select[data-control=view] option")).to_have_text(["PCA"])
    expect(page.get_by_text("This head has no “umap” view; showing PCA.")).to_be_visible()
    expect(page.locator("figure.chart svg")).to_contain_text("PC1 (")

    page.click("[data-nav=prev]")
    expect(page).to_have_url(re.compile(r"\?layer=1&head=0&tab=projection&view=umap$"))
    expect(page.locator("select[data-control=view] option")).to_have_text(["PCA", "UMAP"])
    expect(page.locator("figure.chart svg")).to_contain_text("UMAP 1")
    positions = circle_positions(page, "circle.point")
    assert_linear([p[0] for p in positions], [c[0] for c in umap["q"]], "umap x")
    assert_linear([p[1] for p in positions], [c[1] for c in umap["q"]], "umap y")
    page.select_option("select[data-control=view]", "pca")
    expect(page).to_have_url(re.compile(r"tab=projection$"))
    expect(page.locator("figure.chart svg")).to_contain_text("PC1 (")


def test_the_metrics_tab_ranks_the_head_and_draws_the_histogram(page, static_site):
    head = read(static_site.data / "heads" / "L3H4.json")
    scatter = read(static_site.data / "scatter_data.json")
    open_page(page, static_site, "?layer=3&head=4&tab=metrics")
    weights = head["qk_distance_histogram"]["weights"]
    bars = page.locator("rect.bar")
    expect(bars).to_have_count(len(weights))
    heights = [float(h) for h in bars.evaluate_all("els => els.map(e => e.getAttribute('height'))")]
    top = max(range(len(weights)), key=weights.__getitem__)
    for height, weight in zip(heights, weights):
        assert height == pytest.approx(heights[top] * weight / weights[top], abs=1e-6)
    for name in scatter["metrics"]:
        value = head["metrics"][name]
        rank = 1 + sum(row["metrics"][name] > value for row in scatter["heads"])
        expect(page.locator(f"tr[data-metric={name}] [data-rank]")).to_have_text(f"{rank} / {len(scatter['heads'])}")
    expect(page.locator("table[aria-label='as key'] tbody tr")).to_have_count(len(head["top_tokens"]["key"]))
    expect(page.locator("table[aria-label='as query'] tbody tr")).to_have_count(len(head["top_tokens"]["query"]))


# -- static-only mode and errors

def test_static_only_mode_hides_every_server_control(page, static_site):
    head = read(static_site.data / "heads" / "L3H4.json")
    q, k = next(s for s in head["sequences"] if s["interval"] == 10)["argmax"]
    open_page(page, static_site, "?layer=3&head=4&tab=sequences&interval=10")
    expect(page.locator("article.sequence").first).to_be_visible()
    expect(page.locator("#custom-text")).to_have_count(0)
    expect(page.locator("a[data-interval='-1']")).to_have_count(0)
    article = page.locator("article.sequence").first
    article.locator(f"span.token[data-pos='{q}']").click()
    article.locator(f"span.token[data-pos='{k}']").click()
    expect(article.locator(f"[data-cell='{q},{k}']")).to_be_visible()
    expect(article.locator("[data-attribution]")).to_have_count(0)

    page.click("[data-tab=projection]")
    expect(page.locator("circle.point").first).to_be_attached()
    expect(page.locator("[data-action=save-clusters]")).to_have_count(0)
    expect(page.locator("#project-text")).to_have_count(0)

    open_page(page, static_site, "?layer=3&head=4&attr=qk&seq=0&qpos=3&kpos=1")
    expect(page.locator("[role=alert]")).to_contain_text(
        "data/attributions/qk/L3H4S0Q3K1.json does not exist, and attributions are computed by the server")


def test_a_missing_config_is_reported_in_the_page(page, static_site):
    (static_site.data / "config.json").unlink()
    page.goto(static_site.url)
    expect(page.locator("[role=alert]")).to_contain_text("data/config.json not found: run python -m headvis.scan first")


def test_a_damaged_head_file_or_an_unscanned_head_is_reported_in_the_page(page, static_site):
    (static_site.data / "heads" / "L1H4.json").write_text('{"layer": 1, "head"')
    open_page(page, static_site, "?layer=1&head=4&tab=metrics")
    expect(page.locator("[role=alert]")).to_contain_text("data/heads/L1H4.json is not valid JSON")
    open_page(page, static_site, "?layer=2&head=0")
    expect(page.locator("[role=alert]")).to_contain_text("L2H0 was not scanned")


def test_a_server_that_is_gone_is_reported_not_fatal(page, static_site):
    """A killed server leaves its server_config.json behind: the controls show, and using one says what is wrong."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (static_site.data / "server_config.json").write_text(json.dumps({"url": f"http://127.0.0.1:{port}", "context": {}}))
    open_page(page, static_site, "?layer=1&head=0&tab=sequences&interval=10", mode="server")
    page.fill("#custom-text", "hello")
    page.click("form.add button[type=submit]")
    expect(page.locator("[role=alert]")).to_contain_text(
        f"cannot reach the server at http://127.0.0.1:{port}: is python -m headvis.serve still running?")
    expect(page.locator("article.sequence").first).to_be_visible()
    expect(page.locator("form.add button[type=submit]")).to_be_enabled()


# -- server mode

def test_a_custom_prompt_is_added_shown_under_interval_minus_1_and_deleted(page, live):
    open_page(page, live, "?layer=3&head=4&tab=sequences&interval=10", mode="server")
    page.fill("#custom-text", "The cat sat on the mat. The cat sat")
    page.click("form.add button[type=submit]")
    expect(page).to_have_url(re.compile(r"interval=-1$"), timeout=MODEL_TIMEOUT_MS)
    article = page.locator("article.sequence")
    expect(article).to_have_count(1)
    custom = read(live.data / "custom" / "L3H4.json")["sequences"]
    assert len(custom) == 1 and article.get_attribute("data-seq") == custom[0]["id"]
    assert article.locator("span.token").all_text_contents() == custom[0]["tokens"]  # plain words, no whitespace tokens
    expect(page.locator("a[data-interval='-1']")).to_contain_text("1 prompt")

    article.locator("button.delete").click()
    expect(page.locator("article.sequence")).to_have_count(0)
    assert read(live.data / "custom" / "L3H4.json")["sequences"] == []


def test_a_projected_prompt_is_overlaid_on_the_cloud(page, live):
    open_page(page, live, "?layer=1&head=0&tab=projection", mode="server")
    page.fill("#project-text", "def f(x): return x + 1")
    with page.expect_response(re.compile(r"/api/project_to_umap$"), timeout=MODEL_TIMEOUT_MS) as response:
        page.click("form.prompt button[type=submit]")
    reply = response.value.json()
    n = len(reply["points"]["pos"])
    assert n > 0
    overlay = page.locator("rect.overlay-point")
    expect(overlay).to_have_count(n)
    page.check("input[name=vector][value=v]")
    expect(overlay).to_have_count(n)
    scan_points = circle_positions(page, "circle.point")
    xs = [float(x) for x in overlay.evaluate_all("els => els.map(e => Number(e.getAttribute('x')) + 4)")]
    assert min(p[0] for p in scan_points) - 50 < min(xs) and max(xs) < max(p[0] for p in scan_points) + 50


def test_a_brushed_cluster_is_saved_to_the_clusters_file_and_drawn_again(page, live):
    open_page(page, live, "?layer=1&head=0&tab=projection", mode="server")
    expect(page.locator("circle.point").first).to_be_attached()
    box = page.locator("g.brush .overlay").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + 2, box["y"] + 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.7, steps=5)
    page.mouse.up()
    form = page.locator("form.new-cluster")
    expect(form).to_contain_text("points selected")
    selected = [int(i) for i in page.locator("circle.point.selected").evaluate_all("els => els.map(e => e.dataset.index)")]
    assert selected
    expect(form).to_contain_text(f"{len(selected)} points selected")
    page.fill("input[aria-label='cluster name']", "upper left")
    page.click("form.new-cluster button[type=submit]")
    page.click("[data-action=save-clusters]")
    expect(page.locator(".clusters [role=status]")).to_have_text("saved 1 cluster")
    saved = read(live.data / "umap" / "clusters" / "L1H0.json")
    assert saved == {"clusters": [{"name": "upper left", "color": saved["clusters"][0]["color"], "vector": "q",
                                   "view": "pca", "points": selected}]}

    page.reload()
    expect(page.locator("li[data-cluster='upper left']")).to_contain_text(f"{len(selected)} points")
    color = saved["clusters"][0]["color"]
    ringed = page.locator(f"circle.point[stroke='{color}']")
    expect(ringed).to_have_count(len(selected))


def test_the_attribution_link_shows_the_servers_error_message(page, live):
    from headvis.server.routes import ATTRIBUTIONS_UNAVAILABLE

    head = read(live.data / "heads" / "L3H4.json")
    seq = next(s for s in head["sequences"] if s["interval"] == 10)
    q, k = seq["argmax"]
    open_page(page, live, "?layer=3&head=4&tab=sequences&interval=10", mode="server")
    article = page.locator("article.sequence").first
    article.locator(f"span.token[data-pos='{q}']").click()
    article.locator(f"span.token[data-pos='{k}']").click()
    article.locator("[data-attribution]").click()
    expect(page).to_have_url(re.compile(rf"\?layer=3&head=4&attr=qk&seq={seq['id']}&qpos={q}&kpos={k}$"))
    expect(page.locator("[role=alert]")).to_have_text(re.compile(re.escape(f"qk_attributions: {ATTRIBUTIONS_UNAVAILABLE}")))

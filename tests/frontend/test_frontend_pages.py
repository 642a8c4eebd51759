"""The built frontend in a real browser, static-only and against the real server (conftest.py has the setup).

Each test loads a page of a tiny real format-2 scan and compares what is drawn
with the data files: one point per head placed by its metrics (heads with a
null metric left out), the tokens and the attention shading of the head files
under each `reduction` and `transpose`, the projection's points in each vector
and pair of components, the histograms, the URL state and history, and the
server round trips (custom prompts, an edge projected from the sequences tab,
clusters saved into umap/L{l}H{h}.json, the attribution error).
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from browser import served
from frontend_helpers import HEADS, LAYERS, Site, eventually, missing

try:
    import playwright.sync_api as playwright_api
except ImportError:
    missing("Playwright is not installed: pip install -e '.[dev]'", module=True)
expect = playwright_api.expect

MODEL_TIMEOUT_MS = 90_000  # a request that runs the model on a busy 2-core machine
N_HEADS = len(LAYERS) * len(HEADS)


def read(path: Path):
    return json.loads(path.read_text())


def write(path: Path, value) -> None:
    path.write_text(json.dumps(value))


def coo_rows(seq: dict) -> dict[int, dict[int, float]]:
    """{q: {k: p[q, k]}} of a sequence's stored attention."""
    rows: dict[int, dict[int, float]] = {}
    for idx, value in zip(seq["attention_indices"], seq["attention_values"]):
        q, k = divmod(idx, seq["seq_len"])
        rows.setdefault(q, {})[k] = value
    return rows


def maxima(seq: dict, side: str) -> list[float]:
    """Per key (side "key": max over q >= 1 of p[q, k]) or per query (side "query": max over k >= 1), position 0
    left at 0, as max_activation and the reference frontend's reductions skip it."""
    out = [0.0] * seq["seq_len"]
    for q, row in coo_rows(seq).items():
        for k, value in row.items():
            if q >= 1 and k >= 1:
                at = k if side == "key" else q
                out[at] = max(out[at], value)
    return out


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


def point_positions(page) -> dict[int, tuple[float, float]]:
    """index -> pixel centre of every drawn projection point (circles: the scan; diamonds: projected ones)."""
    return {int(i): (x, y) for i, x, y in page.locator("g.points > *").evaluate_all(
        """els => els.map(e => e.tagName === 'circle'
             ? [e.dataset.index, Number(e.getAttribute('cx')), Number(e.getAttribute('cy'))]
             : [e.dataset.index, Number(e.getAttribute('x')) + 4, Number(e.getAttribute('y')) + 4])""")}


def open_page(page, site: Site, query: str = "", mode: str = "static") -> None:
    """Load the page and wait until it knows whether a server is up."""
    page.goto(site.url + query)
    expect(page.locator(f".mode[data-mode={mode}]")).to_be_visible()


def interval_sequences(data: Path, layer: int, head: int, interval: int = 10) -> list[dict]:
    shown = [s for s in read(data / "heads" / f"L{layer}H{head}.json")["sequences"] if s["interval"] == interval]
    assert shown, f"the fixture scan keeps sequences in interval {interval} of L{layer}H{head}"
    return shown


# -- overview

def test_overview_draws_one_point_per_head_placed_by_the_chosen_metrics(page, static_site):
    rows = read(static_site.data / "scatter_data.json")
    config = read(static_site.data / "config.json")
    assert isinstance(rows, list) and len(rows) == N_HEADS
    open_page(page, static_site)
    points = page.locator("circle.point")
    expect(points).to_have_count(N_HEADS)
    order = [(int(l), int(h)) for l, h in points.evaluate_all("els => els.map(e => [e.dataset.layer, e.dataset.head])")]
    metrics = {(row["layer"], row["head"]): row for row in rows}
    assert sorted(order) == sorted(metrics)

    def check(x: str, y: str) -> list[tuple[float, float]]:
        positions = circle_positions(page, "circle.point")
        assert_linear([p[0] for p in positions], [metrics[head][x] for head in order], f"x = {x}")
        assert_linear([p[1] for p in positions], [metrics[head][y] for head in order], f"y = {y}")
        return positions

    before = check("pattern_entropy", "previous_token_score")  # the defaults
    page.select_option("select[data-axis=x]", "bos_score")
    expect(page).to_have_url(re.compile(r"\?x=bos_score$"))
    after = check("bos_score", "previous_token_score")
    assert [p[0] for p in after] != [p[0] for p in before] and [p[1] for p in after] == [p[1] for p in before]
    expect(page.locator("[data-left-out]")).to_have_count(0)

    cells = page.locator("a.cell")
    expect(cells).to_have_count(len(order))
    page.select_option("select[data-axis=grid]", "self_attention_score")
    expect(page).to_have_url(re.compile(r"grid=self_attention_score"))
    label = config.get("metric_labels", {}).get("self_attention_score", "self_attention_score")
    expect(page.locator("a.cell[data-layer='3'][data-head='4']")).to_have_attribute(
        "title", re.compile(rf"^L3 H4 · {re.escape(label)}: "))


def test_a_null_metric_is_left_out_of_the_plot_shown_as_na_and_not_ranked(page, static_site):
    path = static_site.data / "scatter_data.json"
    rows = read(path)
    for row in rows:
        if (row["layer"], row["head"]) == (3, 4):
            row["induction_score"] = None
    write(path, rows)
    head_path = static_site.data / "heads" / "L3H4.json"
    head = read(head_path)
    head["metrics"]["induction_score"] = None
    write(head_path, head)

    open_page(page, static_site, "?x=induction_score")
    expect(page.locator("circle.point")).to_have_count(N_HEADS - 1)
    expect(page.locator("circle.point[data-layer='3'][data-head='4']")).to_have_count(0)
    expect(page.locator("[data-left-out]")).to_contain_text(f"1 of {N_HEADS} heads left out")
    page.select_option("select[data-axis=grid]", "induction_score")
    expect(page.locator("a.cell[data-layer='3'][data-head='4']")).to_have_text("n/a")

    open_page(page, static_site, "?layer=3&head=4&tab=metrics")
    expect(page.locator("dd[data-metric=induction_score]")).to_have_text("n/a")
    expect(page.locator("tr[data-metric=induction_score] [data-value]")).to_have_text("n/a")
    expect(page.locator("tr[data-metric=induction_score] [data-rank]")).to_have_attribute("data-rank", "none")
    open_page(page, static_site, "?layer=1&head=0&tab=metrics")
    value = next(r for r in rows if (r["layer"], r["head"]) == (1, 0))["induction_score"]
    known = [r["induction_score"] for r in rows if r["induction_score"] is not None]
    rank = 1 + sum(v > value for v in known)
    expect(page.locator("tr[data-metric=induction_score] [data-rank]")).to_have_text(f"{rank} / {N_HEADS - 1}")


def test_clicking_a_point_opens_its_head_and_history_restores_each_view(page, static_site):
    open_page(page, static_site, "?x=bos_score")
    page.click("circle.point[data-layer='3'][data-head='4']")
    expect(page).to_have_url(re.compile(r"\?layer=3&head=4&tab=sequences$"))
    expect(page.locator("h1")).to_have_text("Layer 3 · Head 4")
    expect(page.locator("a[data-interval='10']")).to_have_attribute("aria-current", "true")  # the highest
    expect(page.locator("[data-nav=next]")).to_have_count(0)  # the last scanned head
    page.click("[data-tab=metrics]")
    expect(page).to_have_url(re.compile(r"tab=metrics"))
    expect(page.locator("svg[aria-label='attention weight by query-key distance']")).to_be_visible()
    page.click("[data-nav=prev]")
    expect(page.locator("h1")).to_have_text("Layer 3 · Head 1")
    expect(page.locator("[data-tab=metrics]")).to_have_attribute("aria-current", "page")

    page.go_back()
    expect(page.locator("h1")).to_have_text("Layer 3 · Head 4")
    page.go_back()
    expect(page.locator("[data-tab=sequences]")).to_have_attribute("aria-current", "page")
    page.go_back()
    expect(page.locator("circle.point")).to_have_count(N_HEADS)
    expect(page.locator("select[data-axis=x]")).to_have_value("bos_score")
    page.go_forward()
    expect(page.locator("h1")).to_have_text("Layer 3 · Head 4")
    expect(page).to_have_url(re.compile(r"\?layer=3&head=4&tab=sequences$"))


# -- sequences

def test_a_deep_link_shows_the_intervals_sequences_with_their_tokens_and_query_shading(page, static_site):
    shown = interval_sequences(static_site.data, 3, 4)
    open_page(page, static_site, "?layer=3&head=4&tab=sequences&interval=10")
    articles = page.locator("article.sequence")
    expect(articles).to_have_count(len(shown))
    for i, seq in enumerate(shown):
        article = articles.nth(i)
        assert article.get_attribute("data-seq") == str(seq["sequence_id"])
        spans = article.locator("span.token")
        expect(spans).to_have_count(seq["seq_len"])
        texts = spans.all_text_contents()
        plain = [p for p, t in enumerate(seq["tokens"]) if t.strip() == t and t.isprintable() and t]
        assert plain and all(texts[p] == seq["tokens"][p] for p in plain)
        # reduction=max, no transpose (the defaults): each token by the most attention it gives as a query
        assert token_weights(article) == pytest.approx(maxima(seq, "query"), abs=1e-12)
        expect(article.locator("[data-max-activation]")).to_have_text(f"{seq['max_activation']:.4g}")


def test_reduction_and_transpose_change_the_shading_and_stay_in_the_url(page, static_site):
    seq = interval_sequences(static_site.data, 3, 4)[0]
    q, k = seq["argmax"]
    open_page(page, static_site, "?layer=3&head=4&tab=sequences&interval=10&transpose=true")
    article = page.locator("article.sequence").first
    assert token_weights(article) == pytest.approx(maxima(seq, "key"), abs=1e-12)
    expect(page.locator("input[data-control=transpose]")).to_be_checked()

    page.select_option("select[data-control=reduction]", "pairwise_max")
    expect(page).to_have_url(re.compile(r"interval=10&reduction=pairwise_max&transpose=true$"))
    only_pair = [0.0] * seq["seq_len"]
    only_pair[q] = seq["max_activation"]
    assert token_weights(article) == pytest.approx(only_pair, abs=1e-12)
    expect(article.locator("span.token.query")).to_have_attribute("data-pos", str(q))
    expect(article.locator("span.token.top-key")).to_have_attribute("data-pos", str(k))

    # transposed, hovering a key shows its column: the queries that attend to it
    column = [coo_rows(seq).get(query, {}).get(k, 0.0) for query in range(seq["seq_len"])]
    article.locator(f"span.token[data-pos='{k}']").hover()
    expect(article.locator(".status")).to_contain_text(f"Column of key {k} ")
    assert token_weights(article) == pytest.approx(column, abs=1e-12)

    page.click("[data-nav=prev]")  # the shading settings travel with the head links
    expect(page).to_have_url(re.compile(r"\?layer=3&head=1&tab=sequences&interval=10&reduction=pairwise_max&transpose=true$"))
    page.uncheck("input[data-control=transpose]")
    expect(page).to_have_url(re.compile(r"interval=10&reduction=pairwise_max$"))
    page.go_back()
    expect(page.locator("input[data-control=transpose]")).to_be_checked()


def test_hovering_a_token_shades_its_row_and_a_click_pins_it(page, static_site):
    seq = interval_sequences(static_site.data, 3, 4)[0]
    q, k = seq["argmax"]
    stored = coo_rows(seq)[q]
    row = [stored.get(key, 0.0) for key in range(seq["seq_len"])]
    open_page(page, static_site, "?layer=3&head=4&tab=sequences&interval=10")
    article = page.locator(f"article.sequence[data-seq='{seq['sequence_id']}']")
    expect(article.locator("span.token")).to_have_count(seq["seq_len"])  # drawn: evaluate_all does not wait
    default = maxima(seq, "query")

    def shows(weights: list[float], what: str = "") -> None:
        assert token_weights(article) == pytest.approx(weights, abs=1e-12), what

    eventually(page, lambda: shows(default, "at rest: each token's most attention as a query"))

    # pointing brings up the keys panel above the tokens, which pushes them down: pointed at again where it is then
    # (test_frontend_workbench.py's test_pointing_at_a_token_or_the_heatmap_leaves_it_under_the_pointer)
    article.locator(f"span.token[data-pos='{q}']").hover()
    article.locator(f"span.token[data-pos='{q}']").hover()
    expect(article.locator(".status")).to_contain_text(f"Row of query {q} ")
    eventually(page, lambda: shows(row))
    expect(article.locator("span.token.query")).to_have_attribute("data-pos", str(q))
    expect(article.locator("span.token.top-key")).to_have_attribute("data-pos", str(max(range(len(row)), key=row.__getitem__)))

    article.locator(f"span.token[data-pos='{q}']").click()
    other = 0 if q != 0 else 1
    article.locator(f"span.token[data-pos='{other}']").hover()
    expect(article.locator(".status")).to_contain_text(re.compile(rf"Row of query {q} .*\(pinned"))
    eventually(page, lambda: shows(row, "a pinned row stays while the pointer moves"))
    article.locator(f"span.token[data-pos='{k}']").click()
    expect(article.locator(f"[data-cell='{q},{k}']")).to_contain_text(f"p[{q}, {k}] = {seq['max_activation']:.4g}")
    page.keyboard.press("Escape")
    page.mouse.move(0, 0)
    expect(article.locator(".status")).to_contain_text("Shade: the most attention")
    eventually(page, lambda: shows(default))


def test_the_interval_selector_shows_counts_and_switches_interval(page, static_site):
    head = read(static_site.data / "heads" / "L1H0.json")
    open_page(page, static_site, "?layer=1&head=0&tab=sequences&interval=10")
    links = page.locator("nav.intervals a")
    expect(links).to_have_count(len(head["interval_counts"]))  # static, no custom file: no "custom"
    shown = sum(s["interval"] == 4 for s in head["sequences"])  # the head file's records, not the decile's size
    expect(page.locator("a[data-interval='4']")).to_contain_text(re.compile(rf"\b{shown} shown$"))
    expect(page.locator("a[data-interval='4']")).to_have_attribute("data-shown", str(shown))
    page.click("a[data-interval='4']")
    expect(page).to_have_url(re.compile(r"interval=4$"))
    expect(page.locator("a[data-interval='4']")).to_have_attribute("aria-current", "true")
    ids = [str(s["sequence_id"]) for s in head["sequences"] if s["interval"] == 4]
    expect(page.locator("article.sequence")).to_have_count(len(ids))
    assert page.locator("article.sequence").evaluate_all("els => els.map(e => e.dataset.seq)") == ids


# -- projection, metrics, help

def test_the_projection_draws_every_point_and_a_vector_or_component_switch_moves_them(page, static_site):
    projection = read(static_site.data / "umap" / "L1H0.json")
    sequences = read(static_site.data / "umap" / "sequences.json")
    assert "views" not in projection, "the fixture scan fits PCA only"
    n = len(projection["seq_idx"]) + len(projection.get("projected_points", []))
    open_page(page, static_site, "?layer=1&head=0&tab=umap")
    expect(page.locator("g.points > *")).to_have_count(n)

    def check(vector: str, dims: tuple[int, int]) -> list[tuple[float, float]]:
        positions = circle_positions(page, "circle.point")
        components = projection["pca"][vector]
        assert_linear([p[0] for p in positions], components[f"d{dims[0]}"], f"{vector} x")
        assert_linear([p[1] for p in positions], components[f"d{dims[1]}"], f"{vector} y")
        for axis, d in zip("xy", dims):
            ratio = projection["pca_explained_variance"][vector][d]
            expect(page.locator("figure.chart svg")).to_contain_text(f"PC{d + 1} ({100 * ratio:.1f}% of variance)")
        return positions

    q_positions = check("Q", (0, 1))
    page.check("input[name=vector][value=K]")
    expect(page).to_have_url(re.compile(r"tab=umap&vector=K$"))
    k_positions = check("K", (0, 1))
    assert k_positions != q_positions
    page.select_option("select[data-control=dim-y]", "2")
    expect(page).to_have_url(re.compile(r"tab=umap&vector=K&dims=d0,d2$"))
    assert [p[0] for p in check("K", (0, 2))] == [p[0] for p in k_positions]
    page.select_option("select[data-control=dim-x]", "2")  # the same component twice swaps them
    expect(page).to_have_url(re.compile(r"dims=d2,d0$"))
    check("K", (2, 0))

    # hovering a point shows its query and key tokens in context
    x, y = page.locator("circle.point[data-index='0']").evaluate(
        "e => { const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }")
    page.mouse.move(x, y)
    tip = page.locator("[role=tooltip]")
    seq, top_q, top_k = projection["seq_idx"][0], projection["top_q"][0], projection["top_k"][0]
    expect(tip).to_contain_text(f"sequence {seq} · query {top_q} → key {top_k}")
    tokens = sequences[str(seq)]
    for role, pos in (("query", top_q), ("key", top_k)):
        token = tokens[pos]
        if top_q != top_k and token.strip() == token and token.isprintable() and token:
            expect(tip.locator(f"[data-role={role}]")).to_contain_text(token)

    # a click keeps the point: its panel names it, and its sequence is linked when the head file shows it
    page.mouse.click(x, y)
    picked = page.locator("section.picked")
    expect(picked).to_have_attribute("data-index", "0")
    expect(page.locator("g.highlight")).to_have_attribute("data-index", "0")


def test_the_umap_views_are_offered_only_when_the_head_has_them(page, static_site):
    # L1H0 gets a view (mirrored PCA coordinates stand in for a fitted UMAP), L1H1 keeps PCA alone.
    # Written before the first load: a static host's files may come from the browser's cache afterwards.
    path = static_site.data / "umap" / "L1H0.json"
    projection = read(path)
    embeddings = {v: {"d0": [-x for x in c["d0"]], "d1": [2 * y for y in c["d1"]], "d2": c["d2"]}
                  for v, c in projection["pca"].items()}
    for point in projection.get("projected_points", []):
        point["umap_views"] = [point["pca"]]
    write(path, {**projection, "views": [{"n_neighbors": 15, "min_dist": 0.1, "embeddings": embeddings}]})

    open_page(page, static_site, "?layer=1&head=1&tab=umap&view=umap0")
    expect(page.locator("select[data-control=view] option")).to_have_text(["PCA"])
    expect(page.get_by_text("This head has no “umap0” view; showing PCA.")).to_be_visible()
    expect(page.locator("figure.chart svg")).to_contain_text("PC1 (")

    page.click("[data-nav=prev]")
    expect(page).to_have_url(re.compile(r"\?layer=1&head=0&tab=umap&view=umap0$"))
    expect(page.locator("select[data-control=view] option")).to_have_text(["PCA", "UMAP (n_neighbors 15, min_dist 0.1)"])
    expect(page.locator("figure.chart svg")).to_contain_text("UMAP 1")
    positions = circle_positions(page, "circle.point")
    assert_linear([p[0] for p in positions], embeddings["Q"]["d0"], "umap x")
    assert_linear([p[1] for p in positions], embeddings["Q"]["d1"], "umap y")
    page.select_option("select[data-control=view]", "pca")
    expect(page).to_have_url(re.compile(r"tab=umap&view=pca$"))
    expect(page.locator("figure.chart svg")).to_contain_text("PC1 (")
    open_page(page, static_site, "?layer=1&head=0&tab=umap")  # no view named: the first UMAP view
    expect(page.locator("select[data-control=view]")).to_have_value("umap0")


def test_the_metrics_tab_ranks_the_head_and_draws_both_histograms(page, static_site):
    head = read(static_site.data / "heads" / "L3H4.json")
    rows = read(static_site.data / "scatter_data.json")
    config = read(static_site.data / "config.json")
    open_page(page, static_site, "?layer=3&head=4&tab=metrics")
    for label, key in (("attention weight by query-key distance", "qk_distance_histogram"),
                       ("sequences by max activation", "histogram")):
        values = head[key]["bin_values"]
        assert len(head[key]["bin_edges"]) == len(values) + 1
        bars = page.locator(f"svg[aria-label='{label}'] rect.bar")
        expect(bars).to_have_count(len(values))
        heights = [float(h) for h in bars.evaluate_all("els => els.map(e => e.getAttribute('height'))")]
        top = max(range(len(values)), key=values.__getitem__)
        for height, value in zip(heights, values):
            assert height == pytest.approx(heights[top] * value / values[top], abs=1e-6), key
    assert sum(head["histogram"]["bin_values"]) == head["statistics"]["n_sequences"]
    for name in config["metrics"]:
        value = head["metrics"][name]
        known = [row[name] for row in rows if row[name] is not None]
        if value is None:
            continue
        rank = 1 + sum(v > value for v in known)
        expect(page.locator(f"tr[data-metric={name}] [data-rank]")).to_have_text(f"{rank} / {len(known)}")
    for key in ("n_sequences", "n_samples"):
        expect(page.locator(f"[data-statistic={key}]")).to_have_text(str(head["statistics"][key]))
    expect(page.locator("[data-statistic=mean_max_activation]")).to_have_text(
        f"{head['statistics']['mean_max_activation']:.4g}")
    expect(page.locator("table[aria-label='as key'] tbody tr")).to_have_count(len(head["top_key_tokens"]))
    expect(page.locator("table[aria-label='as query'] tbody tr")).to_have_count(len(head["top_query_tokens"]))


def test_the_help_tab_describes_every_metric_of_the_scan(page, static_site):
    config = read(static_site.data / "config.json")
    open_page(page, static_site, "?layer=1&head=0&tab=help")
    expect(page.locator("[data-tab=help]")).to_have_attribute("aria-current", "page")
    expect(page.locator("table.metric-help tr[data-metric]")).to_have_count(len(config["metrics"]))
    for name in config["metrics"]:
        description = config["metric_descriptions"][name]
        expect(page.locator(f"table.metric-help tr[data-metric={name}] td")).to_have_text(description)


# -- static-only mode and errors

def test_static_only_mode_hides_every_server_control(page, static_site):
    q, k = interval_sequences(static_site.data, 3, 4)[0]["argmax"]
    open_page(page, static_site, "?layer=3&head=4&tab=sequences&interval=10")
    expect(page.locator("article.sequence").first).to_be_visible()
    expect(page.locator("#custom-text")).to_have_count(0)
    expect(page.locator("a[data-interval='-1']")).to_have_count(0)
    article = page.locator("article.sequence").first
    article.locator(f"span.token[data-pos='{q}']").click()
    article.locator(f"span.token[data-pos='{k}']").click()
    expect(article.locator(f"[data-cell='{q},{k}']")).to_be_visible()
    expect(article.locator("[data-attribution]")).to_have_count(0)
    expect(article.locator("[data-action=project]")).to_have_count(0)

    page.click("[data-tab=umap]")
    expect(page).to_have_url(re.compile(r"tab=umap"))
    expect(page.locator("circle.point").first).to_be_attached()
    expect(page.locator("[data-action=save-clusters]")).to_have_count(0)

    open_page(page, static_site, "?layer=3&head=4&attr=qk&seq=0&qpos=3&kpos=1")
    expect(page.locator("[role=alert]")).to_contain_text(
        "data/attributions/qk/L3H4S0Q3K1.json does not exist, and attributions are computed by the server")


def test_a_missing_config_is_reported_in_the_page(page, static_site):
    (static_site.data / "config.json").unlink()
    page.goto(static_site.url)
    expect(page.locator("[role=alert]")).to_contain_text("data/config.json not found: run python -m headvis.scan first")


def test_a_format_1_tree_is_refused_with_how_to_rescan(page, static_site):
    path = static_site.data / "config.json"
    write(path, {**read(path), "format_version": 1})
    page.goto(static_site.url + "?layer=1&head=0")
    expect(page.locator("[role=alert]")).to_contain_text(
        "data/config.json has format_version 1, and this page reads format 2 only: re-scan with python -m headvis.scan")
    expect(page.locator("article.sequence")).to_have_count(0)


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
    write(static_site.data / "server_config.json", {"server_url": f"http://127.0.0.1:{port}", "context": {}})
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
    with page.expect_request(re.compile(r"/api/head_vis/public/add_custom_sequence/v0$"),
                             timeout=MODEL_TIMEOUT_MS) as request:
        page.click("form.add button[type=submit]")
    body = request.value.post_data_json
    assert body["layer"] == 3 and body["head"] == 4 and body["text"] == "The cat sat on the mat. The cat sat"
    assert body["context"] == read(live.data / "server_config.json")["context"]
    expect(page).to_have_url(re.compile(r"interval=-1$"), timeout=MODEL_TIMEOUT_MS)
    article = page.locator("article.sequence")
    expect(article).to_have_count(1)
    custom = served(live, "custom_sequences/L3H4.json")["sequences"]
    assert len(custom) == 1 and custom[0]["interval"] == -1
    assert article.get_attribute("data-seq") == custom[0]["sequence_id"]
    assert re.fullmatch(r"c[0-9a-f]+", custom[0]["sequence_id"])
    assert article.locator("span.token").all_text_contents() == custom[0]["tokens"]  # plain words, no whitespace tokens
    expect(page.locator("a[data-interval='-1']")).to_contain_text("1 prompt")

    article.locator("button.delete").click()
    expect(page.locator("article.sequence")).to_have_count(0)
    assert served(live, "custom_sequences/L3H4.json")["sequences"] == []


def _edge_outside_the_cloud(data: Path, layer: int, head: int) -> tuple[dict, int, int]:
    """A shown sequence of interval 10 and an edge (q, k) of it, q > k >= 1, that the projection has no point for."""
    projection = read(data / "umap" / f"L{layer}H{head}.json")
    taken = set(zip(projection["seq_idx"], projection["top_q"], projection["top_k"]))
    for seq in interval_sequences(data, layer, head):
        for q in range(seq["seq_len"] - 1, 1, -1):
            for k in range(1, q):
                if (seq["sequence_id"], q, k) not in taken:
                    return seq, q, k
    raise AssertionError("every edge of interval 10 is in the cloud")


def _show_in_projection(page, live: Site, seq: dict, q: int, k: int) -> dict:
    open_page(page, live, "?layer=1&head=0&tab=sequences&interval=10", mode="server")
    article = page.locator(f"article.sequence[data-seq='{seq['sequence_id']}']")
    article.locator(f"span.token[data-pos='{q}']").click()
    article.locator(f"span.token[data-pos='{k}']").click()
    with page.expect_response(re.compile(r"/api/head_vis/public/project_to_umap/v0$"), timeout=MODEL_TIMEOUT_MS) as response:
        article.locator("[data-action=project]").click()
    assert response.value.ok, response.value.text()
    body = response.value.request.post_data_json
    assert {key: body[key] for key in ("layer", "head", "seq_idx", "query_pos", "key_pos")} == \
        {"layer": 1, "head": 0, "seq_idx": seq["sequence_id"], "query_pos": q, "key_pos": k}
    # the pinned row and the cell stay in the URL: back on the sequences tab they are shown again
    expect(page).to_have_url(re.compile(
        rf"\?layer=1&head=0&tab=umap&interval=10&seq={seq['sequence_id']}&pin={q}&cell={q},{k}$"))
    return response.value.json()


def test_an_edge_shown_in_the_projection_is_highlighted_and_a_new_point_is_kept(page, live):
    projection = read(live.data / "umap" / "L1H0.json")
    n_scanned = len(projection["seq_idx"])
    n_projected = len(projection.get("projected_points", []))

    # an edge of the cloud: its own point is highlighted
    shown = {s["sequence_id"]: s for s in interval_sequences(live.data, 1, 0)}
    i, seq = next((i, shown[s]) for i, s in enumerate(projection["seq_idx"])
                  if s in shown and projection["top_q"][i] != projection["top_k"][i])
    q, k = projection["top_q"][i], projection["top_k"][i]
    reply = _show_in_projection(page, live, seq, q, k)
    assert reply["found_in_cloud"] is True
    i = reply["existing_index"]
    assert (projection["seq_idx"][i], projection["top_q"][i], projection["top_k"][i]) == (seq["sequence_id"], q, k)
    expect(page.locator("g.highlight")).to_have_attribute("data-index", str(i))
    expect(page.locator("section.picked")).to_contain_text(f"query {q} → key {k}")

    # an edge outside it: the server projects a new point, drawn as a diamond and kept in the file
    seq, q, k = _edge_outside_the_cloud(live.data, 1, 0)
    reply = _show_in_projection(page, live, seq, q, k)
    assert reply["found_in_cloud"] is False and reply["found_in_projected"] is False
    point = reply["point"]
    assert (point["seq_idx"], point["top_q"], point["top_k"]) == (seq["sequence_id"], q, k)
    new_index = n_scanned + n_projected
    expect(page.locator("g.highlight")).to_have_attribute("data-index", str(new_index))
    expect(page.locator(f"rect.projected-point[data-index='{new_index}']")).to_be_attached()
    expect(page.locator("section.picked")).to_contain_text("projected by the server just now")
    saved = read(live.data / "umap" / "L1H0.json")["projected_points"]
    assert len(saved) == n_projected + 1 and saved[-1]["top_q"] == q and saved[-1]["top_k"] == k
    page.reload()
    expect(page.locator("rect.projected-point")).to_have_count(n_projected + 1)
    pca = saved[-1]["pca"]["Q"]
    positions = point_positions(page)
    scan = [positions[j] for j in range(n_scanned)]
    assert_linear([p[0] for p in scan] + [positions[new_index][0]], projection["pca"]["Q"]["d0"] + [pca["d0"]], "new x")

    # the same edge again: the point projected before
    reply = _show_in_projection(page, live, seq, q, k)
    assert {key: reply.get(key) for key in ("found_in_cloud", "found_in_projected", "projected_index")} == \
        {"found_in_cloud": False, "found_in_projected": True, "projected_index": n_projected}
    expect(page.locator("g.highlight")).to_have_attribute("data-index", str(new_index))
    expect(page.locator("rect.projected-point")).to_have_count(n_projected + 1)


def test_a_brushed_cluster_is_saved_into_the_umap_file_and_drawn_again(page, live):
    open_page(page, live, "?layer=1&head=0&tab=umap", mode="server")
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
    with page.expect_request(re.compile(r"/api/head_vis/public/save_umap_clusters/v0$")) as request:
        page.click("form.new-cluster button[type=submit]")
        page.click("[data-action=save-clusters]")
    expect(page.locator(".clusters [role=status]")).to_have_text("saved 1 cluster")
    projection = read(live.data / "umap" / "L1H0.json")
    edges = [[projection["seq_idx"][i], projection["top_q"][i], projection["top_k"][i]] for i in selected]
    clusters = projection["clusters"]
    assert clusters == [{"name": "upper left", "color": clusters[0]["color"], "points": edges}]
    assert request.value.post_data_json["clusters"] == clusters
    assert not (live.data / "umap" / "clusters").exists()

    page.reload()
    expect(page.locator("li[data-cluster='upper left']")).to_contain_text(f"{len(selected)} points")
    color = clusters[0]["color"]
    ringed = page.locator(f"circle.point[stroke='{color}']")
    expect(ringed).to_have_count(len(selected))


def test_a_server_without_dictionaries_offers_no_attribution_link_and_a_deep_link_shows_its_detail(page, live):
    seq = interval_sequences(live.data, 3, 4)[0]
    q, k = seq["argmax"]
    open_page(page, live, "?layer=3&head=4&tab=sequences&interval=10", mode="server")
    article = page.locator("article.sequence").first
    article.locator(f"span.token[data-pos='{q}']").click()
    article.locator(f"span.token[data-pos='{k}']").click()
    expect(article.locator(f".cell-info[data-cell='{q},{k}'] [data-no-attribution]")).to_be_visible()
    expect(article.locator("[data-attribution]")).to_have_count(0)  # a control that could only fail is not offered
    with page.expect_response(re.compile(r"/api/head_vis/public/qk_attributions/v0$"), timeout=MODEL_TIMEOUT_MS) as response:
        page.goto(f"{live.url}?layer=3&head=4&attr=qk&seq={seq['sequence_id']}&qpos={q}&kpos={k}")  # a shared link
    assert not response.value.ok
    detail = response.value.json()["detail"]
    assert response.value.request.post_data_json["seq_idx"] == seq["sequence_id"]
    expect(page.locator("[role=alert]")).to_have_text(re.compile(re.escape(f"qk_attributions: {detail}")))

"""Finding heads in the built frontend (headless chromium, the real scan of conftest.py, static mode).

The jump box in the header, the sortable table of every head, labels on the scatter plot's top points and on
the heads you labelled, per-head notes kept in the browser and exported as JSON, and a plot that stays put
when the metric changes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from frontend_helpers import HEADS, LAYERS, Site, playwright_expect, read_json

expect = playwright_expect()
read = read_json


def open_page(page, site: Site, query: str = "") -> None:
    page.goto(site.url + query)
    expect(page.locator(".mode[data-mode=static]")).to_be_visible()


def test_the_jump_box_opens_a_scanned_head_keeping_the_tab_and_says_when_one_was_not(page, static_site):
    open_page(page, static_site)
    box = page.locator("[data-jump]")
    box.fill("L3H4")
    box.press("Enter")
    expect(page).to_have_url(re.compile(r"\?layer=3&head=4&tab=sequences$"))
    expect(page.locator("h1")).to_have_text("Layer 3 · Head 4")
    page.click("a[data-tab=metrics]")
    box.fill("1.0")  # another way to write L1H0
    box.press("Enter")
    expect(page).to_have_url(re.compile(r"\?layer=1&head=0&tab=metrics$"))
    box.fill("L9H9")
    box.press("Enter")
    expect(page.locator("[data-jump-problem]")).to_have_text("L9H9 was not scanned")
    expect(page).to_have_url(re.compile(r"\?layer=1&head=0&tab=metrics$"))  # stayed
    box.fill("previous token")
    box.press("Enter")
    expect(page.locator("[data-jump-problem]")).to_contain_text("is not a head")
    box.fill("")
    expect(page.locator("[data-jump-problem]")).to_have_count(0)


def table_heads(page) -> list[str]:
    rows = page.locator("table.heads tbody tr")
    expect(rows).to_have_count(len(LAYERS) * len(HEADS))
    return rows.evaluate_all("els => els.map(e => e.dataset.head)")


def test_the_head_table_sorts_by_any_metric_both_ways_and_opens_a_head(page, static_site):
    rows = read(static_site.data / "scatter_data.json")
    name = lambda r: f"L{r['layer']}H{r['head']}"  # noqa: E731
    open_page(page, static_site)
    assert table_heads(page) == [name(r) for r in sorted(rows, key=lambda r: (r["layer"], r["head"]))]
    for metric in ("induction_score", "bos_score"):
        page.click(f"a[data-sort-by={metric}]")
        expect(page).to_have_url(re.compile(rf"\?sort={metric}$"))
        expect(page.locator("table.heads")).to_have_attribute("data-sort", metric)
        descending = [name(r) for r in sorted(rows, key=lambda r: (-r[metric], r["layer"], r["head"]))]
        assert table_heads(page) == descending
        page.click(f"a[data-sort-by={metric}]")
        expect(page).to_have_url(re.compile(rf"\?sort={metric}&order=asc$"))
        expect(page.locator("table.heads")).to_have_attribute("data-order", "asc")
        assert table_heads(page) == [name(r) for r in sorted(rows, key=lambda r: (r[metric], r["layer"], r["head"]))]
        cell = page.locator(f"table.heads tbody tr[data-head='{name(rows[0])}'] td[data-metric={metric}]")
        assert float(cell.inner_text()) == float(f"{rows[0][metric]:.4g}")
    first = table_heads(page)[0]
    page.locator("table.heads tbody tr").first.locator("th a").click()
    layer, head = re.fullmatch(r"L(\d+)H(\d+)", first).groups()
    expect(page).to_have_url(re.compile(rf"\?layer={layer}&head={head}&tab=sequences$"))


def label_names(page) -> set[str]:
    return set(page.locator("text.point-label").evaluate_all("els => els.map(e => e.dataset.label)"))


def test_the_scatter_plot_labels_its_top_points_and_stays_put_when_the_metric_changes(page, static_site):
    rows = read(static_site.data / "scatter_data.json")
    open_page(page, static_site)
    expect(page.locator("circle.point")).to_have_count(len(rows))
    top = sorted(rows, key=lambda r: (-r["previous_token_score"], r["layer"], r["head"]))[:5]
    assert label_names(page) == {f"L{r['layer']}H{r['head']}" for r in top}
    plot = page.locator("figure.chart svg")
    before = plot.bounding_box()
    for metric in ("bos_score", "qk_distance_variance", "pattern_entropy"):  # descriptions of different lengths
        page.select_option("select[data-axis=x]", metric)
        expect(page).to_have_url(re.compile(rf"x={metric}"))
        assert plot.bounding_box() == before, f"the plot moved when x became {metric}"
    page.select_option("select[data-axis=y]", "bos_score")
    top = sorted(rows, key=lambda r: (-r["bos_score"], r["layer"], r["head"]))[:5]
    expect(page.locator("text.point-label")).to_have_count(5)
    assert label_names(page) == {f"L{r['layer']}H{r['head']}" for r in top}


def test_notes_are_kept_in_the_browser_shown_in_the_table_and_plot_and_exported(page, static_site, tmp_path):
    rows = read(static_site.data / "scatter_data.json")
    lowest = min(rows, key=lambda r: (r["previous_token_score"], r["layer"], r["head"]))  # never a top label
    name = f"L{lowest['layer']}H{lowest['head']}"
    open_page(page, static_site, f"?layer={lowest['layer']}&head={lowest['head']}&tab=metrics")
    page.locator("details.notes summary").click()
    page.fill("[data-note=label]", "sink head")
    page.fill("[data-note=note]", "parks its attention on BOS")
    expect(page.locator("details.notes summary")).to_have_text(f"Your notes on {name}: sink head")
    page.reload()  # kept in the browser
    expect(page.locator("[data-note=label]")).to_have_value("sink head")
    expect(page.locator("[data-note=note]")).to_have_value("parks its attention on BOS")

    open_page(page, static_site)
    expect(page.locator(f"table.heads tr[data-head='{name}'] td.label")).to_have_text("sink head")
    expect(page.locator(f"text.point-label[data-label='{name}']")).to_have_text(f"{name} sink head")
    with page.expect_download() as download:
        page.click("[data-action=export-notes]")
    saved = tmp_path / "notes.json"
    download.value.save_as(saved)
    exported = read(saved)
    config = read(static_site.data / "config.json")
    assert exported == {"model": config["model_name"], "weights_sha256": config["model"]["weights_sha256"],
                        "heads": {name: {"label": "sink head", "note": "parks its attention on BOS"}}}

    open_page(page, static_site, f"?layer={lowest['layer']}&head={lowest['head']}&tab=metrics")
    page.fill("[data-note=label]", "")
    page.fill("[data-note=note]", "")  # an empty note is removed
    open_page(page, static_site)
    expect(page.locator("[data-action=export-notes]")).to_have_count(0)
    expect(page.locator(f"text.point-label[data-label='{name}']")).to_have_count(0)


def add_prompt(site: Site, layer: int, head: int, text: str) -> dict:
    """add_custom_sequence as the page calls it (the context of server_config.json)."""
    import urllib.request

    body = {"context": read(site.data / "server_config.json")["context"], "layer": layer, "head": head, "text": text}
    request = urllib.request.Request(f"{site.url}api/head_vis/public/add_custom_sequence/v0",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=90) as response:
        return json.loads(response.read())


THUMB_PIXELS = """canvas => {
  const ctx = canvas.getContext('2d');
  const { data } = ctx.getImageData(0, 0, canvas.width, canvas.height);
  let shaded = 0, sum = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i] < 250) { shaded++; sum += 255 - data[i]; }
  return [shaded, sum];
}"""


def test_every_head_on_a_custom_prompt_as_thumbnails_that_open_the_head(page, live):
    record = add_prompt(live, 3, 4, "The cat sat on the mat. The cat sat")
    sid = record["sequence_id"]
    page.goto(live.url + "?layer=3&head=4&tab=sequences&interval=-1")
    expect(page.locator(".mode[data-mode=server]")).to_be_visible()
    article = page.locator(f"article.sequence[data-seq='{sid}']")
    article.locator("[data-action=model-view]").click()
    view = page.locator(f"[data-model-view='{sid}']")
    expect(view).to_have_attribute("data-loaded", str(len(LAYERS) * len(HEADS)))
    thumbs = view.locator("a[data-thumb]")
    expect(thumbs).to_have_count(len(LAYERS) * len(HEADS))
    ink = {name: thumbs.locator("canvas").nth(i).evaluate(THUMB_PIXELS)
           for i, name in enumerate(thumbs.evaluate_all("els => els.map(e => e.dataset.thumb)"))}
    assert all(shaded > 0 for shaded, _ in ink.values()), ink
    assert len({total for _, total in ink.values()}) > 1, "every head's thumbnail looks the same"
    page.locator("input[data-control=sinks]").check()  # column 0 out: the thumbnails redraw
    expect(page).to_have_url(re.compile(r"sinks=hide"))
    after = thumbs.locator("canvas").first.evaluate(THUMB_PIXELS)
    assert after != ink[thumbs.first.get_attribute("data-thumb")]
    view.locator("a[data-thumb='L1H0']").click()
    expect(page).to_have_url(re.compile(r"\?layer=1&head=0&tab=sequences&interval=-1&sinks=hide$"))
    expect(page.locator(f"article.sequence[data-seq='{sid}']")).to_have_count(1)


def test_a_top_token_links_to_its_occurrences_in_the_shown_sequences(page, static_site):
    head = read(static_site.data / "heads" / "L1H0.json")
    token = head["top_key_tokens"][0]
    per_interval: dict[int, int] = {}
    for seq in head["sequences"]:
        n = seq["token_ids"].count(token["id"])
        if n:
            per_interval[seq["interval"]] = per_interval.get(seq["interval"], 0) + n
    assert per_interval, "the top key token occurs in some shown sequence"
    assert all(row["count"] >= 5 for row in head["top_query_tokens"])  # the minimum count of the query ranking
    open_page(page, static_site, "?layer=1&head=0&tab=metrics")
    page.locator(f"table[aria-label='as key'] a[data-token-id='{token['id']}']").click()
    expect(page).to_have_url(re.compile(rf"\?layer=1&head=0&tab=sequences&token={token['id']}$"))
    banner = page.locator(f"[data-token-banner='{token['id']}']")
    expect(banner).to_contain_text(f"id {token['id']}")
    links = banner.locator("a[data-token-interval]")
    expect(links).to_have_count(len(per_interval))
    assert links.all_text_contents() == [f"interval {i}: {n}×" for i, n in sorted(per_interval.items(), reverse=True)]
    for interval, n in per_interval.items():
        banner.locator(f"a[data-token-interval='{interval}']").click()
        expect(page.locator(f"section.sequences[data-shown-interval='{interval}']")).to_be_visible()
        expect(page.locator("span.token.occurrence")).to_have_count(n)
    banner.locator("[data-action=clear-token]").click()
    expect(page.locator("[data-token-banner]")).to_have_count(0)
    expect(page.locator("span.token.occurrence")).to_have_count(0)


def test_go_to_the_strongest_pair_pins_its_query_and_selects_its_cell(page, static_site):
    seq = next(s for s in read(static_site.data / "heads" / "L3H4.json")["sequences"] if s["interval"] == 10)
    q, k = seq["argmax"]
    open_page(page, static_site, "?layer=3&head=4&tab=sequences&interval=10")
    article = page.locator(f"article.sequence[data-seq='{seq['sequence_id']}']")
    article.locator("[data-action=argmax]").click()
    expect(page).to_have_url(re.compile(rf"seq={seq['sequence_id']}&pin={q}&cell={q},{k}$"))
    expect(article.locator(f".cell-info[data-cell='{q},{k}']")).to_contain_text(f"= {seq['max_activation']:.4g}")
    expect(article.locator(f"span.token[data-pos='{q}']")).to_be_in_viewport()

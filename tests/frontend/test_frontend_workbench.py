"""The sequences tab's workbench in a real browser: the attention heatmap, the sink switch, pins and cells in the
URL, the sticky panel of a row's strongest keys over 1024-token sequences, the interval labels, and what a
server offers for a selected cell (conftest.py has the setup).

The heatmap is read back from its canvas (the centre pixel of every cell of the
view, in the backing store) and compared with the stored COO entries; the
tokens by every token's data-weight and data-shade; the keys panel by where its
tokens are on the screen; the URL by opening it again in a fresh page.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from browser import checked_page
from frontend_helpers import Site, eventually, missing
from test_frontend_pages import coo_rows, interval_sequences, maxima, open_page, read, token_weights, write

try:
    import playwright.sync_api as playwright_api
except ImportError:
    missing("Playwright is not installed: pip install -e '.[dev]'", module=True)
expect = playwright_api.expect

BLUE = (40, 89, 197)  # a stored entry: rgba(40, 89, 197, min(1, p / top)) on white
WHITE = (255, 255, 255)
SINK_TINT = 0.06  # column 0 with the sinks hidden: rgba(0, 0, 0, 0.06) on white
RED = (212, 61, 26)  # #d43d1a: the selected cell's ring and the pinned row's mark
TOLERANCE = 2  # of 255: the 8-bit alpha and the canvas' rounding
PANEL_KEYS = 8  # positions the keys panel lists

# [q, k, r, g, b] of the centre pixel of every cell of the canvas' view (data-view = "q0,k0,span"), read from the
# backing store: CSS pixels times canvas.width / its CSS width (devicePixelRatio)
HEATMAP_CENTRES = """canvas => {
  const [q0, k0, span] = canvas.dataset.view.split(',').map(Number);
  const margin = Number(canvas.dataset.margin), size = Number(canvas.dataset.size);
  const rect = canvas.getBoundingClientRect();
  const sx = canvas.width / rect.width, sy = canvas.height / rect.height;
  const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  const cells = [];
  for (let i = 0; i < span; i++) for (let j = 0; j < span; j++) {
    const x = Math.floor((margin + (j + 0.5) * size / span) * sx);
    const y = Math.floor((margin + (i + 0.5) * size / span) * sy);
    const at = 4 * (y * canvas.width + x);
    cells.push([q0 + i, k0 + j, pixels[at], pixels[at + 1], pixels[at + 2]]);
  }
  return cells;
}"""

# [r, g, b] of the backing store's pixel at CSS point (x, y) of the canvas
PIXEL_AT = """(canvas, [x, y]) => {
  const rect = canvas.getBoundingClientRect();
  const at = [Math.floor(x * canvas.width / rect.width), Math.floor(y * canvas.height / rect.height)];
  return Array.from(canvas.getContext('2d').getImageData(at[0], at[1], 1, 1).data.slice(0, 3));
}"""

# for each position of the keys panel: [pos, its token's top and bottom on the screen, the button's data-offscreen]
PANEL_STATE = """article => {
  const panel = article.querySelector('[data-keys-panel]');
  return Array.from(panel.querySelectorAll('[data-key-pos]'), (button) => {
    const rect = article.querySelector(`span.token[data-pos="${button.dataset.keyPos}"]`).getBoundingClientRect();
    return [Number(button.dataset.keyPos), rect.top, rect.bottom, button.dataset.offscreen ?? null];
  });
}"""


def token_shades(article) -> list[float]:
    return [float(s) for s in article.locator("span.token").evaluate_all("els => els.map(e => e.dataset.shade)")]


def listed(weights: list[float]) -> list[int]:
    """The keys panel's positions: the PANEL_KEYS largest positive weights, heaviest first (ties: lower first)."""
    return sorted((p for p, w in enumerate(weights) if w > 0), key=lambda p: (-weights[p], p))[:PANEL_KEYS]


def shaded(alpha: float) -> tuple[float, float, float]:
    """BLUE at `alpha` over white."""
    return tuple(255 + (c - 255) * alpha for c in BLUE)


def heatmap_colors(seq: dict, sinks: bool):
    """(q, k) -> the colour the heatmap gives the cell: the stored entry's over `top` (1 with the sinks shown,
    else the largest stored p[q, k] with k >= 1), white where nothing is stored, column 0 tinted when hidden."""
    rows = coo_rows(seq)
    top = 1.0 if sinks else max(v for row in rows.values() for k, v in row.items() if k >= 1)
    tint = tuple(255 * (1 - SINK_TINT) for _ in range(3))

    def color(q: int, k: int) -> tuple[float, float, float]:
        if not sinks and k == 0:
            return tint
        value = rows.get(q, {}).get(k)
        return WHITE if value is None else shaded(min(1.0, value / top))

    return color


def view_of(canvas) -> tuple[int, int, int]:
    q0, k0, span = map(int, canvas.get_attribute("data-view").split(","))
    return q0, k0, span


def assert_heatmap(canvas, seq: dict, sinks: bool, skip: set[tuple[int, int]]) -> int:
    """Every cell of the view but `skip` (the rings) has its colour within TOLERANCE; returns how many were stored."""
    assert canvas.get_attribute("data-sinks") == str(sinks).lower()
    color = heatmap_colors(seq, sinks)
    rows = coo_rows(seq)
    wrong, stored = [], 0
    for q, k, *drawn in canvas.evaluate(HEATMAP_CENTRES):
        if (q, k) in skip:
            continue
        stored += k in rows.get(q, {})
        want = color(q, k)
        if max(abs(d - w) for d, w in zip(drawn, want)) > TOLERANCE:
            wrong.append((q, k, tuple(drawn), tuple(round(w, 1) for w in want)))
    assert not wrong, f"{len(wrong)} cells drawn wrong, as (q, k, drawn, expected): {wrong[:6]}"
    return stored


def cell_point(canvas, q: int, k: int) -> tuple[float, float]:
    """Where on the screen the centre of cell (q, k) of the view is (the page's own cell-to-pixel mapping)."""
    box = canvas.bounding_box()
    q0, k0, span = view_of(canvas)
    margin, size = int(canvas.get_attribute("data-margin")), int(canvas.get_attribute("data-size"))
    assert q0 <= q < q0 + span and k0 <= k < k0 + span, f"({q}, {k}) is outside the view {q0, k0, span}"
    x = margin + (k - k0 + 0.5) * size / span
    y = margin + (q - q0 + 0.5) * size / span
    return box["x"] + x * box["width"] / (margin + size), box["y"] + y * box["height"] / (margin + size)


def next_frames(page) -> None:
    """Wait until the page has drawn two more frames: by then the browser has re-targeted the pointer after a layout
    change."""
    page.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")


def point_at(page, canvas, q: int, k: int) -> tuple[float, float]:
    """Move the pointer onto cell (q, k) of the heatmap, as a user aims: once, then again where the cell is now (the
    first move may bring up the keys panel above the map and push the map down: a bug,
    test_pointing_at_a_token_or_the_heatmap_leaves_it_under_the_pointer)."""
    page.mouse.move(*cell_point(canvas, q, k))
    next_frames(page)
    point = cell_point(canvas, q, k)
    assert 0 <= point[1] <= page.evaluate("innerHeight"), f"cell ({q}, {k}) is off the screen"
    page.mouse.move(*point)
    return point


def pin(article, pos: int) -> None:
    """Pin token `pos` with a click event on it, the pointer left where it is: a real pointer on an unpinned
    sequence brings up the keys panel above the tokens, which pushes them from under it (the same bug), and the
    click lands on another token, or the panel flickers and no click lands at all."""
    article.locator(f"span.token[data-pos='{pos}']").dispatch_event("click")
    expect(article.locator(f"[data-keys-panel='{pos}']")).to_be_visible()


def open_heatmap(article, seq: dict):
    article.locator("[data-action=heatmap]").click()
    canvas = article.locator(f"figure[data-heatmap='{seq['sequence_id']}'] canvas[data-view]")
    expect(canvas).to_have_attribute("data-view", f"0,0,{seq['seq_len']}")
    canvas.evaluate("e => e.scrollIntoView({block: 'center'})")  # all of it on the screen
    return canvas


def assert_pixel(canvas, point: tuple[float, float], want: tuple[int, int, int], what: str) -> None:
    drawn = canvas.evaluate(PIXEL_AT, list(point))
    assert max(abs(d - w) for d, w in zip(drawn, want)) <= TOLERANCE, f"{what}: drawn {drawn}, expected {want}"


def sequence(page, seq: dict):
    """The sequence's article, once all its tokens are drawn."""
    article = page.locator(f"article.sequence[data-seq='{seq['sequence_id']}']")
    expect(article.locator("span.token")).to_have_count(seq["seq_len"])
    return article


def row_of(seq: dict, q: int) -> list[float]:
    stored = coo_rows(seq).get(q, {})
    return [stored.get(k, 0.0) for k in range(seq["seq_len"])]


def column_of(seq: dict, k: int) -> list[float]:
    rows = coo_rows(seq)
    return [rows.get(q, {}).get(k, 0.0) for q in range(seq["seq_len"])]


def assert_weights(article, want: list[float]) -> None:
    assert token_weights(article) == pytest.approx(want, abs=1e-12)


def assert_listed(panel, want: list[int]) -> None:
    drawn = panel.locator("[data-key-pos]").evaluate_all("els => els.map(e => Number(e.dataset.keyPos))")
    assert drawn == want


# -- the heatmap

def test_the_heatmap_draws_each_stored_entry_at_its_weight_and_rescales_without_the_sink(page, static_site):
    # the sequence of L3H4 with the weakest strongest pair and a stored sink column: hiding the sink rescales by
    # 1 / max_activation, several times over
    seq = min((s for s in read(static_site.data / "heads" / "L3H4.json")["sequences"]
               if any(0 in row for row in coo_rows(s).values())), key=lambda s: s["max_activation"])
    rows = coo_rows(seq)
    n = seq["seq_len"]
    assert seq["max_activation"] < 0.5, "the fixture has a sequence whose weights outside column 0 are all small"
    argmax = tuple(seq["argmax"])
    open_page(page, static_site, f"?layer=3&head=4&tab=sequences&interval={seq['interval']}")
    article = sequence(page, seq)
    expect(article.locator("figure[data-heatmap]")).to_have_count(0)
    canvas = open_heatmap(article, seq)
    expect(article.locator("[data-action=heatmap]")).to_have_attribute("aria-pressed", "true")
    stored = eventually(page, lambda: assert_heatmap(canvas, seq, sinks=True, skip={argmax}))
    assert 0 < stored < n * n - 1, "the view holds both stored and unstored cells"

    # the tooltip reads the stored value: the strongest pair, a sink entry, a cell that holds nothing
    sink_q = next(q for q in sorted(rows) if q >= 1 and 0 in rows[q])
    empty = next((q, k) for q in range(1, n) for k in range(1, q) if k not in rows.get(q, {}))
    tip = article.locator(".tip[data-hover]")
    for (q, k), value in ((argmax, seq["max_activation"]), ((sink_q, 0), rows[sink_q][0]), (empty, 0.0)):
        point_at(page, canvas, q, k)
        expect(tip).to_have_attribute("data-hover", f"{q},{k}")
        assert float(tip.get_attribute("data-hover-weight")) == pytest.approx(value, abs=1e-12)
        expect(tip).to_contain_text(f"p[{q}, {k}] = {value:.4g}")
    expect(tip).to_contain_text("(not stored)")  # the last one
    page.mouse.move(0, 0)
    expect(tip).to_have_count(0)

    # the sinks hidden: column 0 undrawn and tinted, the rest over the largest weight outside it
    page.check("input[data-control=sinks]")
    expect(page).to_have_url(re.compile(r"&sinks=hide$"))
    expect(canvas).to_have_attribute("data-sinks", "false")
    eventually(page, lambda: assert_heatmap(canvas, seq, sinks=False, skip={argmax}))
    canvas.evaluate("e => e.scrollIntoView({block: 'center'})")
    q, k = argmax
    point_at(page, canvas, q, k)
    expect(tip).to_have_attribute("data-hover", f"{q},{k}")  # the value stays the stored one, not the shade
    assert float(tip.get_attribute("data-hover-weight")) == pytest.approx(seq["max_activation"], abs=1e-12)


# what is under the pointer at (x, y), in one snapshot: the token, the sequence's status line and its keys panel
UNDER_POINTER = """([x, y]) => {
  const hit = document.elementFromPoint(x, y);
  const article = hit?.closest('article.sequence');
  return {pos: hit?.dataset.pos ?? null, status: article?.querySelector('.status').textContent ?? '',
          panel: article?.querySelector('[data-keys-panel]')?.dataset.keysPanel ?? null};
}"""


def test_pointing_at_a_token_or_the_heatmap_leaves_it_under_the_pointer(page, static_site):
    """Pointing at a token brings up the keys panel; the token, and the heatmap's cell, must stay under the pointer,
    or the row shown is that of whatever slides under it (a token of the line above, or none: then the panel goes,
    the tokens move back, and it flickers)."""
    seq = interval_sequences(static_site.data, 3, 4)[0]
    q, k = seq["argmax"]
    open_page(page, static_site, "?layer=3&head=4&tab=sequences&interval=10")
    article = sequence(page, seq)
    moved = []
    for pos in (0, q):  # a token of the first line, and one further down
        token = article.locator(f"span.token[data-pos='{pos}']")
        token.evaluate("e => e.scrollIntoView({block: 'center'})")
        box = token.bounding_box()
        point = [box["x"] + box["width"] / 2, box["y"] + box["height"] / 2]
        page.mouse.move(*point)
        next_frames(page)
        under = page.evaluate(UNDER_POINTER, point)
        shift = token.bounding_box()["y"] - box["y"]
        if (under["pos"], under["panel"]) != (str(pos), str(pos)) or f"Row of query {pos} " not in under["status"]:
            moved.append(f"token {pos}: moved {shift:+.0f} px; under the pointer now {under}")
        page.mouse.move(0, 0)
        expect(article.locator("[data-keys-panel]")).to_have_count(0)

    canvas = open_heatmap(article, seq)
    box = canvas.bounding_box()
    point = cell_point(canvas, q, k)
    page.mouse.move(*point)
    next_frames(page)
    page.mouse.move(point[0] + 0.5, point[1])  # a hair further: still cell (q, k)
    next_frames(page)
    hovered = article.locator(".tip[data-hover]").get_attribute("data-hover")
    shift = canvas.bounding_box()["y"] - box["y"]
    if shift or hovered != f"{q},{k}":
        moved.append(f"the heatmap: moved {shift:+.0f} px when the pointer came onto cell ({q}, {k}), "
                     f"the pointer now over cell ({hovered})")
    assert not moved, "pointing moved what it points at: " + "; ".join(moved)


# -- the sink switch

def test_the_sink_switch_rescales_the_shading_stays_in_the_url_and_picks_the_distance_histogram(page, static_site):
    seq = interval_sequences(static_site.data, 3, 4)[0]
    rows = coo_rows(seq)
    at_rest = maxima(seq, "query")
    base = "?layer=3&head=4&tab=sequences&interval=10"

    def shading(weights: list[float], shades: list[float]) -> None:
        assert token_weights(article) == pytest.approx(weights, abs=1e-12)
        assert token_shades(article) == pytest.approx(shades, abs=1e-12)

    open_page(page, static_site, base)
    article = sequence(page, seq)
    # the row below the first line (pointing there moves nothing yet) that parks the most on the sink, relative to
    # its strongest other key
    tops = article.locator("span.token").evaluate_all("els => els.map(e => e.getBoundingClientRect().top)")
    q = max((q for q, row in rows.items() if 0 in row and any(k >= 1 for k in row) and tops[q] > tops[0] + 1),
            key=lambda q: rows[q][0] / max(v for k, v in rows[q].items() if k >= 1))
    row = row_of(seq, q)
    hidden = [0.0] + row[1:]
    rescaled = [w / max(hidden) for w in hidden]
    assert 0 in listed(row) and rescaled != pytest.approx(row, abs=0.05), "the sink changes the fixture's row"

    switch = page.locator("input[data-control=sinks]")
    expect(switch).not_to_be_checked()
    eventually(page, lambda: shading(at_rest, at_rest))  # shown: the shade is the weight
    pin(article, q)
    expect(page).to_have_url(re.compile(rf"{re.escape(base)}&seq={seq['sequence_id']}&pin={q}$"))
    panel = article.locator(f"[data-keys-panel='{q}']")
    eventually(page, lambda: shading(row, row))
    eventually(page, lambda: assert_listed(panel, listed(row)))

    switch.check()
    expect(page).to_have_url(re.compile(rf"{re.escape(base)}&sinks=hide&seq={seq['sequence_id']}&pin={q}$"))
    eventually(page, lambda: shading(hidden, rescaled))
    eventually(page, lambda: assert_listed(panel, listed(hidden)))
    page.reload()
    article = sequence(page, seq)
    expect(switch).to_be_checked()
    expect(panel).to_be_visible()
    eventually(page, lambda: shading(hidden, rescaled))  # the pinned row, the pointer elsewhere
    article.locator(f"span.token[data-pos='{q}']").click()  # unpins
    expect(page).to_have_url(re.compile(rf"{re.escape(base)}&sinks=hide$"))
    page.mouse.move(0, 0)
    eventually(page, lambda: shading(at_rest, [w / max(at_rest) for w in at_rest]))

    # the metrics tab: the distance histogram without column 0, then with it
    head = read(static_site.data / "heads" / "L3H4.json")
    whole, no_sink = head["qk_distance_histogram"], head["qk_distance_histogram_no_sink"]
    assert no_sink["bin_edges"] == whole["bin_edges"]
    assert no_sink["bin_values"] != pytest.approx(whole["bin_values"], rel=0.05), "the fixture's head parks on the sink"
    bars = page.locator("svg[aria-label='attention weight by query-key distance'] rect.bar")

    def follows(values: list[float]) -> None:
        heights = [float(h) for h in bars.evaluate_all("els => els.map(e => e.getAttribute('height'))")]
        assert len(heights) == len(values)
        top = max(range(len(values)), key=values.__getitem__)
        assert heights == pytest.approx([heights[top] * v / values[top] for v in values], abs=1e-6)

    page.click("[data-tab=metrics]")
    expect(page).to_have_url(re.compile(r"tab=metrics.*&sinks=hide"))
    expect(page.locator("[data-distance-sinks]")).to_have_attribute("data-distance-sinks", "hidden")
    eventually(page, lambda: follows(no_sink["bin_values"]))
    switch.uncheck()
    expect(page).not_to_have_url(re.compile(r"sinks="))
    expect(page.locator("[data-distance-sinks]")).to_have_attribute("data-distance-sinks", "shown")
    eventually(page, lambda: follows(whole["bin_values"]))


# -- pins and cells in the URL

def test_a_pinned_token_and_a_selected_cell_live_in_the_url_and_open_again_in_a_fresh_page(page, browser,
                                                                                          static_site):
    first, second = interval_sequences(static_site.data, 3, 4)[:2]
    base = "?layer=3&head=4&tab=sequences&interval=10"
    open_page(page, static_site, base)
    entries = page.evaluate("history.length")
    article = sequence(page, first)
    q, k = first["argmax"]
    pin(article, q)
    expect(page).to_have_url(re.compile(rf"{re.escape(base)}&seq={first['sequence_id']}&pin={q}$"))
    article.locator(f"span.token[data-pos='{k}']").click()
    expect(page).to_have_url(re.compile(rf"{re.escape(base)}&seq={first['sequence_id']}&pin={q}&cell={q},{k}$"))
    expect(article.locator(f".cell-info[data-cell='{q},{k}']")).to_contain_text(
        f"p[{q}, {k}] = {first['max_activation']:.4g}")

    # a click on the other sequence's heatmap moves the pin and the cell there
    rows = coo_rows(second)
    q2, k2 = next((q2, k2) for q2 in sorted(rows, reverse=True) for k2 in sorted(rows[q2])
                  if k2 >= 1 and k2 != q2 and (q2, k2) != tuple(second["argmax"]))
    other = sequence(page, second)
    canvas = open_heatmap(other, second)
    page.mouse.click(*point_at(page, canvas, q2, k2))
    expect(page).to_have_url(re.compile(rf"{re.escape(base)}&seq={second['sequence_id']}&pin={q2}&cell={q2},{k2}$"))
    expect(other.locator(f".cell-info[data-cell='{q2},{k2}']")).to_contain_text(
        f"p[{q2}, {k2}] = {rows[q2][k2]:.4g}")
    expect(article.locator("[data-keys-panel]")).to_have_count(0)
    expect(article.locator(".cell-info")).to_have_count(0)
    assert page.evaluate("history.length") == entries, "pins and cells replace the history entry"

    with checked_page(browser, width=1280, timeout_ms=15_000, what="the fresh page") as fresh:
        fresh.goto(page.url)
        again = sequence(fresh, second)
        expect(again.locator(f"[data-keys-panel='{q2}']")).to_be_visible()
        expect(again.locator(".status")).to_contain_text(f"Row of query {q2} ")
        eventually(fresh, lambda: assert_weights(again, row_of(second, q2)))
        expect(again.locator("span.token.cell")).to_have_attribute("data-pos", str(k2))
        expect(again.locator(f".cell-info[data-cell='{q2},{k2}']")).to_contain_text(f"p[{q2}, {k2}] = ")
        expect(sequence(fresh, first).locator("[data-keys-panel]")).to_have_count(0)
        # its heatmap rings the cell and marks the row (a bar left of the map), in red
        canvas = open_heatmap(again, second)
        margin, size = int(canvas.get_attribute("data-margin")), int(canvas.get_attribute("data-size"))
        px = size / second["seq_len"]
        eventually(fresh, lambda: assert_pixel(canvas, (margin + k2 * px + 1, margin + (q2 + 0.5) * px), RED,
                                               "the selected cell's ring"))
        assert_pixel(canvas, (margin - 4, margin + (q2 + 0.5) * px), RED, "the pinned row's mark")

    # transposed, the heatmap pins the key: its column
    open_page(page, static_site, base + "&transpose=true")
    article = sequence(page, first)
    canvas = open_heatmap(article, first)
    rows = coo_rows(first)
    q3, k3 = next((q3, k3) for q3 in sorted(rows) for k3 in sorted(rows[q3]) if 1 <= k3 < q3)
    page.mouse.click(*point_at(page, canvas, q3, k3))
    expect(page).to_have_url(re.compile(rf"transpose=true&seq={first['sequence_id']}&pin={k3}&cell={q3},{k3}$"))
    with checked_page(browser, width=1280, timeout_ms=15_000, what="the fresh page") as fresh:
        fresh.goto(page.url)
        again = sequence(fresh, first)
        expect(again.locator(".status")).to_contain_text(f"Column of key {k3} ")
        eventually(fresh, lambda: assert_weights(again, column_of(first, k3)))
        expect(again.locator("span.token.cell")).to_have_attribute("data-pos", str(q3))
        expect(again.locator(f".cell-info[data-cell='{q3},{k3}']")).to_be_visible()


# -- long sequences

def _far_row(seq: dict) -> tuple[int, int]:
    """(q, k): the row whose listed keys reach the farthest back, and that key."""
    return max(((q, k) for q in coo_rows(seq) for k in listed(row_of(seq, q))), key=lambda qk: qk[0] - qk[1])


def test_the_keys_panel_stays_on_screen_over_a_long_sequence_and_brings_back_an_offscreen_key(page, long_site):
    seq = interval_sequences(long_site.data, 1, 0)[0]
    assert seq["seq_len"] == 1024
    q, far = _far_row(seq)
    keys = listed(row_of(seq, q))
    assert q - far > 500, f"the fixture's row {q} has a strongest key far away (found {far})"
    open_page(page, long_site, "?layer=1&head=0&tab=sequences&interval=10")
    article = sequence(page, seq)
    token = article.locator(f"span.token[data-pos='{q}']")
    pin(article, q)
    expect(page).to_have_url(re.compile(rf"&seq={seq['sequence_id']}&pin={q}$"))
    panel = article.locator(f"[data-keys-panel='{q}']")
    eventually(page, lambda: assert_listed(panel, keys))
    height = page.evaluate("innerHeight")

    def marks() -> dict[int, str | None]:
        """The panel's marks, each as where its token is: 'above' or 'below' the screen, or None on it."""
        state = article.evaluate(PANEL_STATE)
        where = {pos: "above" if bottom < 0 else "below" if top > height else None for pos, top, bottom, _ in state}
        drawn = {pos: mark for pos, _, _, mark in state}
        assert drawn == where
        return drawn

    def on_screen(locator) -> None:
        box = locator.bounding_box()
        assert box is not None and box["y"] >= -0.5 and box["y"] + box["height"] <= height + 0.5, box

    token.evaluate("e => e.scrollIntoView({block: 'center'})")
    assert eventually(page, marks)[far] == "above", "the far key is scrolled off the top"

    # scrolling through the sequence: the panel stays on the screen, stuck to its top once the article is above it
    tokens_box = article.locator(".tokens").evaluate(
        "e => { const r = e.getBoundingClientRect(); return [r.top + scrollY, r.bottom + scrollY]; }")
    stops = [round(tokens_box[0] + i * (tokens_box[1] - height - tokens_box[0]) / 5) for i in range(6)]
    assert stops[-1] - stops[0] > height, "the sequence is taller than two screens"
    for y in stops:
        page.evaluate("y => window.scrollTo(0, y)", y)
        eventually(page, lambda: on_screen(panel))
        if article.bounding_box()["y"] < -100:
            assert abs(panel.bounding_box()["y"]) < 1, "the panel sticks to the top of the screen"
        eventually(page, marks)

    # a click on the far key brings its token on screen and, the row pinned, selects the cell
    token.evaluate("e => e.scrollIntoView({block: 'center'})")
    assert eventually(page, marks)[far] == "above"
    panel.locator(f"[data-key-pos='{far}']").click()
    expect(page).to_have_url(re.compile(rf"&seq={seq['sequence_id']}&pin={q}&cell={q},{far}$"))
    eventually(page, lambda: on_screen(article.locator(f"span.token[data-pos='{far}']")))
    expect(panel.locator(f"[data-key-pos='{far}']")).not_to_have_attribute("data-offscreen", re.compile(r".*"))
    now = eventually(page, marks)
    assert now[far] is None and "below" in now.values(), f"the pinned row's own keys are below the screen now: {now}"
    expect(article.locator(f".cell-info[data-cell='{q},{far}']")).to_be_attached()

    # its heatmap: zoomed in a minimap shows, and the strongest pair is brought into the view and drawn right
    canvas = open_heatmap(article, seq)
    figure = article.locator(f"figure[data-heatmap='{seq['sequence_id']}']")
    minimap = figure.locator("canvas.minimap[data-minimap]")
    expect(minimap).to_have_count(0)
    figure.locator("button[aria-label='zoom in']").click()
    expect(canvas).to_have_attribute("data-view", "256,256,512")
    expect(minimap).to_have_attribute("data-minimap", "256,256,512")
    figure.locator("button[aria-label='zoom out']").click()
    expect(canvas).to_have_attribute("data-view", "0,0,1024")
    expect(minimap).to_have_count(0)
    figure.locator("button[aria-label='zoom in']").click()
    expect(minimap).to_be_visible()
    figure.locator("[data-action=heatmap-argmax]").click()
    aq, ak = seq["argmax"]
    expect(canvas).not_to_have_attribute("data-view", "256,256,512")
    q0, k0, span = view_of(canvas)
    assert q0 <= aq < q0 + span and k0 <= ak < k0 + span and span < 512, (q0, k0, span)
    expect(minimap).to_have_attribute("data-minimap", f"{q0},{k0},{span}")
    stored = eventually(page, lambda: assert_heatmap(canvas, seq, sinks=True, skip={(aq, ak), (q, far)}))
    assert stored > 0


# -- the interval selector

def test_each_interval_link_counts_the_sequences_it_shows_and_an_empty_one_says_why(page, static_site, long_site):
    # L1H0 shows fewer sequences than its deciles hold: one of a two-sequence interval, none of another
    path = static_site.data / "heads" / "L1H0.json"
    head = read(path)
    counts = Counter(s["interval"] for s in head["sequences"])
    halved = next(i for i in sorted(counts) if i != 10 and counts[i] >= 2)
    emptied = next(i for i in sorted(counts) if i != 10 and counts[i] == 1)
    dropped = next(s for s in head["sequences"] if s["interval"] == halved)
    head["sequences"] = [s for s in head["sequences"] if s is not dropped and s["interval"] != emptied]
    write(path, head)
    shown = Counter(s["interval"] for s in head["sequences"])

    def check_labels(site: Site, layer: int, head_index: int, shown: Counter, n_intervals: int) -> None:
        open_page(page, site, f"?layer={layer}&head={head_index}&tab=sequences&interval=10")
        expect(page.locator("nav.intervals a[data-interval]")).to_have_count(n_intervals)
        for i in range(1, n_intervals + 1):
            link = page.locator(f"a[data-interval='{i}']")
            expect(link).to_have_attribute("data-shown", str(shown[i]))
            expect(link).to_contain_text(re.compile(rf"\b{shown[i]} shown$"))

    check_labels(static_site, 1, 0, shown, len(head["interval_counts"]))
    assert shown[halved] != head["interval_counts"][halved - 1] and shown[emptied] == 0
    page.click(f"a[data-interval='{halved}']")
    expect(page.locator("article.sequence")).to_have_count(shown[halved])
    page.click(f"a[data-interval='{emptied}']")
    expect(page).to_have_url(re.compile(rf"interval={emptied}$"))
    expect(page.locator("article.sequence")).to_have_count(0)
    expect(page.locator("p.empty")).to_contain_text(
        f"None of this interval's {head['interval_counts'][emptied - 1]} sequence")

    # the long scan: 3 sequences over 10 deciles, so most intervals hold none at all
    long_head = read(long_site.data / "heads" / "L1H0.json")
    assert sum(n > 0 for n in long_head["interval_counts"]) == 3
    check_labels(long_site, 1, 0, Counter(s["interval"] for s in long_head["sequences"]),
                 len(long_head["interval_counts"]))
    none = long_head["interval_counts"].index(0) + 1
    page.click(f"a[data-interval='{none}']")
    expect(page.locator("p.empty")).to_have_text("No scanned sequence has a max activation in this interval.")


# -- server mode: what a selected cell offers

def _select(page, site: Site, layer: int, head: int) -> tuple:
    """Open the head's top interval with a server and select the first sequence's strongest pair."""
    seq = interval_sequences(site.data, layer, head)[0]
    q, k = seq["argmax"]
    open_page(page, site, f"?layer={layer}&head={head}&tab=sequences&interval=10", mode="server")
    article = sequence(page, seq)
    pin(article, q)
    article.locator(f"span.token[data-pos='{k}']").click()
    info = article.locator(f".cell-info[data-cell='{q},{k}']")
    expect(info).to_be_visible()
    return article, info


def test_a_server_without_a_dictionary_offers_no_attribution_for_a_cell(page, live):
    assert read(live.data / "server_config.json")["capabilities"] == {"attribution_layers": []}
    article, info = _select(page, live, 1, 0)
    expect(info.locator("[data-no-attribution]")).to_contain_text("the server has no dictionary of layer 1's input")
    expect(article.locator("[data-attribution]")).to_have_count(0)
    expect(info.locator("[data-action=project]")).to_be_visible()  # what the server can do is still offered


def test_a_server_offers_attributions_for_the_layers_of_its_dictionaries_only(page, live_attr):
    assert read(live_attr.data / "server_config.json")["capabilities"] == {"attribution_layers": [1]}
    article, info = _select(page, live_attr, 1, 0)
    for kind in ("qk", "ov"):
        expect(info.locator(f"[data-attribution={kind}]")).to_have_attribute("data-cached", "false")
    expect(info.locator("[data-no-attribution]")).to_have_count(0)
    article, info = _select(page, live_attr, 3, 4)
    expect(info.locator("[data-no-attribution]")).to_contain_text("the server has no dictionary of layer 3's input")
    expect(article.locator("[data-attribution]")).to_have_count(0)

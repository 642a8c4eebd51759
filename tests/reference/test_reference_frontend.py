"""headvis' data tree and server in the public reference frontend (CONTRACT.md: "must work in the reference
frontend in every tab").

Every expectation is derived from what the reference sources read (src/Index.svelte,
src/components/*.svelte, src/lib/*.js) and from the scanned files: the number and
order of the examples of an interval, the tokens the reductions colour, the
statistics and tables of the metrics tab, the points Plotly is handed in the UMAP
tab. Server mode goes through the reference UI only: its add-sequence form and
delete button, its lasso-label mode (cluster prompt) and its UMAP projection mode.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from browser import served

pytestmark = pytest.mark.slow

HEAD_CASES = [(1, 0), (3, 4)]  # two of the scan's heads (conftest: layers 1, 3 x heads 0, 1, 4)
ORANGE = "rgba(255, 100, 0, 0.9)"  # UmapView's selected-point marker


# --- the scanned files ------------------------------------------------------------------------------------------


def load(data: Path, rel: str):
    path = data / rel
    return json.loads(path.read_text()) if path.exists() else None


def head_file(data: Path, layer: int, head: int) -> dict:
    return load(data, f"heads/L{layer}H{head}.json")


def umap_file(data: Path, layer: int, head: int) -> dict:
    return load(data, f"umap/L{layer}H{head}.json")


# --- the reference's number formatting (MetricsTab.svelte, TokenRankTable.svelte) -------------------------------


def js_fixed(v: float, n: int) -> str:
    return f"{v:.{n}f}"


def js_exp(v: float, n: int) -> str:
    mantissa, exp = f"{v:.{n}e}".split("e")
    e = int(exp)
    return f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"


def format_value(v) -> str:
    if v is None:
        return "-"
    if not isinstance(v, (int, float)):
        return str(v)
    if abs(v) < 0.001 or abs(v) >= 1000:
        return js_exp(v, 2)
    return js_fixed(v, 4)


def format_statistic(v, fmt) -> str:
    if v is None:
        return "-"
    if fmt == "percent":
        return js_fixed(v * 100, 1) + "%"
    if fmt == "integer":
        return str(math.floor(v + 0.5))
    if fmt == "scientific":
        return js_exp(v, 2)
    return format_value(v)


def format_weight(w: float) -> str:
    return js_fixed(w, 0) if w >= 100 else js_fixed(w, 1) if w >= 10 else js_fixed(w, 2)


def render_token(t: str) -> str:  # TokenRankTable.renderToken
    return t.replace("\n", "⏎").replace("\t", "↹").replace("\r", "↵")


VISIBLE = {chr(i): c for i, c in zip(range(16), "␀␁␂␃␄␅␆␇␈↹⏎␋␌␍␎␏")}


def render_visibly(t: str) -> str:  # lib/tokens.js renderStringVisibly (Token.svelte)
    return "".join(VISIBLE.get(c, c) for c in t)


# --- page helpers -----------------------------------------------------------------------------------------------


def wait_until(page, js: str, what: str, timeout_ms: int = 15_000, arg=None):
    """Poll a JS predicate; on timeout fail with `what` and the page's state instead of a bare TimeoutError."""
    from playwright.sync_api import TimeoutError as PwTimeout

    try:
        page.wait_for_function(js, arg=arg, timeout=timeout_ms)
    except PwTimeout:
        state = page.evaluate("""() => ({tab: document.querySelector('.tab-btn.active')?.textContent.trim(),
            examples: document.querySelectorAll('.example').length,
            text: document.querySelector('.tab-content')?.innerText.slice(0, 300)})""")
        pytest.fail(f"timed out waiting for {what}; the page shows {state}; page errors: {page.page_errors}")


def open_sequences(page, site, layer, head, query="", expect=None):
    page.goto(f"{site.url}?layer={layer}&head={head}{query}")
    if expect is None:
        wait_until(page, "() => document.querySelector('.example, .sequences-list .empty')", "the sequences list")
    else:
        wait_until(page, f"() => document.querySelectorAll('.example').length === {expect}",
                   f"{expect} examples of L{layer}H{head} {query}")


def examples(page) -> list[dict]:
    """Per shown example: id, max label, and per token its text and classes."""
    return page.evaluate("""() => Array.from(document.querySelectorAll('.example')).map(ex => ({
        id: ex.querySelector('.sequence-id').textContent.trim(),
        max: ex.querySelector('.max-act').textContent.trim(),
        tokens: Array.from(ex.querySelectorAll('.tokens .token')).map(t => ({
            text: Array.from(t.childNodes).filter(n => n.nodeType === 3).map(n => n.textContent).join(''),
            colored: t.classList.contains('query-token'), associated: t.classList.contains('associated')})),
    }))""")


def plots(page) -> list[dict]:
    """What Plotly was handed per rendered UMAP panel (the cloud is trace 0, the highlight marker trace 1)."""
    return page.evaluate("""() => Array.from(document.querySelectorAll('.plot-cell > div'))
        .filter(d => d.data && d.data.length && d.parentElement.style.display !== 'none')
        .map(d => ({title: d.layout.title.text, type: d.data[0].type, x: Array.from(d.data[0].x),
                    y: Array.from(d.data[0].y), z: d.data[0].z ? Array.from(d.data[0].z) : null,
                    hx: d.data[1] ? d.data[1].x[0] : null, hcolor: d.data[1] ? d.data[1].marker.color : null}))""")


def row_colored(seq: dict, transpose: bool) -> set[int]:
    """Indices the reference's 'max' reduction colours: rows (or columns) with a weight > 0 outside row/col 0."""
    n = seq["seq_len"]
    out = set()
    for idx, val in zip(seq["attention_indices"], seq["attention_values"]):
        q, k = divmod(idx, n)
        if q > 0 and k > 0 and val > 0:
            out.add(k if transpose else q)
    return out


def api_calls(page) -> list[dict]:
    calls: list[dict] = []

    def on_response(r):
        if "/api/head_vis/public/" in r.url:
            calls.append({"name": r.url.split("/public/")[1].split("/")[0], "status": r.status,
                          "url": r.url, "body": r.request.post_data})
    page.on("response", on_response)
    return calls


def detail_of(call: dict) -> str:
    """The server's {"detail"} for a failed call, by sending the same body again (idempotent endpoints only)."""
    req = urllib.request.Request(call["url"], data=(call["body"] or "").encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return f"{r.status} {r.read()[:500].decode(errors='replace')}"
    except urllib.error.HTTPError as e:
        return f"{e.code} {e.read()[:500].decode(errors='replace')}"


def wait_file(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def enter_lasso_mode(page) -> list[dict]:
    """The reference's cluster UI, step 1: the 'Lasso label mode' modebar button turns every visible panel into a
    2D view (dragmode lasso). Returns per panel its plot area on the page and each point's pixel position in it."""
    page.locator(".modebar-btn[data-title='Lasso label mode']").first.click(force=True)
    wait_until(page, """() => { const ds = Array.from(document.querySelectorAll('.plot-cell > div'))
        .filter(d => d.data && d.parentElement.style.display !== 'none');
        return ds.length && ds.every(d => d.data[0].type === 'scattergl' && d._fullLayout && d._fullLayout.xaxis) }""",
               "the 2D lasso view")
    page.wait_for_timeout(300)
    return page.evaluate("""() => Array.from(document.querySelectorAll('.plot-cell > div'))
        .filter(d => d.data && d.parentElement.style.display !== 'none').map(d => {
            const r = d.getBoundingClientRect(), s = d._fullLayout._size, xa = d._fullLayout.xaxis, ya = d._fullLayout.yaxis;
            return {title: d.layout.title.text, left: r.left + s.l, top: r.top + s.t, w: s.w, h: s.h,
                    px: Array.from(d.data[0].x).map(v => xa.l2p(v)), py: Array.from(d.data[0].y).map(v => ya.l2p(v))};
        })""")


INSET = 2  # px between the lasso and the plot area's edge


def inside(geo: dict, i: int, margin: float) -> bool:
    return margin < geo["px"][i] < geo["w"] - margin and margin < geo["py"][i] < geo["h"] - margin


def lasso(page, geo: dict, name: str, calls: list[dict]) -> dict:
    """Step 2: a lasso around the whole plot area of one panel, then the name prompt -> save_umap_clusters.
    Returns the save call and the cloud indices the lasso must select (>= 4 px inside its path) and may select."""
    page.once("dialog", lambda d: d.accept(name))
    x0, y0, w, h = geo["left"], geo["top"], geo["w"], geo["h"]
    path = [(x0 + INSET, y0 + INSET), (x0 + w - INSET, y0 + INSET), (x0 + w - INSET, y0 + h - INSET),
            (x0 + INSET, y0 + h - INSET), (x0 + INSET, y0 + h / 2 + 1)]
    n_before = len(calls)
    page.mouse.move(x0 + INSET, y0 + h / 2)
    page.mouse.down()
    for x, y in path:
        page.mouse.move(x, y, steps=6)
    page.mouse.up()
    deadline = time.monotonic() + 15
    while not any(c["name"] == "save_umap_clusters" for c in calls[n_before:]) and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    saves = [c for c in calls[n_before:] if c["name"] == "save_umap_clusters"]
    assert saves, "the lasso and the name prompt sent no save_umap_clusters request"
    n = len(geo["px"])
    return {"must": {i for i in range(n) if inside(geo, i, INSET + 4)},
            "may": {i for i in range(n) if inside(geo, i, 0)}, "save": saves[-1]}


def project_through_ui(page, example_index: int, q: int, k: int, n_points_after: int):
    """Example.svelte's UMAP mode: the UMAP button, a query token, a key token -> project_to_umap, UMAP tab."""
    ex = page.locator(".example").nth(example_index)
    ex.locator(".umap-btn").click()
    toks = ex.locator(".tokens .token")
    toks.nth(q).click()
    toks.nth(k).click()
    wait_until(page, f"""() => document.querySelector('.tab-btn.active')?.textContent.trim() === 'UMAP' &&
        Array.from(document.querySelectorAll('.plot-cell > div')).some(d => d.data && d.data[0].x.length === {n_points_after})""",
               f"the UMAP tab with {n_points_after} points after projecting ({q}, {k})", timeout_ms=60_000)
    page.wait_for_timeout(500)


# --- static mode ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer,head", HEAD_CASES)
def test_sequences_tab_shows_each_interval(ref_static, ref_page, layer, head):
    config = load(ref_static.data, "config.json")
    hf = head_file(ref_static.data, layer, head)
    by_interval: dict[int, list] = {}
    for s in hf["sequences"]:
        by_interval.setdefault(s["interval"], []).append(s)
    n_int = config["n_intervals"]
    assert set(by_interval) <= set(range(1, n_int + 1)), "head file intervals outside 1..n_intervals"
    # the top interval, the bottom one, and the fullest other one
    picks = [n_int, 1, max((i for i in by_interval if i not in (1, n_int)), key=lambda i: len(by_interval[i]))]
    for interval in picks:
        expected = sorted(by_interval.get(interval, []), key=lambda s: -s["max_activation"])
        open_sequences(ref_page, ref_static, layer, head, f"&interval={interval}", expect=len(expected))
        assert ref_page.eval_on_selector(".controls-bar select", "s => s.value") == str(interval)
        shown = examples(ref_page)
        assert [e["id"] for e in shown] == [str(s["sequence_id"]) for s in expected]
        for e, s in zip(shown, expected):
            assert e["max"] == f"max: {js_fixed(s['max_activation'], 3)}"
            assert len(e["tokens"]) == s["seq_len"] == len(s["tokens"])
            assert [t["text"] for t in e["tokens"]] == [render_visibly(t) for t in s["tokens"]]
            colored = {i for i, t in enumerate(e["tokens"]) if t["colored"]}
            assert colored == row_colored(s, transpose=False), f"max reduction of sequence {s['sequence_id']}"
    options = ref_page.eval_on_selector(".controls-bar select", "s => Array.from(s.options).map(o => o.value)")
    assert options == [str(i) for i in range(n_int, 0, -1)]  # static mode: no Custom entry


@pytest.mark.parametrize("layer,head", HEAD_CASES)
def test_pairwise_max_marks_the_argmax(ref_static, ref_page, layer, head):
    """reduction=pairwise_max (deep link): the query token of each example is argmax[0], its key argmax[1]."""
    hf = head_file(ref_static.data, layer, head)
    top = sorted((s for s in hf["sequences"] if s["interval"] == 10), key=lambda s: -s["max_activation"])
    open_sequences(ref_page, ref_static, layer, head, "&interval=10&reduction=pairwise_max", expect=len(top))
    assert ref_page.eval_on_selector_all(".controls-bar select", "ss => ss[1].value") == "pairwise_max"
    for e, s in zip(examples(ref_page), top):
        q, k = s["argmax"]
        assert [i for i, t in enumerate(e["tokens"]) if t["colored"]] == [q], f"query of {s['sequence_id']}"
        assert [i for i, t in enumerate(e["tokens"]) if t["associated"]] == [k], f"key of {s['sequence_id']}"


def test_transpose_and_custom_interval_deep_links(ref_static, ref_page):
    layer, head = HEAD_CASES[1]
    hf = head_file(ref_static.data, layer, head)
    top = sorted((s for s in hf["sequences"] if s["interval"] == 10), key=lambda s: -s["max_activation"])
    open_sequences(ref_page, ref_static, layer, head, "&transpose=true", expect=len(top))
    assert ref_page.text_content(".reduction-hint").strip() == "(over queries)"
    for e, s in zip(examples(ref_page), top):
        assert {i for i, t in enumerate(e["tokens"]) if t["colored"]} == row_colored(s, transpose=True)
    # interval -1 = custom sequences: the scan has none, the list is empty (and nothing breaks)
    open_sequences(ref_page, ref_static, layer, head, "&interval=-1")
    assert ref_page.locator(".example").count() == 0
    assert ref_page.text_content(".sequences-list .empty").strip() == "No sequences to display"


@pytest.mark.parametrize("layer,head", HEAD_CASES)
def test_metrics_tab(ref_static, ref_page, layer, head):
    config = load(ref_static.data, "config.json")
    hf = head_file(ref_static.data, layer, head)
    row = next(r for r in load(ref_static.data, "scatter_data.json") if r["layer"] == layer and r["head"] == head)
    ref_page.goto(f"{ref_static.url}?layer={layer}&head={head}&tab=metrics")
    wait_until(ref_page, "() => document.querySelectorAll('.statistics-section tr').length > 0", "the statistics")
    m = ref_page.evaluate("""() => ({
        active: document.querySelector('.tab-btn.active').textContent.trim(),
        sections: Array.from(document.querySelectorAll('.plot-section')).map(s => ({
            title: s.querySelector('h3').textContent.trim(),
            bars: s.querySelectorAll('.histogram-bars .bar-container').length,
            info: s.querySelector('.plot-info')?.textContent.replace(/\\s+/g, ' ').trim(),
            points: s.querySelector('svg polyline')?.getAttribute('points').trim().split(/\\s+/).length ?? null})),
        tables: Array.from(document.querySelectorAll('.token-table')).map(t => ({
            title: t.querySelector('h3').textContent.trim(),
            rows: Array.from(t.querySelectorAll('tbody tr')).map(r => Array.from(r.children).map(c => c.textContent))})),
        stats: Array.from(document.querySelectorAll('.statistics-section tr')).map(r =>
            [r.querySelector('.metric-name').textContent, r.querySelector('.metric-value').textContent]),
        metrics: Array.from(document.querySelectorAll('.metrics-table tr')).map(r =>
            [r.querySelector('.metric-name').textContent, r.querySelector('.metric-value').textContent]),
    })""")
    assert m["active"] == "Metrics"
    # 1. the max-activation histogram, from the head file's `histogram`
    hist = hf["histogram"]
    first = m["sections"][0]
    assert first["title"] == "Max Activation Distribution"
    assert first["bars"] == len(hist["bin_values"]) > 0
    assert first["info"].startswith(f"{sum(hist['bin_values'])} activations (all data)")
    assert sum(hist["bin_values"]) == hf["statistics"]["n_sequences"] == config["dataset"]["n_sequences"]
    # 2. config.custom_plots, each a LinePlot of the head file's {bin_edges, bin_values}
    plot_sections = {s["title"]: s for s in m["sections"][1:]}
    assert config["custom_plots"], "config.custom_plots is empty: the metrics tab shows no Q-K distance plot"
    for plot in config["custom_plots"]:
        data = hf.get(plot["key"])
        assert data and data.get("bin_values") and data.get("bin_edges"), f"head file lacks {plot['key']}"
        assert plot["label"] in plot_sections, f"no plot {plot['label']!r} rendered"
        assert plot_sections[plot["label"]]["points"] == len(data["bin_values"])
    # 3. config.custom_tables: the top 15 rows of each list
    tables = {t["title"]: t["rows"] for t in m["tables"]}
    for table in config["custom_tables"]:
        items = hf[table["key"]]
        assert items, f"head file's {table['key']} is empty"
        rows = tables.get(table["label"])
        assert rows is not None, f"no table {table['label']!r} rendered"
        want = [[str(i + 1), render_token(it["token"]), format_weight(it["weight"])]
                for i, it in enumerate(items[:table.get("max_rows", 15)])]
        assert rows == want
    # 4. the head file's statistics, labelled and formatted per config.statistics_display
    display = config.get("statistics_display") or {}
    want = [[(display.get(k) or {}).get("label") or k, format_statistic(v, (display.get(k) or {}).get("format"))]
            for k, v in hf["statistics"].items() if v is not None]
    assert m["stats"] == want
    assert "mean_max_activation" in hf["statistics"]
    # 5. the head's scatter_data row
    assert m["metrics"] == [[k, format_value(v)] for k, v in row.items()]


@pytest.mark.parametrize("layer,head", HEAD_CASES)
def test_umap_tab_plots_the_cloud(ref_static, ref_page, layer, head):
    config = load(ref_static.data, "config.json")
    assert config["has_umap"] and [layer, head] in config["umap_heads"]
    u = umap_file(ref_static.data, layer, head)
    seqs = load(ref_static.data, "umap/sequences.json")
    n = len(u["seq_idx"])
    assert 0 < n <= 60 and len(u["top_q"]) == len(u["top_k"]) == len(u["norms"]) == n
    ref_page.goto(f"{ref_static.url}?layer={layer}&head={head}&tab=umap")
    wait_until(ref_page, """() => Array.from(document.querySelectorAll('.plot-cell > div'))
        .filter(d => d.data && d.data.length).length === 3""", "the three default UMAP panels")
    assert ref_page.text_content(".tab-btn.active").strip() == "UMAP"
    views = u.get("views")
    assert views, "the scan ran with umap=True but the file has no `views`"
    emb = views[0]["embeddings"]
    shown = plots(ref_page)
    assert [p["title"] for p in shown] == ["O", "Q", "K"]  # UmapView's default panels
    for p in shown:
        assert p["type"] == "scatter3d"
        assert len(p["x"]) == n
        assert (p["x"], p["y"], p["z"]) == (emb[p["title"]]["d0"], emb[p["title"]]["d1"], emb[p["title"]]["d2"])
    # the text box shows point 0's sequence with its Q and K tokens marked
    badge = ref_page.text_content(".umap-text-box .seq-badge").strip()
    assert badge == str(u["seq_idx"][0])
    assert str(u["seq_idx"][0]) in seqs, "umap/sequences.json lacks the tokens of a cloud point's sequence"
    marks = ".tok-qk" if u["top_q"][0] == u["top_k"][0] else ".tok-q"
    assert ref_page.locator(f".umap-text-box {marks}").count() == 1
    # PCA projection, then the V panel too
    ref_page.get_by_label("PCA").check()
    wait_until(ref_page, """(want) => { const d = document.querySelector('.plot-cell > div');
        return d.data && d.data[0].x[0] === want }""", "the PCA coordinates", arg=u["pca"]["O"]["d0"][0])
    ref_page.get_by_label("V (value)").check()
    wait_until(ref_page, """() => Array.from(document.querySelectorAll('.plot-cell > div'))
        .filter(d => d.data && d.data.length && d.parentElement.style.display !== 'none').length === 4""", "4 panels")
    shown = plots(ref_page)
    assert [p["title"] for p in shown] == ["O", "V", "Q", "K"]
    for p in shown:
        pca = u["pca"][p["title"]]
        assert (p["x"], p["y"], p["z"]) == (pca["d0"], pca["d1"], pca["d2"])


def test_umap_deep_link_keeps_the_other_state(ref_static, ref_page):
    layer, head = HEAD_CASES[0]
    ref_page.goto(f"{ref_static.url}?layer={layer}&head={head}&tab=umap&reduction=pairwise_max&transpose=true&interval=3")
    wait_until(ref_page, "() => document.querySelector('.plot-cell > div')?.data", "the UMAP plots")
    assert ref_page.text_content(".tab-btn.active").strip() == "UMAP"
    ref_page.get_by_role("button", name="Sequences", exact=True).click()
    wait_until(ref_page, "() => document.querySelector('.controls-bar select')", "the sequences controls")
    selects = ref_page.eval_on_selector_all(".controls-bar select", "ss => ss.map(s => s.value)")
    assert selects == ["3", "pairwise_max"]
    ref_page.select_option(".controls-bar select >> nth=1", "max")
    assert ref_page.text_content(".reduction-hint").strip() == "(over queries)"  # transpose=true survived


def test_help_tab_lists_the_metric_descriptions(ref_static, ref_page):
    config = load(ref_static.data, "config.json")
    layer, head = HEAD_CASES[1]
    ref_page.goto(f"{ref_static.url}?layer={layer}&head={head}&tab=help")
    wait_until(ref_page, "() => document.querySelector('.metric-item')", "the metric descriptions")
    items = ref_page.evaluate("""() => Array.from(document.querySelectorAll('.metric-item'))
        .map(i => [i.querySelector('dt').textContent, i.querySelector('dd').textContent])""")
    descriptions = config["metric_descriptions"]
    assert set(config["metrics"]) <= set(descriptions), "a metric without a description"
    assert sorted(map(tuple, items)) == sorted(descriptions.items())
    assert all(d.strip() for _, d in items)


# --- server mode ------------------------------------------------------------------------------------------------


def add_custom_through_form(page, site, layer, head, text) -> str:
    open_sequences(page, site, layer, head, "&interval=-1")
    assert page.eval_on_selector(".controls-bar select", "s => s.options[0].textContent") == "Custom (0)"
    page.get_by_role("button", name="Add new").click()
    page.fill(".add-form textarea", text)
    page.click(".add-form button")
    wait_until(page, "() => document.querySelectorAll('.example').length === 1 && !document.querySelector('.add-form')",
               "the added custom sequence", timeout_ms=60_000)
    error = page.locator(".add-form .error")
    assert error.count() == 0, f"the form shows an error: {error.text_content()}"
    return examples(page)[0]["id"]


def test_custom_prompt_add_and_delete_round_trip(ref_live, ref_page):
    layer, head = HEAD_CASES[0]
    other = HEAD_CASES[1]
    text = "The cat sat on the mat. The cat sat on the"
    calls = api_calls(ref_page)
    sid = add_custom_through_form(ref_page, ref_live, layer, head, text)
    assert [c["status"] for c in calls if c["name"] == "add_custom_sequence"] == [200]
    assert sid.startswith("c")

    mine = served(ref_live, f"custom_sequences/L{layer}H{head}.json")
    assert mine is not None, "no custom_sequences/L1H0.json after add_custom_sequence"
    assert [s["sequence_id"] for s in mine["sequences"]] == [sid]
    seq = mine["sequences"][0]
    assert seq["interval"] == -1 and seq["text"] == text and "created" in seq
    assert seq["seq_len"] == len(seq["tokens"]) == len(seq["token_ids"]) > 1
    assert seq["attention_indices"] and len(seq["attention_indices"]) == len(seq["attention_values"])
    index = served(ref_live, "custom_sequences/index.json")
    assert [(s["sequence_id"], s["text"]) for s in index["sequences"]] == [(sid, text)]
    theirs = served(ref_live, f"custom_sequences/L{other[0]}H{other[1]}.json")
    assert theirs and [s["sequence_id"] for s in theirs["sequences"]] == [sid], "not written for every head"

    # a reload reads it back from the static file (lib/customSequences.js)
    open_sequences(ref_page, ref_live, layer, head, "&interval=-1", expect=1)
    shown = examples(ref_page)[0]
    assert shown["id"] == sid
    assert [t["text"] for t in shown["tokens"]] == [render_visibly(t) for t in seq["tokens"]]
    assert ref_page.eval_on_selector(".controls-bar select", "s => s.options[0].textContent") == "Custom (1)"

    ref_page.locator(".example .delete-btn").click()
    wait_until(ref_page, "() => document.querySelectorAll('.example').length === 0", "the deleted sequence to go")
    assert [c["status"] for c in calls if c["name"] == "delete_custom_sequence"] == [200]
    for rel in (f"custom_sequences/L{layer}H{head}.json", f"custom_sequences/L{other[0]}H{other[1]}.json",
                "custom_sequences/index.json"):
        left = served(ref_live, rel)
        assert left is None or left["sequences"] == [], f"{rel} still lists the deleted sequence"
    open_sequences(ref_page, ref_live, layer, head, "&interval=-1")
    assert ref_page.locator(".example").count() == 0


def saved_clusters(site, layer, head):
    return (umap_file(site.data, layer, head) or {}).get("clusters") or []


def check_saved_cluster(page, site, layer, head, drawn, name, cloud_triples):
    save = drawn["save"]
    assert save["status"] == 200, f"save_umap_clusters failed: {detail_of(save)}"
    clusters = wait_file(lambda: saved_clusters(site, layer, head), "the cluster in the umap file")
    assert [c["name"] for c in clusters] == [name]
    points = clusters[0]["points"]
    assert all(isinstance(p, list) and len(p) == 3 for p in points), f"points are not triples: {points[:3]}"
    got = {tuple(p) for p in points}
    assert len(got) == len(points)
    must = {cloud_triples[i] for i in drawn["must"]}
    may = {cloud_triples[i] for i in drawn["may"]}
    assert must <= got <= may, f"saved {len(got)} points; the lasso covers {len(must)}..{len(may)}"
    assert clusters[0]["color"].startswith("#")
    count = page.text_content(".cluster-list .cluster-count").strip()
    assert int(count) == len(points)
    return got


def test_cluster_saved_through_lasso_lands_as_triples(ref_live, ref_page):
    layer, head = HEAD_CASES[1]
    u = umap_file(ref_live.data, layer, head)
    cloud = list(zip(u["seq_idx"], u["top_q"], u["top_k"]))
    calls = api_calls(ref_page)
    ref_page.goto(f"{ref_live.url}?layer={layer}&head={head}&tab=umap")
    wait_until(ref_page, "() => document.querySelector(\".modebar-btn[data-title='Lasso label mode']\")", "the modebar")
    geos = enter_lasso_mode(ref_page)
    assert [g["title"] for g in geos] == ["O", "Q", "K"]
    drawn = lasso(ref_page, geos[0], "digits", calls)
    assert len(drawn["must"]) >= 5, "the lasso covers too few points for a meaningful test"
    got = check_saved_cluster(ref_page, ref_live, layer, head, drawn, "digits", cloud)
    assert all(isinstance(s, int) and isinstance(q, int) and isinstance(k, int) for s, q, k in got)
    # persists: a reload colours by clusters and lists it with the same count
    ref_page.reload()
    wait_until(ref_page, "() => document.querySelector('.cluster-list .cluster-name')", "the saved cluster after reload")
    assert ref_page.text_content(".cluster-list .cluster-name").strip() == "digits"
    assert int(ref_page.text_content(".cluster-list .cluster-count")) == len(got)
    assert ref_page.is_checked("input[type=radio][value=clusters]")


def pick_new_pair(u, sid, seq_len):
    cloud = set(zip(u["seq_idx"], u["top_q"], u["top_k"]))
    return next((q, q - 1) for q in range(2, seq_len) if (sid, q, q - 1) not in cloud)


def umap_then_sequences(page, site, layer, head, interval: str, expect: int):
    """Open the UMAP tab first, then the Sequences tab by its button (same head: the UMAP data stays loaded).
    Projecting with the UMAP data not yet loaded makes the reference load umap/ after the server appended the
    point, then append the reply's point again: drawn twice (Index.svelte handleUmapProjection + UmapView)."""
    page.goto(f"{site.url}?layer={layer}&head={head}&tab=umap")
    wait_until(page, "() => document.querySelector('.plot-cell > div')?.data", "the UMAP plots")
    page.get_by_role("button", name="Sequences", exact=True).click()
    wait_until(page, "() => document.querySelector('.controls-bar select')", "the sequences controls")
    page.select_option(".controls-bar select >> nth=0", interval)
    wait_until(page, f"() => document.querySelectorAll('.example').length === {expect}", f"{expect} examples")


def project_new_edge(site, page):
    """Through the reference UI, project a new edge of the top sequence of HEAD_CASES[0]'s interval 10.

    Returns (layer, head, cloud file before, cloud size before, sequence id, q, k, the API call log)."""
    layer, head = HEAD_CASES[0]
    u = umap_file(site.data, layer, head)
    n = len(u["seq_idx"])
    hf = head_file(site.data, layer, head)
    top = sorted((s for s in hf["sequences"] if s["interval"] == 10), key=lambda s: -s["max_activation"])
    calls = api_calls(page)
    umap_then_sequences(page, site, layer, head, "10", len(top))
    sid = top[0]["sequence_id"]
    q, k = pick_new_pair(u, sid, top[0]["seq_len"])
    project_through_ui(page, 0, q, k, n + 1)
    return layer, head, u, n, sid, q, k, calls


def test_projection_is_drawn_and_appended(ref_live, ref_page):
    layer, head, u, n, sid, q, k, calls = project_new_edge(ref_live, ref_page)
    assert [c["status"] for c in calls if c["name"] == "project_to_umap"] == [200]
    pp = wait_file(lambda: umap_file(ref_live.data, layer, head)["projected_points"], "projected_points")
    assert len(pp) == 1
    point = pp[0]
    assert (point["seq_idx"], point["top_q"], point["top_k"]) == (sid, q, k)
    assert len(point["umap_views"]) == len(u["views"])
    for p in plots(ref_page):  # drawn as the cloud's last point, selected (orange highlight on it)
        coords = point["umap_views"][0][p["title"]]
        assert (p["x"][n], p["y"][n], p["z"][n]) == (coords["d0"], coords["d1"], coords["d2"])
        assert p["hcolor"] == ORANGE and p["hx"] == coords["d0"]
    # the text box names the selected (projected) point's sequence; a pointer resting on another point after the
    # tab switch would show that point's instead (hover), so the pointer leaves the plots first
    ref_page.mouse.move(1, 1)
    wait_until(ref_page, f"() => document.querySelector('.umap-text-box .seq-badge')?.textContent.trim() === '{sid}'",
               f"the text box naming sequence {sid}")
    # a reload merges it from the file
    ref_page.goto(f"{ref_live.url}?layer={layer}&head={head}&tab=umap")
    wait_until(ref_page, f"() => document.querySelector('.plot-cell > div')?.data?.[0].x.length === {n + 1}",
               "the persisted projected point")


def test_cluster_may_hold_a_projected_point(ref_live, ref_page):
    """The reference merges projected_points into the cloud and lets the lasso select them, so a saved cluster
    names them: save_umap_clusters must accept points of `projected_points` too."""
    layer, head, u, n, sid, q, k, calls = project_new_edge(ref_live, ref_page)
    _lasso_including(ref_page, ref_live, layer, head, calls, n, (sid, q, k))


def test_cluster_may_hold_a_custom_sequence_point(ref_live, ref_page):
    """A point projected from a custom sequence has a string seq_idx ("c..."); the lasso can select it."""
    layer, head = HEAD_CASES[0]
    u = umap_file(ref_live.data, layer, head)
    n = len(u["seq_idx"])
    calls = api_calls(ref_page)
    sid = add_custom_through_form(ref_page, ref_live, layer, head, "def f(x):\n    return x + 1\nprint(f(2))")
    umap_then_sequences(ref_page, ref_live, layer, head, "-1", 1)
    project_through_ui(ref_page, 0, 3, 2, n + 1)
    _lasso_including(ref_page, ref_live, layer, head, calls, n, (sid, 3, 2))


def _lasso_including(page, site, layer, head, calls, index, triple):
    u = umap_file(site.data, layer, head)
    assert (u["projected_points"][-1]["seq_idx"], u["projected_points"][-1]["top_q"],
            u["projected_points"][-1]["top_k"]) == triple
    cloud = list(zip(u["seq_idx"], u["top_q"], u["top_k"]))
    cloud += [(p["seq_idx"], p["top_q"], p["top_k"]) for p in u["projected_points"]]
    page.keyboard.press("Escape")  # deselect the projected point
    geos = enter_lasso_mode(page)
    # a panel whose frame holds the projected point (the reference's camera may crop a panel)
    geo = next((g for g in geos if inside(g, index, INSET + 6)), None)
    if geo is None:
        pytest.fail("the projected point lies outside every panel's frame: cannot lasso it")
    drawn = lasso(page, geo, "with-projected", calls)
    got = check_saved_cluster(page, site, layer, head, drawn, "with-projected", cloud)
    assert triple in got


# --- attributions (AttributionTab, FeaturePairList, FeaturePanel, FeatureSnippets) ------------------------------


def top_edge(data: Path, layer: int = 1, head: int = 0) -> tuple[int, int, int, int]:
    """(example index in interval 10, sequence_id, q, k): the top interval's first sequence and its strongest pair."""
    top = sorted((s for s in head_file(data, layer, head)["sequences"] if s["interval"] == 10),
                 key=lambda s: -s["max_activation"])
    q, k = top[0]["argmax"]
    return len(top), top[0]["sequence_id"], q, k


def attribution_path(data: Path, kind: str, layer: int, head: int, seq, q: int, k: int) -> Path:
    return data / "attributions" / kind / f"L{layer}H{head}S{seq}Q{q}K{k}.json"


def post_endpoint(site, name: str, **fields) -> dict:
    """An endpoint called with the context of server_config.json, as a frontend calls it."""
    body = {"context": load(site.data, "server_config.json")["context"], **fields}
    req = urllib.request.Request(f"{site.url}api/head_vis/public/{name}/v0", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=90) as r:
        return json.loads(r.read())


def sanitize_token(t: str) -> str:  # lib/tokens.js sanitizeToken (FeatureSnippets.svelte)
    return render_visibly(t.replace("\u2028", " ").replace("\u205f", " "))


def format_score(v: float) -> str:  # FeaturePanel.svelte formatScore
    a = abs(v)
    if a == 0:
        return "0"
    if a < 0.001:
        return js_exp(v, 2)
    return js_fixed(v, 4) if a < 1 else js_fixed(v, 2)


def format_max_act(v: float) -> str:  # FeatureSnippets.svelte formatMaxAct
    return js_fixed(v, 1) if v >= 100 else js_fixed(v, 2) if v >= 10 else js_fixed(v, 3)


def attribution_through_ui(page, site, kind: str, layer: int, head: int, n_top: int, seq, q: int, k: int):
    """Example.svelte's QK/OV mode: its button, the query token, the key token -> the QK/OV tab."""
    open_sequences(page, site, layer, head, "&interval=10", expect=n_top)
    index = [e["id"] for e in examples(page)].index(str(seq))
    ex = page.locator(".example").nth(index)
    ex.locator(f".{kind}-btn").click()
    toks = ex.locator(".tokens .token")
    toks.nth(q).click()
    toks.nth(k).click()


def wait_attribution_tab(page, kind: str, n_pairs: int):
    wait_until(page, f"""() => document.querySelector('.tab-btn.active')?.textContent.trim() === '{kind.upper()}' &&
        document.querySelectorAll('.pair-list .list-content > .pair-item').length === {n_pairs}""",
               f"the {kind.upper()} tab with {n_pairs} feature pairs", timeout_ms=60_000)


def pair_rows(page) -> list[dict]:
    return page.evaluate("""() => Array.from(document.querySelectorAll('.pair-list .list-content > .pair-item')).map(b => ({
        source: b.querySelector('.pair-col.source').textContent.trim(),
        target: b.querySelector('.pair-col.target').textContent.trim(),
        color: b.style.backgroundColor}))""")


def panel_columns(page) -> list[dict]:
    """FeaturePanel's columns (full pair view: source then target): description, snippet groups and tokens."""
    return page.evaluate("""() => Array.from(document.querySelectorAll('.feature-panel .snippets-section')).map(c => ({
        description: c.querySelector('.description-text').textContent.trim(),
        groups: Array.from(c.querySelectorAll('.interval-group')).map(g => ({
            label: g.querySelector('.interval-label').textContent.trim(),
            max: g.querySelector('.interval-max').textContent.trim(),
            rows: Array.from(g.querySelectorAll('.snippet-row')).map(r =>
                Array.from(r.querySelectorAll('.snippet-inner .token')).map(t => t.textContent))})),
        none: !!c.querySelector('.no-snippets')}))""")


def expected_snippets(snippets: list[dict], n_intervals: int) -> list[dict]:
    """FeatureSnippets' grouping: by interval, highest first, file order within one."""
    out = []
    for interval in sorted({s["interval"] for s in snippets}, reverse=True):
        group = [s for s in snippets if s["interval"] == interval]
        out.append({"label": f"{interval}/{n_intervals}",
                    "max": f"(max {format_max_act(max(max(s['activations']) for s in group))})",
                    "rows": [[sanitize_token(t) for t in s["tokens"]] for s in group]})
    return out


def check_pairs(page, file: dict) -> None:
    """FeaturePairList rows = the file's pairs in its order: source = key_description, target = query_description,
    orange for a positive attribution, blue for a negative one."""
    rows = pair_rows(page)
    assert [(r["source"], r["target"]) for r in rows] == \
        [(p["key_description"] or "—", p["query_description"] or "—") for p in file["pairs"]]
    for r, p in zip(rows, file["pairs"]):
        rgb = "255, 140, 0" if p["attribution"] >= 0 else "100, 149, 237"  # alpha 1 reads rgb(...)
        assert r["color"].startswith((f"rgba({rgb},", f"rgb({rgb})")), r
    assert all(not r["source"].startswith("feature ") for r in rows), "the feature library's descriptions are shown"


def check_panel(page, pair: dict, n_intervals: int) -> None:
    cols = panel_columns(page)
    assert len(cols) == 2
    for col, side in zip(cols, ("key", "query")):
        assert col["description"] == (pair[f"{side}_description"] or "No description available")
        assert col["groups"] == expected_snippets(pair[f"{side}_snippets"], n_intervals), side
    assert page.text_content(".feature-panel .attribution-value").strip() == format_score(pair["attribution"])


def test_qk_tab_computes_through_the_server_then_reads_our_file(ref_attr_live, ref_page):
    config = load(ref_attr_live.data, "config.json")
    n_top, seq, q, k = top_edge(ref_attr_live.data)
    calls = api_calls(ref_page)
    attribution_through_ui(ref_page, ref_attr_live, "qk", 1, 0, n_top, seq, q, k)
    file = wait_file(lambda: load(ref_attr_live.data, f"attributions/qk/L1H0S{seq}Q{q}K{k}.json"), "the QK file")
    wait_attribution_tab(ref_page, "qk", len(file["pairs"]))
    assert [(c["name"], c["status"]) for c in calls] == [("qk_attributions", 200)]
    assert json.loads(calls[0]["body"])["seq_idx"] == seq
    check_pairs(ref_page, file)
    assert ref_page.eval_on_selector_all(".list-header .header-col", "hs => hs.map(h => h.textContent.trim())") == \
        ["Key", "Query"]

    # a click on a pair: both features' descriptions and snippets (grouped by interval, tokens as the file's)
    pick = next(i for i, p in enumerate(file["pairs"]) if i > 0 and p["query_snippets"] and p["key_snippets"])
    ref_page.locator(".pair-list .list-content > .pair-item").nth(pick).click()
    wait_until(ref_page, "() => document.querySelectorAll('.feature-panel .snippets-section').length === 2", "the pair")
    check_panel(ref_page, file["pairs"][pick], config["n_intervals"])

    # Marginal Key: our key_marginals with their scores; one, then one of its top interactions
    ref_page.get_by_role("button", name="Marginal Key", exact=True).click()
    marginals = file["key_marginals"]
    shown = ref_page.evaluate("""() => Array.from(document.querySelectorAll('.marginal-column .pair-item')).map(b =>
        [b.querySelector('.pair-col').textContent.trim(), b.querySelector('.marginal-score').textContent.trim()])""")
    assert shown == [[m["description"], ("+" if m["marginal_score"] >= 0 else "") + js_fixed(m["marginal_score"], 2)]
                     for m in marginals]
    ref_page.locator(".marginal-column .pair-item").nth(0).click()
    wait_until(ref_page, "() => document.querySelector('.feature-panel .single-header')", "the marginal feature")
    assert ref_page.text_content(".single-header .feature-type").strip() == "Key Feature"
    assert ref_page.text_content(".single-content .description-text").strip() == marginals[0]["description"]
    single = ref_page.evaluate("""() => Array.from(document.querySelectorAll('.single-content .snippet-inner'))
        .map(s => Array.from(s.querySelectorAll('.token')).map(t => t.textContent))""")
    assert single == [row for g in expected_snippets(marginals[0]["snippets"], config["n_intervals"]) for row in g["rows"]]
    interactions = ref_page.locator(".interaction-column .pair-item")
    assert interactions.count() == len(marginals[0]["top_interactions"])
    interactions.nth(0).click()
    partner = marginals[0]["top_interactions"][0]
    wait_until(ref_page, "() => document.querySelectorAll('.feature-panel .snippets-section').length === 2", "the pair")
    check_panel(ref_page, {"key_description": marginals[0]["description"], "key_snippets": marginals[0]["snippets"],
                           "query_description": partner["description"], "query_snippets": partner["snippets"],
                           "attribution": partner["pairwise_score"]}, config["n_intervals"])

    # a reload by the deep link: the reference reads the cached file (no POST), and its manifest marks the example
    calls.clear()
    ref_page.goto(f"{ref_attr_live.url}?layer=1&head=0&attr=qk&seq={seq}&qpos={q}&kpos={k}")
    wait_attribution_tab(ref_page, "qk", len(file["pairs"]))
    check_pairs(ref_page, file)
    assert calls == [], f"the cached attribution went to the server: {calls}"
    open_sequences(ref_page, ref_attr_live, 1, 0, "&interval=10", expect=n_top)
    index = [e["id"] for e in examples(ref_page)].index(str(seq))
    ex = ref_page.locator(".example").nth(index)
    assert "cached" in ex.locator(".qk-btn").get_attribute("class").split()
    assert "cached" not in ex.locator(".ov-btn").get_attribute("class").split()
    ex.locator(".qk-btn").click()  # QK mode: our manifest's query position, then its key, are marked cached
    toks = ex.locator(".tokens .token")
    assert toks.evaluate_all("ts => ts.flatMap((t, i) => t.classList.contains('cached') ? [i] : [])") == [q]
    toks.nth(q).click()
    assert toks.evaluate_all("ts => ts.flatMap((t, i) => t.classList.contains('cached') ? [i] : [])") == [k]


def test_ov_tab_shows_the_head_output_target(ref_attr_live, ref_page):
    n_top, seq, q, k = top_edge(ref_attr_live.data)
    calls = api_calls(ref_page)
    attribution_through_ui(ref_page, ref_attr_live, "ov", 1, 0, n_top, seq, q, k)
    file = wait_file(lambda: load(ref_attr_live.data, f"attributions/ov/L1H0S{seq}Q{q}K{k}.json"), "the OV file")
    assert file["target"]["kind"] == "head_output_direction"  # no output dictionary is served
    assert all(p["query_feature"] is None for p in file["pairs"])
    wait_attribution_tab(ref_page, "ov", len(file["pairs"]))
    assert [(c["name"], c["status"]) for c in calls] == [("ov_attributions", 200)]
    assert ref_page.eval_on_selector_all(".list-header .header-col", "hs => hs.map(h => h.textContent.trim())") == \
        ["Value", "Output"]
    check_pairs(ref_page, file)
    ref_page.locator(".pair-list .list-content > .pair-item").nth(0).click()
    wait_until(ref_page, "() => document.querySelectorAll('.feature-panel .snippets-section').length === 2", "the pair")
    check_panel(ref_page, file["pairs"][0], load(ref_attr_live.data, "config.json")["n_intervals"])
    types = ref_page.eval_on_selector_all(".feature-panel .feature-type", "ts => ts.map(t => t.textContent.trim())")
    assert types == ["Value Feature", "Output Feature"]


def test_attribution_of_a_layer_without_a_dictionary_shows_the_servers_detail(ref_attr_live, ref_page):
    _, seq, q, k = top_edge(ref_attr_live.data, 3, 4)
    calls = api_calls(ref_page)
    ref_page.goto(f"{ref_attr_live.url}?layer=3&head=4&attr=qk&seq={seq}&qpos={q}&kpos={k}")
    wait_until(ref_page, "() => document.querySelector('.error-state')", "the attribution error", timeout_ms=60_000)
    assert [(c["name"], c["status"]) for c in calls] == [("qk_attributions", 404)]
    detail = json.loads(detail_of(calls[0]).split(" ", 1)[1])["detail"]
    assert "no dictionary reads layer 3's attention input" in detail
    assert detail in ref_page.text_content(".error-state")


def test_a_cached_file_in_a_static_tree_is_shown(ref_attr_live, ref_attr_static, ref_page):
    config = load(ref_attr_static.data, "config.json")
    _, seq, q, k = top_edge(ref_attr_live.data)
    file = post_endpoint(ref_attr_live, "qk_attributions", layer=1, head=0, seq_idx=seq, query_pos=q, key_pos=k)
    shutil.copytree(ref_attr_live.data / "attributions", ref_attr_static.data / "attributions", dirs_exist_ok=True)
    assert load(ref_attr_static.data, f"attributions/qk/L1H0S{seq}Q{q}K{k}.json") == file
    calls = api_calls(ref_page)
    ref_page.goto(f"{ref_attr_static.url}?layer=1&head=0&attr=qk&seq={seq}&qpos={q}&kpos={k}")
    wait_attribution_tab(ref_page, "qk", len(file["pairs"]))
    assert calls == []
    check_pairs(ref_page, file)
    ref_page.locator(".pair-list .list-content > .pair-item").nth(1).click()
    wait_until(ref_page, "() => document.querySelectorAll('.feature-panel .snippets-section').length === 2", "the pair")
    check_panel(ref_page, file["pairs"][1], config["n_intervals"])
    # the edge in the tab's sequence display: the query and key tokens of the file's positions
    labels = ref_page.evaluate("""() => Array.from(document.querySelectorAll('.sequence-section .token')).flatMap((t, i) =>
        Array.from(t.querySelectorAll('.selection-label')).map(l => [i, l.textContent.trim()]))""")
    assert sorted(labels) == sorted([[q, "Q"], [k, "K"]]) or sorted(labels) == sorted([[q, "QUERY"], [k, "KEY"]])

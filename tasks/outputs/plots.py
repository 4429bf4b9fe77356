"""Grouped bar charts drawn with PIL (no matplotlib), for benchmark reports.

    save_bar_chart("psnr.png", "PSNR (dB, higher is better)", groups=["sr:factor=4", "inpaint"],
                   series=["flair", "dps"], values={"flair": {"sr:factor=4": 24.1, ...}, ...})
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from guidance.loading.files import write_atomic

__all__ = ["PALETTE", "bar_chart", "save_bar_chart"]

PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
_BAR, _GAP, _LEFT, _RIGHT, _TOP, _BOTTOM, _PLOT_HEIGHT = 26, 22, 64, 16, 40, 44, 220


def _nice_top(value: float) -> float:
    """A round axis maximum at or above ``value`` (1, 2, 2.5 or 5 times a power of ten)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(1, limit - 1)] + "~"


def _format(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def bar_chart(title: str, groups: Sequence[str], series: Sequence[str],
              values: Mapping[str, Mapping[str, float | None]]) -> Image.Image:
    """A PIL image: one cluster of bars per group (e.g. operator), one coloured bar per series (e.g. method),
    value labels on the bars and a legend. Missing values (None) leave a gap marked 'n/a'."""
    if not groups or not series:
        raise ValueError("a bar chart needs at least one group and one series")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [_short(str(g), 40) for g in groups]
    cluster = max(len(series) * _BAR + _GAP, *(int(measure.textlength(label, font=font)) + 12 for label in labels))
    legend = [_short(str(s), 30) for s in series]
    offsets, x = [], _LEFT
    for label in legend:
        offsets.append(x)
        x += 14 + int(measure.textlength(label, font=font)) + 16
    width = max(_LEFT + len(groups) * cluster + _RIGHT, x + _RIGHT, 260)
    height = _TOP + _PLOT_HEIGHT + _BOTTOM
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    numbers = [v for s in series for g in groups if (v := values.get(s, {}).get(g)) is not None]
    low = min(0.0, *numbers) if numbers else 0.0
    top = _nice_top(max(numbers)) if numbers and max(numbers) > 0 else 1.0
    span = top - low or 1.0
    base_y = _TOP + _PLOT_HEIGHT

    def y_of(value: float) -> float:
        return base_y - (value - low) / span * _PLOT_HEIGHT

    draw.text((_LEFT, 4), title, fill="black", font=font)
    for index, (left, label) in enumerate(zip(offsets, legend)):  # legend
        draw.rectangle((left, 20, left + 10, 30), fill=PALETTE[index % len(PALETTE)])
        draw.text((left + 14, 19), label, fill="black", font=font)
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):  # y axis with grid lines
        value = low + fraction * span
        y = y_of(value)
        draw.line((_LEFT - 4, y, width - _RIGHT, y), fill=(225, 225, 225) if fraction else "black")
        label = _format(value)
        draw.text((_LEFT - 8 - draw.textlength(label, font=font), y - 6), label, fill="black", font=font)
    draw.line((_LEFT, _TOP, _LEFT, base_y), fill="black")
    zero_y = y_of(0.0)
    for g, group in enumerate(groups):
        left = _LEFT + g * cluster + (cluster - len(series) * _BAR) // 2
        for s, name in enumerate(series):
            value = values.get(name, {}).get(group)
            x0 = left + s * _BAR
            if value is None:
                draw.text((x0 + 2, zero_y - 14), "n/a", fill=(120, 120, 120), font=font)
                continue
            y = y_of(value)
            draw.rectangle((x0 + 2, min(y, zero_y), x0 + _BAR - 2, max(y, zero_y)), fill=PALETTE[s % len(PALETTE)])
            label = _format(value)
            draw.text((x0 + _BAR / 2 - draw.textlength(label, font=font) / 2, min(y, zero_y) - 12), label,
                      fill="black", font=font)
        middle = _LEFT + g * cluster + cluster / 2
        draw.text((middle - draw.textlength(labels[g], font=font) / 2, base_y + 8), labels[g], fill="black",
                  font=font)
    return canvas


def save_bar_chart(path: str | os.PathLike, title: str, groups: Sequence[str], series: Sequence[str],
                   values: Mapping[str, Mapping[str, float | None]]) -> Path:
    """Write :func:`bar_chart` as a PNG atomically."""
    chart = bar_chart(title, groups, series, values)
    return write_atomic(path, lambda temporary: chart.save(temporary, format="PNG"))

"""The OneRef paper's published numbers (NeurIPS 2024; docs/method.md, "Published numbers"),
printed beside measured ones.

Keys: (metric, dataset, preset) -> {setting: {split: percent}}. ``single``: fine-tuned on
the one dataset; ``mixed``: with mixed pre-training. RefCOCO is ``unc`` (split files) or
refcoco split by unc (refer toolkit).
"""

from __future__ import annotations

__all__ = ["PUBLISHED", "published"]

PUBLISHED: dict[tuple[str, str, str], dict[str, dict[str, float]]] = {
    ("acc@0.5", "unc", "base"): {
        "single": {"val": 88.75, "testA": 90.95, "testB": 85.34},
        "mixed": {"val": 91.89, "testA": 94.31, "testB": 88.58}},
    ("acc@0.5", "unc", "large"): {
        "single": {"val": 92.87, "testA": 94.01, "testB": 90.19},
        "mixed": {"val": 93.21, "testA": 95.43, "testB": 90.11}},
    ("miou", "unc", "base"): {"single": {"val": 77.57}, "mixed": {"val": 79.83}},
    ("miou", "unc", "large"): {"single": {"val": 80.09}, "mixed": {"val": 81.26}},
    ("oiou", "unc", "base"): {
        "single": {"val": 77.55, "testA": 80.96, "testB": 73.53},
        "mixed": {"val": 81.06, "testA": 83.05, "testB": 77.80}},
}


def published(metric: str, dataset: str, preset: str, split: str) -> str:
    """``"88.75 / 91.89"`` (single / mixed), one of them, or ``"-"`` when unpublished."""
    entry = PUBLISHED.get((metric, dataset, preset), {})
    values = [f"{entry[k][split]:.2f}" if split in entry.get(k, {}) else "-"
              for k in ("single", "mixed")]
    return "-" if values == ["-", "-"] else " / ".join(values)

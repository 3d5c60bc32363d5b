"""The compact table ``entropymerge run`` and ``rank`` print at the end: the method, the merge
coefficients, Dice per class when a reference was given, and the ranking (both questions)."""

from __future__ import annotations

from .ranking import ranking_table


def run_table(summary: dict) -> str:
    """Plain-text digest of a run summary (as ``pipeline.run`` returns it), a few lines per part."""
    lines = []
    method = summary["method"]
    coefficients = summary.get("coefficients") or {}
    body, head = coefficients.get("body"), coefficients.get("head")
    if "segmentation" in summary.get("outputs", {}):  # a ranking-only run merges nothing
        decoupled = bool(summary.get("decoupled_head") and head)
        lines.append(f"method: {method}" + (" (head merged with its own coefficients beta)" if decoupled else ""))
        if body and method in ("single", "select", "oracle"):
            lines.append(f"  model: {max(body, key=body.get)}")
        elif body:
            width = max(len(name) for name in body)
            lines.append(f"  {'model':<{width}}  {'alpha':>6}" + (f"  {'beta':>6}" if decoupled else ""))
            for name, value in body.items():
                lines.append(f"  {name:<{width}}  {value:6.3f}" + (f"  {head[name]:6.3f}" if decoupled else ""))
    evaluation = summary.get("evaluation")
    if evaluation:
        cells = [f"{name} {'-' if not entry['in_reference'] or entry['dice'] is None else format(entry['dice'], '.3f')}"
                 for name, entry in evaluation["per_class"].items()]
        mean = evaluation.get("mean_dice")
        lines.append("Dice vs reference: " + ", ".join(cells) + (f"; mean {mean:.3f}" if mean is not None else ""))
    if summary.get("ranking"):
        lines.append(ranking_table(summary["ranking"]))
    return "\n".join(lines)

"""The compact table ``entropymerge run`` and ``rank`` print at the end: the method, the merge
coefficients, Dice per class when a reference was given, and the ranking (both questions)."""

from __future__ import annotations

from dataclasses import asdict

from .methods import one_model_used
from .rankingtable import ranking_table
from .summary import RunSummary


def run_table(summary: RunSummary) -> str:
    """Plain-text digest of a run summary, a few lines per part.

    Args:
        summary: the run's summary (as ``pipeline.run`` returns it or ``summary.read_summary`` reads it).

    Returns:
        Lines of text: the method and coefficients (not for a ranking-only run), Dice per class against
        the reference, and the ranking table; empty when there is nothing to show.
    """
    lines = []
    method = summary.method
    body, head = summary.coefficients.body, summary.coefficients.head
    if summary.has_segmentation:  # a ranking-only run merges nothing
        decoupled = bool(summary.decoupled_head and head)
        lines.append(f"method: {method}" + (" (head merged with its own coefficients beta)" if decoupled else ""))
        used = one_model_used(method, body)
        if used:
            lines.append(f"  model: {used}")
        elif body:
            width = max(len(name) for name in body)
            lines.append(f"  {'model':<{width}}  {'alpha':>6}" + (f"  {'beta':>6}" if decoupled else ""))
            for name, value in body.items():
                lines.append(f"  {name:<{width}}  {value:6.3f}" + (f"  {head[name]:6.3f}" if decoupled else ""))
    evaluation = summary.evaluation
    if evaluation:
        cells = [f"{name} {'-' if not entry.in_reference or entry.dice is None else format(entry.dice, '.3f')}"
                 for name, entry in evaluation.per_class.items()]
        mean = evaluation.mean_dice
        lines.append("Dice vs reference: " + ", ".join(cells) + (f"; mean {mean:.3f}" if mean is not None else ""))
    if summary.ranking:
        lines.append(ranking_table(asdict(summary.ranking)))
    return "\n".join(lines)

"""The ranking as a table: its columns, the question each answers, and the plain-text table.

Two questions, two groups of columns: "which site model can I trust on this case as it is?" (as
is) and "which site model would do best after fine-tuning on a few labels of this site?"
(transfer). ``COLUMNS`` says, per column, which question it answers, which way is better and
which labels it uses; ``ranking_table`` prints a ranking (as ``Ranking.to_json`` gives it).
"""

from __future__ import annotations

from dataclasses import dataclass

AS_IS = "as is"
TRANSFER = "transfer"
QUESTIONS = {AS_IS: "which site model can I trust on this case as it is?",
             TRANSFER: "which site model would do best after fine-tuning on a few labels of this site?"}


@dataclass(frozen=True)
class Column:
    """One ranking column: the question it answers, which way is better, and the labels it uses
    (``none``, ``scribbles``, ``reference``, or ``source``: the ranking's label source)."""

    key: str
    title: str
    question: str | None = None
    better: str | None = None
    labels: str = "none"


COLUMNS = (
    Column("rank", "as-is rank", AS_IS),
    Column("model", "model"),
    Column("uncertainty", "merge statistic", AS_IS, "lower"),
    Column("entropy", "mean entropy", AS_IS, "lower"),
    Column("alpha", "merge coefficient", AS_IS, "higher"),
    Column("scribble_accuracy", "accuracy on scribbles", AS_IS, "higher", "scribbles"),
    Column("scribble_dice", "Dice on scribbles", AS_IS, "higher", "scribbles"),
    Column("true_dice", "true Dice (the truth)", AS_IS, "higher", "reference"),
    Column("transfer_rank", "transfer rank", TRANSFER),
    Column("fused", "fused GRTD+LBTC", TRANSFER, "higher", "source"),
    Column("grtd", "GRTD", TRANSFER, "higher", "source"),
    Column("lbtc", "LBTC", TRANSFER, "higher", "source"),
    Column("logme", "LogME", TRANSFER, "higher", "source"),
)
SCORE_KEYS = tuple(c.key for c in COLUMNS if c.better and c.key != "true_dice")


def ranking_table(data: dict) -> str:
    """The ranking (as ``Ranking.to_json`` gives it) as a plain-text table: the as-is columns, then the
    transfer columns, each group headed by its question and the labels it used.

    Args:
        data: the ranking's JSON record (``columns``, ``rows``, ``as_is_basis``, ``description``, ...).

    Returns:
        The table as lines of text joined by newlines.
    """
    columns = {c["key"]: c for c in data["columns"]}
    short = {"uncertainty": data.get("statistic") or "score", "entropy": "H_k", "alpha": "alpha", "scribble_accuracy": "scr.acc",
             "scribble_dice": "scr.Dice", "true_dice": "Dice", "transfer_rank": "t.rank", "fused": "fused", "grtd": "GRTD",
             "lbtc": "LBTC", "logme": "LogME"}
    shown = [k for k in short if k in columns]
    width = max([5] + [len(row["model"]) for row in data["rows"]])
    names = [max(6, len(short[k])) for k in shown]

    def cell(row, key, size):
        value = row.get(key)
        if value is None:
            return "-".rjust(size)
        return str(value).rjust(size) if isinstance(value, int) else f"{value:{size}.3f}"

    as_is_labels = sorted({"none (label-free)" if c["labels"] == "none" else c["labels"]
                           for c in data["columns"] if c["question"] == AS_IS and c["better"]})
    basis = columns.get(data["as_is_basis"], {}).get("title", data["as_is_basis"])
    lines = [f"AS IS ({QUESTIONS[AS_IS]}): ranked by {basis}; labels used: {', '.join(as_is_labels)}",
             f"TRANSFER ({QUESTIONS[TRANSFER]}): ranked by fused; labels: {data['description']}"
             + (" (self-referenced: the merged prediction)" if data["self_referenced"] else ""),
             f"{'rank':>4}  {'model':<{width}} " + " ".join(short[k].rjust(n) for k, n in zip(shown, names))]
    for row in data["rows"]:
        lines.append(f"{row['rank']:>4}  {row['model']:<{width}} " + " ".join(cell(row, k, n) for k, n in zip(shown, names)))
    lower = [short[k] for k in shown if columns[k]["better"] == "lower"]
    if lower:
        lines.append(f"lower is better for {', '.join(lower)}; higher for the rest")
    taus = data.get("weighted_kendall_tau")
    if taus:
        for variant, values in taus.items():
            lines.append(f"weighted Kendall tau vs true Dice ({variant}): " + ", ".join(f"{short.get(k, k)} {v:+.3f}" for k, v in values.items()))
    lines += [f"note: {note}" for note in data.get("notes", [])]
    return "\n".join(lines)

"""What every benchmark does with its Markdown table: print it, and write it to --markdown when given."""

from __future__ import annotations

from pathlib import Path


def publish(lines: list[str], markdown: Path | None) -> None:
    text = "\n".join(lines)
    print(text)
    if markdown:
        markdown.write_text(text + "\n", encoding="utf-8")

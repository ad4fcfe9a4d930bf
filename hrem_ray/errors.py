"""One-line messages for the errors a user can fix: the CLI prints them, and storage and
galleries fold the libraries' multi-line errors (pyarrow, faiss, torch) into theirs."""

from __future__ import annotations


def one_line(e: BaseException) -> str:
    """The error's message on one line (some, e.g. torch's unpickling refusals, span several)."""
    lines = [line.strip() for line in str(e).splitlines()]
    return " ".join(line for line in lines if line) or type(e).__name__

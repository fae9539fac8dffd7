"""Text from outside on the pages lenetlab writes: a value is shown as the characters it holds.

A run's names, a sweep's values, file names and everything read back from a run folder come
from whoever made them. They enter report.md only through Md.format (or md()), which escapes
every character Markdown could read as syntax; report.html is made by a Markdown converter
with raw HTML, entities and links switched off, so even an unescaped value could not become an
element; plain() shows non-printable characters as escapes (plots.py draws with no mathtext).
"""

from __future__ import annotations

import re
import string

# Characters Markdown reads as syntax inside a line (CommonMark escapes any ASCII punctuation
# with a backslash; these are the ones that matter mid-line, plus $ for math and ~ for
# strikethrough in the viewers that have them). Python-Markdown is taught the same escapes.
_SPECIAL = "\\`*_[]<>|$~"
# '_' between two letters or digits (batch_norm) is no emphasis in any Markdown, so it stays.
_SPECIAL_RE = re.compile("([" + re.escape(_SPECIAL.replace("_", "")) + "]"
                         "|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")
# A code span holds any printable text but its fence and the table's column separator.
_CODE_SAFE = re.compile(r"[^`|\\]*")


def plain(value: object) -> str:
    """value as one line of text: each character that is not printable (a newline, a terminal
    escape, ...) shown as its Python escape, so nothing a name holds can move the cursor or
    start a line."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class Md(str):
    """Markdown lenetlab wrote itself. Values enter it only through format(), which escapes
    each one that is not Md already: Md("# {}: report").format(name)."""

    def format(self, *args: object, **kwargs: object) -> Md:
        return Md(_FORMATTER.vformat(self, args, kwargs))

    def join(self, parts) -> Md:  # type: ignore[override]
        return Md(super().join(part if isinstance(part, Md) else md(part) for part in parts))


def md(value: object) -> Md:
    """value as Markdown text that every Markdown reader shows as the characters it holds."""
    if isinstance(value, Md):
        return value
    # '&' as the entity of itself: Python-Markdown's writer keeps any '&name;' as an entity
    return Md(_SPECIAL_RE.sub(r"\\\1", plain(value)).replace("&", "&amp;"))


def code(value: object) -> Md:
    """value in a code span where it fits in one (no backtick, pipe or backslash), else as text."""
    text = plain(value)
    return Md(f"`{text}`") if text and _CODE_SAFE.fullmatch(text) else md(text)


class _Escaping(string.Formatter):
    def format_field(self, value: object, format_spec: str) -> str:
        text = format(value, format_spec)
        return text if isinstance(value, Md) else md(text)


_FORMATTER = _Escaping()


# ---- report.html: Markdown to HTML with no way for text to become markup ----

# Raw HTML blocks and inline tags, entities, and every link form: what is left makes only
# headings, paragraphs, lists, tables, emphasis, code and the report's own images.
_NO_HTML = ("html", "entity", "link", "reference", "short_reference", "image_reference",
            "short_image_ref", "autolink", "automail")


def text_only(image_sources: set[str] = frozenset()):
    """A Python-Markdown extension: no raw HTML (it has no switch for that: its html_block
    preprocessor and html pattern are removed), entities or links; images only from
    image_sources. markdown is imported here, not with the commands that print plain text."""
    from xml.etree.ElementTree import Element

    from markdown.extensions import Extension
    from markdown.treeprocessors import Treeprocessor

    class OwnImagesOnly(Treeprocessor):
        """Every <img> whose source is not one of the page's own plots becomes its alt text."""

        def run(self, root: Element) -> None:
            for parent in root.iter():
                for index, child in reversed(list(enumerate(parent))):
                    if child.tag == "img" and child.get("src") not in image_sources:
                        parent.remove(child)
                        text = (child.get("alt") or "") + (child.tail or "")
                        if index:
                            parent[index - 1].tail = (parent[index - 1].tail or "") + text
                        else:
                            parent.text = (parent.text or "") + text

    class TextOnly(Extension):
        def extendMarkdown(self, md_instance) -> None:  # noqa: N802 (Markdown's name)
            md_instance.preprocessors.deregister("html_block")
            for name in _NO_HTML:
                md_instance.inlinePatterns.deregister(name, strict=False)
            md_instance.ESCAPED_CHARS = sorted(set(md_instance.ESCAPED_CHARS) | set(_SPECIAL))
            # after the inline patterns (priority 20) have made the elements
            md_instance.treeprocessors.register(OwnImagesOnly(md_instance), "own_images", 15)

    return TextOnly()


def to_html(text: str, image_sources: set[str] = frozenset()) -> str:
    """report.md's text as HTML in which no text from outside can be an element."""
    import markdown

    return markdown.markdown(text, extensions=["tables", "fenced_code", text_only(image_sources)],
                             output_format="html")

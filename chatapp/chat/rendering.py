"""Model output (markdown) to safe HTML, rendered on the server.

Two layers, so that one mistake does not become an XSS:

1. markdown-it-py runs with raw HTML *off*: a model writing ``<script>`` gets the text
   ``<script>`` on the page, which is also what a model explaining HTML means. Links it
   builds are already checked against ``javascript:``/``vbscript:``/``file:``/``data:``.
2. nh3 (ammonia) then cleans the whole result against a strict allow-list: tags, attributes,
   classes and URL schemes we emit ourselves and nothing else.

``render_markdown`` is called on the event loop every ``RENDER_EVERY`` seconds while a reply
streams (``chatapp.chat.generation``), so everything reusable is built once at import, and a
highlighted code block is cached: a finished block is re-rendered unchanged on every later
swap of the same reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from html import escape
from urllib.parse import urlsplit

import nh3
from linkify_it import LinkifyIt
from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML
from markdown_it.rules_core import StateCore
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexer import Lexer
from pygments.lexers import get_all_lexers, get_lexer_by_name
from pygments.token import STANDARD_TYPES
from pygments.util import ClassNotFound

PYGMENTS_STYLE = "default"  # a light style, like static/css/base.css
CSS_SCOPE = ".codeblock pre"

# Past this size a code block is shown unhighlighted: some Pygments lexers backtrack badly on
# hostile input, and a reply is model output that a prompt injection can shape.
MAX_HIGHLIGHT_CHARS = 100_000
MAX_LANGUAGE_LABEL = 40
SAFE_SCHEMES = {"http", "https", "mailto"}
ALLOWED_TAGS = {
    "p", "br", "hr", "strong", "em", "del", "s", "code", "pre", "blockquote", "ul", "ol", "li",
    "h1", "h2", "h3", "h4", "h5", "h6", "a", "table", "thead", "tbody", "tr", "th", "td",
    "div", "span", "button",
}  # fmt: skip


def _build_markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": True})
    md.enable(["table", "strikethrough", "linkify"])
    # Only URLs that carry their scheme become links. Fuzzy matching would turn every file
    # name in a coding answer into a link to a domain ("settings.py" is Paraguay's TLD) and
    # "git@github.com" into a mailto.
    md.linkify = LinkifyIt(options={"fuzzy_link": False, "fuzzy_email": False})
    md.core.ruler.push("unlink_unsafe", _unlink_unsafe)
    md.add_render_rule("fence", _render_fence)
    md.add_render_rule("code_block", _render_code_block)
    md.add_render_rule("image", _render_image)
    md.add_render_rule("th_open", _render_cell_open)
    md.add_render_rule("td_open", _render_cell_open)
    return md


def _is_safe_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() in SAFE_SCHEMES


def _unlink_unsafe(state: StateCore) -> None:
    # markdown-it already refuses javascript:, vbscript:, file: and data: links. Links to
    # anything else we do not allow (relative URLs, ftp:, ...) keep their text but lose the
    # link, rather than becoming dead <a> elements once the sanitizer drops their href.
    for block in state.tokens:
        if block.type != "inline" or not block.children:
            continue
        kept: list[Token] = []
        dropping = False  # links do not nest, so one flag pairs an open with its close
        for token in block.children:
            if token.type == "link_open" and not _is_safe_url(str(token.attrGet("href"))):
                dropping = True
            elif token.type == "link_close" and dropping:
                dropping = False
            else:
                kept.append(token)
        block.children = kept


def _render_fence(
    self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    token = tokens[idx]
    words = token.info.split(maxsplit=1)
    return _code_block_html(words[0] if words else "", token.content)


def _render_code_block(
    self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    return _code_block_html("", tokens[idx].content)


def _render_image(
    self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    # No images from model output: an <img> loads by itself, so a prompt injection could
    # leak the conversation in its URL. Show a link the user can choose to follow instead.
    token = tokens[idx]
    src = str(token.attrGet("src") or "")
    label = self.renderInlineAsText(token.children, options, env) or src
    if not _is_safe_url(src):
        return escape(label)
    return f'<a href="{escape(src)}">{escape(label)}</a>'


def _render_cell_open(
    self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    # markdown-it aligns table cells with style="text-align:..."; we allow no style
    # attributes at all, so turn it into the align attribute.
    token = tokens[idx]
    style = token.attrGet("style")
    if isinstance(style, str) and style.startswith("text-align:"):
        del token.attrs["style"]
        token.attrSet("align", style.removeprefix("text-align:"))
    return self.renderToken(tokens, idx, options, env)


@lru_cache(maxsize=256)
def _lexer(language: str) -> Lexer | None:
    if not language:
        return None
    try:
        return get_lexer_by_name(language)
    except ClassNotFound:
        return None


@lru_cache(maxsize=256)
def _code_block_html(language: str, code: str) -> str:
    lexer = _lexer(language.lower())
    if lexer is None or len(code) > MAX_HIGHLIGHT_CHARS:
        body, css_language = escape(code, quote=False), "text"
    else:
        body, css_language = highlight(code, lexer, _FORMATTER), lexer.aliases[0]
    label = escape(language[:MAX_LANGUAGE_LABEL] or "text")
    return (
        '<div class="codeblock"><div class="codeblock-bar">'
        f'<span class="codeblock-lang">{label}</span>'
        '<button type="button" class="copy" data-copy>Copy</button></div>'
        f'<pre><code class="language-{escape(css_language)}">{body}</code></pre></div>\n'
    )


def _language_classes() -> set[str]:
    classes = {"language-text"}
    for _name, aliases, _filenames, _mimetypes in get_all_lexers():
        if aliases:
            classes.add(f"language-{aliases[0]}")
    return classes


def _build_cleaner() -> nh3.Cleaner:
    cell_align = {"align": {"left", "center", "right"}}
    return nh3.Cleaner(
        tags=ALLOWED_TAGS,
        attributes={"a": {"href", "title"}, "ol": {"start"}, "button": {"data-copy"}},
        tag_attribute_values={"th": cell_align, "td": cell_align},
        allowed_classes={
            "div": {"codeblock", "codeblock-bar"},
            "span": {"codeblock-lang"} | {cls for cls in STANDARD_TYPES.values() if cls},
            "code": _language_classes(),
            "button": {"copy"},
        },
        url_schemes=SAFE_SCHEMES,
        # Relative URLs would resolve against our own site; the model has no business
        # linking into it, and "java%09script:..." is, to a URL parser, a relative URL.
        url_relative="deny",
        link_rel="noopener noreferrer nofollow",
        set_tag_attribute_values={"a": {"target": "_blank"}, "button": {"type": "button"}},
    )


_FORMATTER = HtmlFormatter(style=PYGMENTS_STYLE, nowrap=True)
_MARKDOWN = _build_markdown()
# linkify compiles its patterns (a list of every top-level domain among them) at its first
# use, about 10 ms: at import, not in the first reply rendered while a burst of them streams.
_MARKDOWN.render("https://example.com")
_CLEANER = _build_cleaner()


def render_markdown(text: str) -> str:
    """Render model output to HTML that is safe to put in the page as is.

    Partial markdown (an unclosed code fence, half a table) renders without error, so this
    can be called on a reply while it streams.  Nothing renders to nothing, at once: a
    reply just started is rendered empty with its send, and the cleaner (Rust) lets go of
    the interpreter, which the event loop then waits to get back from the database threads.
    """
    if not text:
        return ""
    return sanitize_html(_MARKDOWN.render(text))


def sanitize_html(html: str) -> str:
    """Clean HTML against the allow-list of what ``render_markdown`` emits."""
    return _CLEANER.clean(html)


def pygments_css() -> str:
    """The stylesheet for the highlighted code blocks (``static/css/highlight.css``).

    Regenerate the file after a Pygments upgrade::

        python -c "from chatapp.chat.rendering import pygments_css; print(pygments_css(), end='')" \\
            > static/css/highlight.css
    """
    rules = [
        "/* Generated by chatapp.chat.rendering.pygments_css(); do not edit by hand. */",
        *_FORMATTER.get_background_style_defs(CSS_SCOPE),
        *_FORMATTER.get_token_style_defs(CSS_SCOPE),
    ]
    return "\n".join(rules) + "\n"

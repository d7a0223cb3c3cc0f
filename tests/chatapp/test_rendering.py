"""Model output (markdown) renders to HTML that is useful and inert."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from chatapp.chat import rendering
from chatapp.chat.rendering import pygments_css, render_markdown, sanitize_html

STATIC_CSS = Path(__file__).resolve().parents[2] / "static" / "css" / "highlight.css"


class Element:
    def __init__(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tag = tag
        self.attrs = dict(attrs)


class Collector(HTMLParser):
    """Every element in a fragment, with its attributes, as a browser would tokenize them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append(Element(tag, attrs))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append(Element(tag, attrs))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html: str) -> Collector:
    collector = Collector()
    collector.feed(html)
    collector.close()
    return collector


def elements(html: str, tag: str | None = None) -> list[Element]:
    return [element for element in parse(html).elements if tag is None or element.tag == tag]


def text_of(html: str) -> str:
    return "".join(parse(html).text)


# --- what the chat needs ---------------------------------------------------------------------


def test_it_renders_a_table_with_alignment_but_no_style() -> None:
    html = render_markdown("| name | cost |\n|:-----|-----:|\n| gpt | 0.25 |\n")
    assert [e.tag for e in elements(html)] == [
        "table", "thead", "tr", "th", "th", "tbody", "tr", "td", "td",
    ]  # fmt: skip
    cells = elements(html, "th") + elements(html, "td")
    assert [cell.attrs for cell in cells] == [
        {"align": "left"},
        {"align": "right"},
        {"align": "left"},
        {"align": "right"},
    ]


def test_it_renders_strikethrough_and_emphasis() -> None:
    html = render_markdown("~~old~~ **new** *now*")
    assert "<s>old</s>" in html
    assert "<strong>new</strong>" in html
    assert "<em>now</em>" in html


def test_it_highlights_a_fenced_code_block_under_a_copy_button() -> None:
    html = render_markdown('Here:\n\n```python\ndef f():\n    return "<x>"\n```\n')

    wrapper, bar, label, button, pre, code = elements(html)[1:7]
    assert (wrapper.tag, wrapper.attrs) == ("div", {"class": "codeblock"})
    assert (bar.tag, bar.attrs) == ("div", {"class": "codeblock-bar"})
    assert (label.tag, label.attrs) == ("span", {"class": "codeblock-lang"})
    assert button.tag == "button"
    assert button.attrs["type"] == "button"
    assert button.attrs["class"] == "copy"
    assert "data-copy" in button.attrs
    assert (pre.tag, code.tag, code.attrs) == ("pre", "code", {"class": "language-python"})
    assert '<span class="k">def</span>' in html
    assert '<span class="nf">f</span>' in html
    assert "&lt;x&gt;" in html  # the code's own markup stays text
    assert 'def f():\n    return "<x>"' in text_of(html)
    assert "style=" not in html  # CSS classes, never inline styles


def test_it_labels_an_unknown_language_and_leaves_the_code_plain() -> None:
    html = render_markdown("```no-such-lang<b>\na < b\n```\n")
    assert '<span class="codeblock-lang">no-such-lang&lt;b&gt;</span>' in html
    assert '<code class="language-text">a &lt; b\n</code>' in html


def test_it_wraps_an_indented_code_block_too() -> None:
    html = render_markdown("Run:\n\n    make test\n")
    assert '<span class="codeblock-lang">text</span>' in html
    assert "make test" in text_of(html)


def test_links_open_in_a_new_tab_without_the_opener_or_referrer() -> None:
    html = render_markdown("[docs](https://example.com/docs) and https://example.org/x?y=1")
    links = elements(html, "a")
    assert [link.attrs["href"] for link in links] == [
        "https://example.com/docs",
        "https://example.org/x?y=1",
    ]
    for link in links:
        assert link.attrs["target"] == "_blank"
        assert link.attrs["rel"] == "noopener noreferrer nofollow"


def test_it_links_only_urls_that_carry_their_scheme() -> None:
    # "settings.py" would otherwise link to a domain in Paraguay.
    html = render_markdown("Edit settings.py or mail ops@example.com; see www.example.com.")
    assert elements(html, "a") == []


def test_a_relative_link_keeps_its_text_but_loses_the_link() -> None:
    html = render_markdown("[the admin](/admin/) [ftp](ftp://example.com/file)")
    assert elements(html, "a") == []
    assert text_of(html) == "the admin ftp\n"


def test_a_markdown_image_becomes_a_link_not_an_img() -> None:
    html = render_markdown('![a *cat*](https://example.com/cat.png "title")')
    assert elements(html, "img") == []
    (link,) = elements(html, "a")
    assert link.attrs["href"] == "https://example.com/cat.png"
    assert text_of(html) == "a cat\n"


def test_an_image_with_a_data_url_is_only_its_alt_text() -> None:
    html = render_markdown("![pixel](data:image/png;base64,iVBORw0KGgo=)")
    assert elements(html, "img") == elements(html, "a") == []
    assert text_of(html) == "pixel\n"


@pytest.mark.parametrize(
    "partial",
    [
        "```python\ndef f(",
        "```\n",
        "| a | b |\n|---|",
        "| a | b |\n|---|---|\n| 1 |",
        "[a link](https://exa",
        "**bold and `code",
        "> quote\n> - item\n>   1. ",
        "<scr",
        "",
    ],
)
def test_partial_markdown_while_streaming_renders_without_error(partial: str) -> None:
    html = render_markdown(partial)
    assert isinstance(html, str)
    assert "<script" not in html


def test_an_unclosed_fence_renders_as_a_code_block_so_far() -> None:
    html = render_markdown("Look:\n\n```python\nx = 1\n")
    assert '<code class="language-python">' in html
    assert "x = 1" in text_of(html)


def test_the_static_stylesheet_is_current() -> None:
    # Regenerate with the command in pygments_css's docstring.
    assert STATIC_CSS.read_text() == pygments_css()


def test_the_stylesheet_is_scoped_to_code_blocks() -> None:
    rules = [line for line in pygments_css().splitlines() if "{" in line]
    assert rules
    assert all(rule.startswith(".codeblock pre") for rule in rules)
    assert ".codeblock pre .k {" in pygments_css()


# --- XSS: everything a model (or a prompt injection) can write must render inert -----------

XSS_CORPUS = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "[x](javascript:alert(1))",
    "[x](JAVASCRIPT:alert(1))",
    "[x](java&#x09;script:alert(1))",
    "[x]( javascript:alert(1) )",
    "[x](<javascript:alert(1)>)",
    "[x][ref]\n\n[ref]: javascript:alert(1)",
    "<svg><script>alert(1)</script></svg>",
    "<svg onload=alert(1)>",
    '<a href="javascript:alert(1)">x</a>',
    '<a href="jav&#x09;ascript:alert(1)">x</a>',
    '<iframe src="javascript:alert(1)">',
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
    '<div style="background:url(javascript:alert(1))">',
    "<form action=javascript:alert(1)><button>x",
    '<button type=submit formaction="javascript:alert(1)">x</button>',
    "![x](javascript:alert(1))",
    '<a href="data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==">x</a>',
    "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    '<p onclick="alert(1)">click</p>',
    '<a href="https://example.com" onclick="alert(1)" style="color:red">x</a>',
    '<object data="javascript:alert(1)"></object>',
    '<embed src="javascript:alert(1)">',
    '<base href="https://evil.example/">',
    '<meta http-equiv="refresh" content="0;url=javascript:alert(1)">',
    "<javascript:alert(1)>",
    "<style>body{background:url(javascript:alert(1))}</style>",
    "<!-- <img src=x onerror=alert(1)> -->",
    '<span class="codeblock" onmouseover="alert(1)">x</span>',
    "```html\n<script>alert(1)</script>\n```",
    "```<img src=x onerror=alert(1)>\ncode\n```",
    "| <img src=x onerror=alert(1)> | b |\n|---|---|\n| [x](javascript:alert(1)) | c |",
]

FORBIDDEN_ELEMENTS = {
    "script", "style", "img", "iframe", "object", "embed", "svg", "math", "form", "base",
    "meta", "link", "input", "textarea", "select", "frame", "frameset", "video", "audio",
}  # fmt: skip


def assert_inert(html: str) -> None:
    assert "<script" not in html.lower()
    for element in elements(html):
        assert element.tag not in FORBIDDEN_ELEMENTS, html
        for name, value in element.attrs.items():
            assert not re.fullmatch(r"on\w+", name), html
            assert name not in {"style", "src", "action", "formaction", "srcdoc"}, html
            if name == "href":
                assert value is not None
                assert re.match(r"(https?|mailto):", value, re.IGNORECASE), html
        if element.tag == "button":
            assert element.attrs.get("type") == "button", html


@pytest.mark.parametrize("attack", XSS_CORPUS)
def test_model_output_renders_inert(attack: str) -> None:
    assert_inert(render_markdown(attack))


@pytest.mark.parametrize("attack", XSS_CORPUS)
def test_the_sanitizer_alone_makes_raw_html_inert(attack: str) -> None:
    # markdown-it escapes raw HTML before the sanitizer sees it; this checks the second
    # layer on its own, as if the first were ever switched off.
    assert_inert(sanitize_html(attack))


def test_raw_html_from_the_model_is_shown_as_text() -> None:
    html = render_markdown("Use <b>bold</b> or <script>alert(1)</script>.")
    assert elements(html, "b") == []
    assert text_of(html) == "Use <b>bold</b> or <script>alert(1)</script>.\n"


def test_the_sanitizer_drops_unknown_classes_but_keeps_ours() -> None:
    html = sanitize_html(
        '<div class="codeblock evil"><span class="k hidden">x</span>'
        '<code class="language-python language-evil">y</code></div>'
    )
    assert html == (
        '<div class="codeblock"><span class="k">x</span><code class="language-python">y</code></div>'
    )


def test_an_empty_reply_renders_to_nothing_without_the_cleaner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every send renders its reply, just started, empty.  The cleaner lets go of the
    # interpreter, and under a burst the event loop waited to get it back from the
    # database threads.
    cleaned: list[str] = []
    real = rendering._CLEANER

    class Counting:
        def clean(self, html: str) -> str:
            cleaned.append(html)
            return real.clean(html)

    monkeypatch.setattr(rendering, "_CLEANER", Counting())
    assert render_markdown("") == ""
    assert cleaned == []
    assert "<em>now</em>" in render_markdown("*now*")
    assert len(cleaned) == 1

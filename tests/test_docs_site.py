"""The website (doc/build.py, `make docs`): the annotated-page splitter, the prose renderer, the strict build, and
the built site opened in headless Chromium (two columns at 1280 px, stacked at 400 px, an equation rendered, a
syllabus link landing on its line)."""

import functools
import http.server
import json
import re
import shutil
import threading
from pathlib import Path

import pytest

from doc import build

pytestmark = pytest.mark.repo  # the whole repository's site: a chapter copied out by common.starter skips it

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

SOURCE = '''r"""Module prose: the $\\sqrt{d}$ scale."""
import math

# A comment block
# in two lines.
SCALE = 2  # a trailing comment stays with the code,
# and so does its second line


def f(x):
    """Docstring prose with a_b * c."""
    s = "# not a comment"
    # inner comment
    return x * SCALE


def g():
    return 1
'''


def test_annotate_puts_prose_beside_the_code_it_precedes():
    sections = build.annotate(SOURCE)
    lines = SOURCE.splitlines()
    shown = [lines[n - 1] for s in sections for n in s.lines]
    assert [s.prose for s in sections] == ["Module prose: the $\\sqrt{d}$ scale.",
                                           "A comment block\nin two lines.", "Docstring prose with a_b * c.",
                                           "inner comment", ""]
    assert [[lines[n - 1].strip() for n in s.lines][:1] for s in sections] == [
        ["import math"], ["SCALE = 2  # a trailing comment stays with the code,"], ["def f(x):"],
        ["return x * SCALE"], ["def g():"]]
    # every line is shown once or is prose (docstrings, full-line comments) or blank; a '#' in a string is code
    assert 's = "# not a comment"' in [x.strip() for x in shown]
    assert "# and so does its second line" in shown
    assert len(shown) == len(set(n for s in sections for n in s.lines))
    prose_rows = {1, 4, 5, 11, 13}
    assert {n for s in sections for n in s.lines} == {i + 1 for i, x in enumerate(lines) if x.strip()} - prose_rows


def test_prose_renders_math_as_mathml_and_keeps_plain_text_plain():
    out = build.prose_html("Scores $q k^T / \\sqrt{d}$, then "
                           "$$\\mathrm{softmax}(x)_i = \\frac{e^{x_i}}{\\sum_j e^{x_j}}$$"
                           " for x * y * z and __init__ <B, T> `a*b_c`.")
    assert out.count("<math") == 2 and 'display="block"' in out and "<msqrt>" in out and "<mfrac>" in out
    assert "x * y * z" in out and "__init__" in out and "&lt;B, T&gt;" in out and "<code>a*b_c</code>" in out
    assert "<em>" not in out and "<strong>" not in out
    assert build.prose_html("costs $5 and $6 per run") == "<p>costs $5 and $6 per run</p>"  # no math there
    block = build.prose_html("Usage:\n    cfg = parse_config(T, x<y)  # a*b\nthen a_b.")  # an indented block
    assert "<pre><code>cfg = parse_config(T, x&lt;y)  # a*b\n</code></pre>" in block and "<p>then a_b.</p>" in block
    with pytest.raises(build.BuildError, match="model.py.*does not parse"):
        build.prose_html("bad $\\left( x$", where="model.py")
    with pytest.raises(build.BuildError, match=r"model.py.*\\nosuchcommand"):
        build.prose_html("bad $\\nosuchcommand x$", where="model.py")


def test_syllabus_links_every_pointer_to_its_line_and_refuses_a_missing_one():
    lines = build.definitions(ROOT / "gpt_minimind" / "model.py")
    test_lines = build.definitions(ROOT / "tests" / "test_gpt_minimind_model.py")
    row = ("| G2 | x | `gpt_minimind/model.py:RMSNorm`, `RotaryEmbedding` | `tests/test_gpt_minimind_model.py::"
           "test_logits_equal_transformers_llama, ::test_gqa_with_one_group_per_head_is_mha` |")
    text = build.link_pointers("## G: gpt_minimind (x)\n\n| ID | c | code | test |\n|---|---|---|---|\n" + row + "\n")
    assert f"(../gpt_minimind/model_py.md#L{lines['RMSNorm']})" in text
    assert f"(../gpt_minimind/model_py.md#L{lines['RotaryEmbedding']})" in text
    gqa = test_lines["test_gqa_with_one_group_per_head_is_mha"]
    assert f"(../tests/test_gpt_minimind_model_py.md#L{gqa})" in text
    source = (ROOT / "gpt_minimind/model.py").read_text().splitlines()
    assert source[lines["RMSNorm"] - 1].startswith("class RMSNorm")
    test = "`tests/test_gpt_minimind_model.py::test_logits_equal_transformers_llama`"
    with pytest.raises(build.BuildError, match=r"gpt_minimind/model.py:NoSuchLayer"):
        build.link_pointers(f"| G2 | x | `gpt_minimind/model.py:NoSuchLayer` | {test} |\n")
    with pytest.raises(build.BuildError, match=r"test_gpt_minimind_model.py::test_gone"):
        build.link_pointers("| G2 | x | `gpt_minimind/model.py:RMSNorm` | "
                            "`tests/test_gpt_minimind_model.py::test_gone` |\n")


def test_a_broken_link_or_anchor_fails_the_build(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(build.CSS, src / "site.css")
    (src / "index.md").write_text("# Home\n\n[the model](other.md#L2)\n")
    (src / "other.md").write_text('# Other\n\n<span class="line" id="L2">x = 1</span>\n')
    build.mkdocs_build(src, tmp_path / "site")  # sound: builds
    assert (tmp_path / "site" / "other.html").is_file()
    (src / "index.md").write_text("# Home\n\n[gone](nope.md) and [no line](other.md#L9)\n")
    with pytest.raises(build.BuildError) as e:
        build.mkdocs_build(src, tmp_path / "site")
    assert "nope.md" in str(e.value) and "#L9" in str(e.value)


def test_pointer_corners_link_the_right_words_or_refuse():
    lines = build.definitions(ROOT / "gpt_minimind" / "model.py")
    row = ("| G | c | `gpt_minimind/model.py:MiniMindAttention (uses repeat_kv, x[::2]), repeat_kv` | "
           "`tests/test_layout.py::test_chapters_are_found, ::test_no_import_cycles` |")
    out = build.link_pointers("## G: gpt_minimind (x)\n" + row + "\n```\n| `model.py:Gone` |\n```\n")
    assert f"` (uses repeat_kv, x[::2]), `[`repeat_kv`](../gpt_minimind/model_py.md#L{lines['repeat_kv']})" in out
    assert "[`::test_no_import_cycles`](../tests/test_layout_py.md#L" in out  # the table in a fence: untouched
    assert "| `model.py:Gone` |" in out
    # from a chapter README: ../ paths resolve; a member several classes define must be named with its class
    clip = build.link_pointers("| C | `../common/distributed.py:wrap` |", ROOT / "clip", "clip", "clip/README.md")
    assert "(../common/distributed_py.md#L" in clip
    with pytest.raises(build.BuildError, match="several classes define it"):
        build.link_pointers("| F | `t5_summarization/model.py:T5LayerNorm`, `forward` |")
    assert build.definitions(ROOT / "appendix" / "parallel.py")["worker"] > 100  # the function, not the field


def test_every_link_of_the_real_syllabus_lands_on_the_line_it_names():
    """doc/syllabus.md as the site shows it: each link's target line defines the symbol its text names, and no
    code or test name is left without its link."""
    out = build.link_pointers((ROOT / "doc" / "syllabus.md").read_text(encoding="utf-8"))
    links = re.findall(r"\[`([^`]+)`\]\(\.\./([\w/]+)_py\.md#L(\d+)\)", out)
    assert len(links) > 300
    for text, page, line in links:
        symbol = re.split(r"::|:", text)[-1].split(".")[-1]
        source = (ROOT / f"{page}.py").read_text(encoding="utf-8").splitlines()[int(line) - 1]
        assert re.search(rf"\b(def|class) {symbol}\b|\b{symbol}\s*[:=]|self\.{symbol}\b", source), \
            f"{text} -> {page}.py:{line} reads {source.strip()!r}"
        whole = (ROOT / f"{page}.py").read_text(encoding="utf-8")
        if "." not in text.split(":")[-1] and re.search(rf"^(def|class) {symbol}\b", whole, re.M):
            assert re.match(rf"(def|class) {symbol}\b", source), f"{text}: a field hides the top-level {symbol}"
    for row in out.splitlines():
        if row.startswith("| ") and row.count(" | ") >= 3:
            tests_cell = row.split(" | ")[-1]
            unlinked = re.sub(r"\[`[^`]+`\]\([^)]+\)", "", tests_cell)
            assert not re.search(r"`[^`]*(::\w+|\btest_\w+)[^`]*`", unlinked), row


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    return build.build(out / "site", out / "src")


def test_the_whole_site_builds_with_every_chapter_file_and_recorded_result(site):
    chapters = build.chapters()
    assert {"gpt_minimind", "appendix", "llava"} <= set(chapters)
    records = json.loads((ROOT / "doc" / "results.json").read_text())
    for chapter in chapters:
        page = (site / chapter / "index.html").read_text()
        for py in (ROOT / chapter).glob("*.py"):
            if py.name != "__init__.py":
                assert (site / chapter / f"{py.stem}_py.html").is_file(), py
                assert f'href="{py.stem}_py.html"' in page, f"{chapter}/index.html does not list {py.name}"
        mine = [r for r in records if r["chapter"] == chapter]
        assert mine, f"no recorded results for {chapter}"
        assert f"<strong>{mine[0]['run']}</strong>" in page  # the figures come from doc/results.json
    assert (site / "doc" / "syllabus.html").is_file() and (site / "doc" / "results.html").is_file()
    # the order a learner reads a chapter in
    names = [p.name for p in build.reading_order("gpt_minimind")]
    assert names[0] == "model.py" and names.index("train_pretrain.py") < names.index("train_sft.py") \
        < names.index("train_dpo.py") < names.index("train_ppo.py") < names.index("infer.py")
    # offline: nothing is fetched from another host
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert not re.search(r'<(script|link|img)[^>]+(src|href)="(https?:)?//', text), page
    assert any("<math" in p.read_text() for p in site.glob("*/*_py.html"))


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (CI installs Debian's chromium)")
def test_the_site_in_a_real_browser(site, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            elsewhere = []  # any request to another host is recorded, refused, and fails the test

            def refuse(route):
                elsewhere.append(route.request.url)
                route.abort()

            page.route(re.compile(r"^(?!http://127\.0\.0\.1)"), refuse)

            page.goto(base + "index.html")
            assert "Transformer" in page.title()
            page.screenshot(path=tmp_path / "front.png")
            # search (Material's own worker and index, served from here) finds the code
            page.locator(".md-search__input").first.click()
            page.keyboard.type("kl_penalized_rewards")
            page.locator(".md-search-result__item").first.wait_for(timeout=15000)
            assert "train_ppo.py" in page.locator(".md-search-result").inner_text()
            page.keyboard.press("Escape")

            # a chapter's page: its README, its files in reading order, its recorded results
            page.goto(base + "gpt_minimind/index.html")
            assert page.locator("h2#recorded-results").is_visible()
            assert page.locator('a[href="model_py.html"]').first.is_visible()
            page.screenshot(path=tmp_path / "chapter_index.png", full_page=False)

            # an annotated file: prose and code side by side at 1280 px, stacked at 400 px
            page.goto(base + "gpt_minimind/train_ppo_py.html")
            section = page.locator(".annotated-section", has=page.locator(".annotated-prose p")).nth(1)
            prose, code = (section.locator(c).bounding_box() for c in (".annotated-prose", ".annotated-code"))
            assert prose["x"] + prose["width"] <= code["x"] + 1 and abs(prose["y"] - code["y"]) < 2, (prose, code)
            page.screenshot(path=tmp_path / "chapter_1280.png")
            page.set_viewport_size({"width": 400, "height": 900})
            prose, code = (section.locator(c).bounding_box() for c in (".annotated-prose", ".annotated-code"))
            assert code["y"] >= prose["y"] + prose["height"] - 1 and abs(prose["x"] - code["x"]) < 2, (prose, code)
            page.screenshot(path=tmp_path / "chapter_400.png")
            page.set_viewport_size({"width": 1280, "height": 900})

            # an equation laid out by the browser as mathematics (MathML, no script): RMSNorm's fraction has its
            # numerator above its denominator, which text would not
            page.goto(base + "gpt_minimind/model_py.html")
            fraction = page.locator(".annotated-prose math mfrac").first
            top, bottom = (fraction.locator(f":scope > :{n}-child").bounding_box() for n in ("first", "last"))
            assert top["y"] + top["height"] <= bottom["y"] + 1 and top["height"] > 3, (top, bottom)

            # a syllabus link lands on the definition's line, in view
            page.goto(base + "doc/syllabus.html")
            line = build.definitions(ROOT / "gpt_minimind" / "model.py")["RMSNorm"]
            page.locator(f'a[href="../gpt_minimind/model_py.html#L{line}"]').first.click()
            page.wait_for_url(re.compile(rf"model_py\.html#L{line}$"))
            target = page.locator(f"#L{line}")
            assert "class RMSNorm" in target.inner_text()
            box = target.bounding_box()
            assert 0 <= box["y"] < 900, box
            page.screenshot(path=tmp_path / "syllabus_link.png")
            browser.close()
        assert not elsewhere, f"the site asked another host for {elsewhere}"
    finally:
        server.shutdown()
    print(f"screenshots in {tmp_path}")

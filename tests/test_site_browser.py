"""The built site in a real browser: headless Chromium (Debian's package) driven by Playwright.

Never downloads a browser: Playwright is pointed at the system binary (``/usr/bin/chromium``, or
``$CHROMIUM``). The site is the session build of the real catalog plus the test fixtures (a method with
a stored result, an entry full of script tags), served from a local HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest
from _site_build import FIXTURE_DEVICE, FIXTURE_ID, FIXTURE_TITLE, MALICIOUS_ID, build_once
from playwright.sync_api import expect, sync_playwright

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise AssertionError("no Chromium found: `apt-get install -y chromium` (or set CHROMIUM=/path/to/binary)")


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return build_once(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def base_url(built):
    assert built["report"].ok, built["report"].failures

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - the base class's signature
            pass

    handler = functools.partial(Quiet, directory=str(built["site"]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS,
                                              headless=True)
        yield instance
        instance.close()


@pytest.fixture
def page(browser):
    """A page that records console errors, uncaught exceptions and dialogs (alert, confirm, ...)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    tab.errors, tab.dialogs = [], []
    tab.on("console", lambda msg: tab.errors.append(msg.text) if msg.type == "error" else None)
    tab.on("pageerror", lambda exc: tab.errors.append(str(exc)))
    tab.on("dialog", lambda dialog: (tab.dialogs.append(dialog.message), dialog.dismiss()))
    yield tab
    context.close()


def _visible_rows(tab, table_id: str) -> int:
    return tab.locator(f"#{table_id} tbody tr:visible").count()


def test_search_finds_a_method_and_its_page_shows_measured_costs(page, base_url):
    page.goto(base_url)
    page.locator(".md-search__input").fill("Fixture Method With Stored")
    result = page.locator(f".md-search-result__item a[href*='{FIXTURE_ID}']").first
    expect(result).to_be_visible(timeout=15_000)
    result.click()
    page.wait_for_url(f"**/{FIXTURE_ID}/**")
    expect(page.locator("h1").first).to_contain_text(FIXTURE_TITLE)
    table = page.locator("table").filter(has_text="MACs dense").first
    expect(table).to_be_visible()
    rows = table.locator("tbody tr")
    assert rows.count() == 2
    first = [c.strip() for c in rows.nth(0).locator("td").all_inner_texts()]
    assert first == ["paper_point", "1", "4.089 G", "2.045 G", "2.00x", "12.346", "8.230", "1.50x", "1.25x-1.75x",
                     "0.75"]
    expect(page.get_by_text(f"cpu ({FIXTURE_DEVICE})")).to_be_visible()
    assert page.errors == [] and page.dialogs == []


def test_category_table_filters_and_sorts(page, base_url):
    page.goto(base_url + "depth/")
    bar = page.locator(".catalog-filters[data-table='table-depth']")
    expect(bar).to_be_visible()
    total = _visible_rows(page, "table-depth")
    assert total >= 20
    bar.locator("input[data-filter='text']").fill("skip")
    narrowed = _visible_rows(page, "table-depth")
    assert 0 < narrowed < total
    for text in page.locator("#table-depth tbody tr:visible").all_inner_texts():
        assert "skip" in text.lower()
    expect(bar.locator(".catalog-count")).to_have_text(f"{narrowed} of {total} shown")
    bar.locator("input[data-filter='text']").fill("")
    bar.locator("select[data-filter='decision']").select_option("gate")
    gated = _visible_rows(page, "table-depth")
    assert 0 < gated < total
    decisions = page.locator("#table-depth tbody tr:visible td:nth-child(5)").all_inner_texts()
    assert {d.strip() for d in decisions} == {"gate"}
    bar.locator("select[data-filter='decision']").select_option("")
    year = page.locator("#table-depth th", has_text="Year")
    year.click()
    year.click()
    years = [int(y) for y in page.locator("#table-depth tbody tr td:nth-child(2)").all_inner_texts()]
    assert years == sorted(years, reverse=True) and len(years) == total
    assert page.errors == []


def test_tables_degrade_to_plain_tables_without_javascript(browser, base_url):
    context = browser.new_context(java_script_enabled=False)
    tab = context.new_page()
    tab.goto(base_url + "depth/")
    expect(tab.locator(".catalog-filters")).to_be_hidden()
    assert tab.locator("#table-depth tbody tr:visible").count() >= 20
    context.close()


def test_script_in_an_entry_is_not_executed(page, base_url, built):
    page.goto(base_url + f"{built['evil'].taxonomy.category}/{MALICIOUS_ID}/")
    expect(page.locator("h1").first).to_contain_text("<script>window.__pwned=1</script>")
    expect(page.locator("body")).to_contain_text('<img src=x onerror="window.__pwned=2">')
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("a[href^='javascript:']").count() == 0
    page.locator(".md-search__input").fill("Evil Title")
    expect(page.locator(".md-search-result__item").first).to_be_visible(timeout=15_000)
    page.wait_for_timeout(300)
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.dialogs == [] and page.errors == []

"""Opens every page of the built site in headless Chromium and checks what a
reader sees (`python -m nox -s docs-browser` runs it after the build).

    python -m tools.browse_site site --screenshots /tmp/kmask-site

The site is served on 127.0.0.1 (a free port) and each page is loaded in
Debian's Chromium through its chromedriver (selenium, told both paths, so it
downloads nothing). A page fails on:

- an internal link to a file that is not in the site (or to a folder, which
  `file://` shows as a directory listing), or to an anchor the page lacks;
- an image that does not load;
- an `Examples:` section of the API reference that is not a highlighted
  Python session (a code block with `>>>` prompts), or a doctest outside a
  code block;
- a private module (`kmask._name`) in the text;
- an error on the browser's console;
- text wider than its column at a 1280-pixel window (a code block or table
  whose lines are cut off or need a scroll bar);
- and, opened from the file system as README says: a quickstart link that
  shows no page, or a search that finds nothing.

Prints the counts checked and every failure; exits 1 when there is one.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
WINDOW = (1280, 1000)
PRIVATE_MODULE = re.compile(r"\bkmask\._[a-z]\w*")
# Three pages kept as pictures: an API page, a quickstart, the Measured page.
SCREENSHOTS = ("api/losses.html", "quickstart/pad-value.html", "measured.html")
# Searched for from file://, where search needs the offline plugin's index.
SEARCH_TERM = "sequence_mask"
SEARCH_WAIT_S = 15

# What the page shows, read in the browser after layout.
PAGE_SCRIPT = """
const content = document.querySelector('.md-content__inner');
const column = content.getBoundingClientRect();
const links = [...document.querySelectorAll('a[href]')].map(a => a.href);
const images = [...document.querySelectorAll('img')].map(
  img => [img.currentSrc || img.src, img.complete && img.naturalWidth > 0]);
const ids = [...document.querySelectorAll('[id]')].map(e => e.id);
// Each "Examples:" title of the API reference, and what follows it.
const examples = [...content.querySelectorAll('p')]
  .filter(p => /^Examples?:$/.test(p.textContent.trim()))
  .map(p => {
    // Highlighted as a Python console session: a `>>>` prompt token.
    const next = p.nextElementSibling;
    const highlighted =
      next && next.matches('div.highlight') && next.querySelector('.gp');
    const code = highlighted ? next.innerText : null;
    return [p.closest('.doc-object')?.querySelector('.doc-heading')?.id || '?', code];
  });
// Doctest prompts that are not in a code block (Markdown turns `>>>` into
// nested blockquotes).
const loose = [...content.querySelectorAll('p, blockquote, li, td')]
  .filter(e => !e.closest('pre, code') && e.textContent.includes('>>>'))
  .map(e => e.textContent.trim().slice(0, 80));
// Text wider than the column: a box that sticks out of the column, or a
// scroll box that scrolls (a table's wrapper reaches into the column's
// margin by design, so only its scrolling counts). Inline code's padding
// may reach past the end of a line by a few pixels: half a character is
// allowed, no more.
const slack = 4;
const wide = [];
const text = 'pre > code, table, p, li, h1, h2, h3, .doc-signature';
for (const e of content.querySelectorAll(text + ', .md-typeset__scrollwrap')) {
  const right = e.getBoundingClientRect().right;
  const sticksOut = e.matches(text) && right > column.right + slack;
  if (sticksOut || e.scrollWidth > e.clientWidth + slack) {
    wide.push(e.tagName.toLowerCase() + ': ' + e.textContent.trim().slice(0, 60));
  }
}
return {links, images, ids, examples, loose, wide, text: document.body.innerText};
"""


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """The site on 127.0.0.1, a free port, in a daemon thread."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def browser(profile: str):
    """Debian's Chromium through Debian's chromedriver; selenium is given both
    paths, so Selenium Manager never runs (it would download a browser)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def pages(site: Path) -> list[str]:
    """Every HTML page of the site, as paths relative to its root."""
    return sorted(
        path.relative_to(site).as_posix()
        for path in site.rglob("*.html")
        if path.relative_to(site).parts[0] not in ("assets", "search")
    )


def search_from_file(driver, site: Path) -> tuple[int, list[str]]:
    """Opens the home page from the file system (as README says to), follows
    its first quickstart link and searches there for `SEARCH_TERM`: the number
    of results, and what failed."""
    from selenium.webdriver.common.by import By

    driver.get((site / "index.html").as_uri())
    links = driver.find_elements(By.CSS_SELECTOR, "article a[href*='quickstart/']")
    if not links:
        return 0, ["file://: the home page links to no quickstart"]
    address = links[0].get_attribute("href")
    driver.get(address)
    failures = []
    if not driver.find_elements(By.CSS_SELECTOR, "article h1"):
        failures.append(f"file://: {address} shows no page")
    box = driver.find_element(By.CSS_SELECTOR, "input.md-search__input")
    box.click()
    box.send_keys(SEARCH_TERM)
    deadline = time.monotonic() + SEARCH_WAIT_S
    results = []
    while not results and time.monotonic() < deadline:
        time.sleep(0.25)
        results = driver.find_elements(By.CSS_SELECTOR, ".md-search-result__item")
    if not results:
        failures.append(f"file://: searching {SEARCH_TERM!r} finds nothing")
    return len(results), failures


def target_file(site: Path, root: str, url: str) -> tuple[Path | None, str]:
    """The file an internal link opens (None when outside the site), and its
    anchor."""
    address, anchor = urldefrag(url)
    if not address.startswith(root):
        return None, ""
    return site / unquote(urlparse(address).path).lstrip("/"), anchor


def check(site: Path, screenshots: Path | None) -> int:
    server, root = serve(site)
    failures: list[str] = []
    anchors_wanted: list[tuple[str, Path, str]] = []
    ids_by_file: dict[Path, set[str]] = {}
    counts = dict(pages=0, links=0, images=0, examples=0)
    names = pages(site)
    with tempfile.TemporaryDirectory(prefix="kmask-chromium-") as profile:
        driver = browser(profile)
        try:
            for name in names:
                driver.get(root + name)
                seen = driver.execute_script(PAGE_SCRIPT)
                counts["pages"] += 1
                ids_by_file[(site / name).resolve()] = set(seen["ids"])
                for url in seen["links"]:
                    path, anchor = target_file(site, root, url)
                    if path is None:
                        continue
                    counts["links"] += 1
                    if not path.is_file():
                        failures.append(f"{name}: broken link {url}")
                    elif anchor:
                        anchors_wanted.append((name, path.resolve(), anchor))
                for source, loaded in seen["images"]:
                    counts["images"] += 1
                    if not loaded:
                        failures.append(f"{name}: image does not load {source}")
                for heading, code in seen["examples"]:
                    counts["examples"] += 1
                    if code is None or ">>>" not in code:
                        failures.append(
                            f"{name}: example of {heading} is not highlighted code"
                        )
                failures += [
                    f"{name}: doctest outside code: {t}" for t in seen["loose"]
                ]
                failures += [
                    f"{name}: wider than its column: {t}" for t in seen["wide"]
                ]
                failures += [
                    f"{name}: private module {module}"
                    for module in sorted(set(PRIVATE_MODULE.findall(seen["text"])))
                ]
                failures += [
                    f"{name}: console {entry['level']}: {entry['message']}"
                    for entry in driver.get_log("browser")
                    if entry["level"] in ("SEVERE", "ERROR")
                ]
                if screenshots is not None and name in SCREENSHOTS:
                    screenshots.mkdir(parents=True, exist_ok=True)
                    picture = screenshots / name.replace("/", "_").replace(
                        ".html", ".png"
                    )
                    driver.save_screenshot(str(picture))
            found, file_failures = search_from_file(driver, site)
            failures += file_failures
        finally:
            driver.quit()
            server.shutdown()
    for name, path, anchor in anchors_wanted:
        if anchor not in ids_by_file.get(path, set()):
            failures.append(
                f"{name}: no anchor #{anchor} in {path.relative_to(site.resolve())}"
            )
    print(
        f"site check: {counts['pages']} pages, {counts['links']} internal links, "
        f"{len(anchors_wanted)} anchors, {counts['images']} images, "
        f"{counts['examples']} examples checked; from file://, {found} search "
        f"results for {SEARCH_TERM!r}; {len(failures)} failures"
    )
    for failure in failures:
        print("  " + failure)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="the built site's folder")
    parser.add_argument("--screenshots", type=Path, help="folder for the PNGs")
    arguments = parser.parse_args(argv)
    return check(arguments.site.resolve(), arguments.screenshots)


if __name__ == "__main__":
    sys.exit(main())

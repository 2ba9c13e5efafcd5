"""The page in a real headless Chromium (Debian's ``chromium``), driven over the DevTools protocol: a query typed
key by key, the results with their chunks highlighted by weight, the diagnostics strip, the conversation pane's turn
weights, a screenshot, and no console error."""

import struct

import pytest

pytest.importorskip("uvicorn", reason="the web app's server is uvicorn (the web extra)")
pytest.importorskip("websocket", reason="the browser is driven with websocket-client (the web extra)")

from attnpool.kb.methods import DEFAULT_METHOD
from attnpool.web.browser import Chromium, find_chromium
from attnpool.web.loadtest import BackgroundServer

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)")

QUERY = "zebra quokka marmoset paragraph"


@pytest.fixture(scope="module")
def server(app):
    with BackgroundServer(app) as s:
        yield s


@pytest.fixture
def browser(server):
    with Chromium(width=1200, height=900) as b:
        b.navigate(server.url + "/")
        b.wait_for("document.body && document.body.dataset.state === 'ready'")
        yield b


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


def search_in_page(browser, query):
    browser.click("#query")
    browser.type_text(query)
    assert browser.evaluate("document.getElementById('query').value") == query  # the keys reached the box
    browser.press_enter()
    browser.wait_for("document.body.dataset.state === 'results' || document.body.dataset.state === 'error'")
    assert browser.evaluate("document.getElementById('error').hidden"), browser.evaluate(
        "document.getElementById('error').textContent")


def test_typing_a_query_shows_hits_with_highlighted_chunks(browser, kb, tmp_path):
    info = browser.evaluate("document.getElementById('store-info').textContent")
    assert f"{kb.num_documents} documents" in info
    search_in_page(browser, QUERY)
    hits = browser.evaluate("""[...document.querySelectorAll('#results .hit')].map(h => ({
        id: h.dataset.docId, title: h.querySelector('.title').textContent,
        cells: h.querySelectorAll('.heat span').length,
        signals: h.querySelector('.signals') ? h.querySelector('.signals').textContent : null,
        chunks: [...h.querySelectorAll('.chunk')].map(c => ({w: Number(c.dataset.weight), text: c.textContent,
                                                            bg: c.style.background}))}))""")
    # the page starts on the default method, the hybrid, and shows what `kb search --explain` shows
    assert browser.evaluate("document.getElementById('method').value") == DEFAULT_METHOD
    want = kb.search(QUERY, method=DEFAULT_METHOD, k=10, explain=True, top_chunks=3)
    assert [h["id"] for h in hits] == [h.doc_id for h in want]
    assert hits[0]["title"] == "gcloud storage buckets delete"
    for shown, hit in zip(hits, want):
        assert shown["cells"] == len(hit.chunks)  # one heat cell per chunk of the document
        weights = [c["w"] for c in shown["chunks"]]
        assert weights == sorted(weights, reverse=True)
        assert len(weights) == sum(bool(c.text) for c in hit.chunks) >= min(3, len(hit.chunks))
        assert all(c["bg"].startswith("rgba(") for c in shown["chunks"])
        for name, sig in hit.signals.items():
            assert f"{name} #{sig['rank']}" in shown["signals"]
    # the heaviest chunk of the top hit is the planted passage, and it is drawn with the strongest highlight
    top = hits[0]["chunks"]
    assert "zebra quokka marmoset" in top[0]["text"]
    alphas = [float(c["bg"].rsplit(",", 1)[1].rstrip(") ")) for c in top]
    assert alphas == sorted(alphas, reverse=True) and alphas[0] > alphas[-1]
    strip = browser.evaluate("document.getElementById('diagnostics').innerText")
    assert "effective N" in strip and "entropy" in strip and f"of {len(want[0].chunks)} chunks" in strip
    png = browser.screenshot(tmp_path / "kb-web.png")
    width, height = png_size((tmp_path / "kb-web.png").read_bytes())
    assert png and width == 1200 and height >= 900 and len(png) > 20_000
    assert browser.console_errors == []


def test_the_conversation_pane_shows_turn_weights(browser):
    pytest.importorskip("attnpool.conversation", reason="attnpool.conversation (history pooling) is not present")
    browser.click("#conversation summary")
    browser.click("#turns")
    browser.type_text("user: how do I list pubsub topics\nassistant: gcloud pubsub topics list")
    search_in_page(browser, "and how do I delete a bucket")
    rows = browser.evaluate("[...document.querySelectorAll('#turn-weights li')].map(li => li.textContent)")
    assert len(rows) == 3 and rows[0].startswith("user:") and rows[2].startswith("current:")
    weights = [float(r.rsplit("weight ", 1)[1]) for r in rows]
    assert sum(weights) == pytest.approx(1.0, abs=3e-3)
    strip = browser.evaluate("document.getElementById('diagnostics').innerText")
    assert "turns: effective N" in strip and "of 3" in strip
    assert browser.evaluate("document.querySelectorAll('#results .hit').length") == 10
    assert browser.console_errors == []


def test_the_passages_pane_shows_a_selection_within_the_budget(browser):
    browser.click("#passages-pane summary")
    search_in_page(browser, QUERY)
    summary = browser.evaluate("document.getElementById('passages-summary').textContent")
    tokens, budget = (int(x) for x in summary.split(" passages, ", 1)[1].split(" tokens", 1)[0].split(" of "))
    assert 0 < tokens <= budget == 512
    items = browser.evaluate("[...document.querySelectorAll('#passages li')].map(li => li.dataset.docId)")
    assert items and all(items)
    assert browser.console_errors == []

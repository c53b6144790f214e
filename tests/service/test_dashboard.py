"""The dashboard in real headless Chromium (Debian's ``chromium`` driven by Playwright).

A real server (embedded default: SQLite, in-process worker) holds an owner's MNIST CNN, once
with its watermark key and once without; an auditor verifies a permuted copy against the keyed
one, the owner a copy against the keyless one. Through the sign-in form: the lists, then each
finished job with its verdict token and every picture drawn, with no console error, no page
error, no failed request and no HTTP error. Another owner's key sees none of it. A screenshot
of the keyed job's page is kept under ``tests/artifacts/`` (or ``$FINDLADY_ARTIFACTS``).

Skipped when Chromium or Playwright is missing, except under FINDLADY_REQUIRE_SERVICES=1 (CI).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.main import create_app
from app.server import BackgroundServer

from .helpers import Api, test_settings

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("FINDLADY_ARTIFACTS") or Path(__file__).resolve().parents[1] / "artifacts")
PICTURES = ("sim-before", "sim-after", "margins", "integrity")

pytestmark = [pytest.mark.timeout(600)]


def _need(what: str) -> None:
    if os.environ.get("FINDLADY_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} is missing and FINDLADY_REQUIRE_SERVICES=1")
    pytest.skip(f"{what} is missing (apt-get install chromium; pip install playwright)")


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("the playwright package")
    if not CHROMIUM.exists():
        _need(str(CHROMIUM))
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Any) -> Iterator[Any]:
    b = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
    yield b
    b.close()


@dataclass
class World:
    url: str
    owner: str
    auditor: str
    stranger: str  # another owner: a different tenant
    keyed_job: str
    plain_job: str
    keyed_ref: str
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, watermarked_mnist_cnn: Any, mnist_cnn_spec: Any) -> Iterator[World]:
    from findlady_core import attacks
    from findlady_core.io import save_state_dict
    from findlady_core.watermark import save_key

    _, ref, key = watermarked_mnist_cnn
    d = tmp_path_factory.mktemp("dashboard")
    paths = {n: d / f"{n}.safetensors" for n in ("reference", "key", "suspect", "other")}
    save_state_dict(ref, paths["reference"])
    save_key(key, paths["key"])
    mnist_cnn_spec.save(d / "spec.json")
    save_state_dict(attacks.permute(ref, mnist_cnn_spec, seed=11).state_dict, paths["suspect"])
    save_state_dict(attacks.permute(ref, mnist_cnn_spec, seed=12).state_dict, paths["other"])

    settings = test_settings(tmp_path_factory.mktemp("service"), max_upload_bytes=64 * 1024 * 1024)
    with BackgroundServer(create_app(settings)) as server:
        api = Api(server.url, settings.admin_key_value())
        owner, auditor, stranger = api.account("owner", "acme"), api.account("auditor", "audit-co"), api.account("owner")
        keyed = api.register(owner, "mnist-cnn", weights=paths["reference"], spec=d / "spec.json", key=paths["key"])
        plain = api.register(owner, "mnist-cnn-nokey", weights=paths["reference"], spec=d / "spec.json")
        assert keyed.status_code == plain.status_code == 201, keyed.text + plain.text
        j1 = api.submit(auditor, keyed.json()["id"], paths["suspect"])
        j2 = api.submit(owner, plain.json()["id"], paths["other"])
        assert j1.status_code == j2.status_code == 202
        w = World(server.url, owner, auditor, stranger, j1.json()["id"], j2.json()["id"], keyed.json()["id"])
        w.jobs = {w.keyed_job: api.wait(auditor, w.keyed_job, timeout=300), w.plain_job: api.wait(owner, w.plain_job, timeout=300)}
        assert all(j["status"] == "succeeded" for j in w.jobs.values()), w.jobs
        yield w


class Watch:
    """Everything that went wrong on a page: console errors, page errors, failed requests, HTTP >= 400."""

    def __init__(self, page: Any) -> None:
        self.problems: list[str] = []
        page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} {r.failure}"))
        page.on("response", lambda r: self.problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)


def sign_in(browser: Any, url: str, key: str, path: str = "/ui/") -> tuple[Any, Any, Watch]:
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    page = context.new_page()
    watch = Watch(page)
    page.goto(url + path)
    page.get_by_test_id("api-key").fill(key)
    page.get_by_test_id("api-key").press("Enter")  # the form submits on Enter
    page.get_by_test_id("who").filter(has_text="(").wait_for()
    return context, page, watch


# A canvas's pixels, copied onto a scratch canvas first: reading the page's own canvas again and
# again would make Chromium warn (willReadFrequently) in the console the test is watching.
PIXELS = """
  const PIXELS = (el) => {
    const c = document.createElement('canvas');
    c.width = el.width; c.height = el.height;
    const ctx = c.getContext('2d', {willReadFrequently: true});
    ctx.drawImage(el, 0, 0);
    return ctx.getImageData(0, 0, c.width, c.height).data;
  };"""


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as _expect

    return _expect(locator)


def drawn(page: Any, testid: str) -> dict[str, Any]:
    """What an element holds: a canvas's size and distinct non-transparent colours, or an svg's shapes."""
    return page.get_by_test_id(testid).evaluate(
        "el => {" + PIXELS + """
          if (el.tagName.toLowerCase() === 'canvas') {
            const d = PIXELS(el);
            const colours = new Set();
            let opaque = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0) { opaque++; colours.add(d[i] << 16 | d[i + 1] << 8 | d[i + 2]); }
            return {kind: 'canvas', width: el.width, height: el.height, opaque, colours: colours.size};
          }
          return {kind: 'svg', shapes: el.querySelectorAll('rect, line, path').length};
        }"""
    )


def diagonal_contrast(page: Any, testid: str) -> float:
    """Mean brightness (R+G+B) of a heatmap canvas's diagonal minus that of the rest."""
    return page.get_by_test_id(testid).evaluate(
        "el => {" + PIXELS + """
          const n = el.width, d = PIXELS(el);
          let on = 0, off = 0;
          for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) {
            const o = 4 * (i * n + j), v = d[o] + d[o + 1] + d[o + 2];
            if (i === j) on += v; else off += v;
          }
          return on / n - off / (n * n - n);
        }"""
    )


def open_job(page: Any, job_id: str) -> None:
    page.locator(f"[data-testid=job-row][data-id='{job_id}'] a").first.click()
    page.get_by_test_id("verdict").wait_for()
    page.get_by_test_id("margins").wait_for()


def test_owner_sees_lists_verdicts_and_pictures(browser: Any, world: World) -> None:
    context, page, watch = sign_in(browser, world.url, world.owner)
    try:
        page.get_by_test_id("job-row").nth(1).wait_for()
        assert page.get_by_test_id("ref-row").count() == 2
        assert sorted(page.locator("[data-testid=job-row]").evaluate_all("rs => rs.map(r => r.dataset.id)")) == \
            sorted([world.keyed_job, world.plain_job])
        assert page.get_by_test_id("job-verdict").all_inner_texts() == ["match", "match"]
        assert "sessionStorage" not in page.url and world.owner not in page.url
        assert context.cookies() == []  # the key is not a cookie
        assert page.evaluate("sessionStorage.getItem('findlady.apiKey')") == world.owner

        open_job(page, world.keyed_job)
        assert page.url.endswith(f"/ui/verifications/{world.keyed_job}")
        assert page.get_by_test_id("verdict").inner_text() == world.jobs[world.keyed_job]["report"]["verdict"] == "match"
        assert page.get_by_test_id("verdict-label").inner_text().startswith("the suspect is the reference")
        reasons = page.get_by_test_id("reasons").locator("li").all_inner_texts()
        assert reasons == world.jobs[world.keyed_job]["report"]["reasons"] and reasons
        page.get_by_test_id("bits").wait_for()
        for testid in PICTURES:
            d = drawn(page, testid)
            if d["kind"] == "canvas":
                assert d["width"] >= 16 and d["opaque"] == d["width"] * d["height"] and d["colours"] > 4, (testid, d)
            else:
                assert d["shapes"] > 3, (testid, d)
        # an unmodified permuted copy: after re-synchronization the bright cells sit on the diagonal,
        # before it they do not
        assert diagonal_contrast(page, "sim-after") > 100 > diagonal_contrast(page, "sim-before")
        assert drawn(page, "bits")["shapes"] == 3 * 64
        wm = world.jobs[world.keyed_job]["report"]["watermark"]
        # hollow red cells: bits that differ from the key, all in the "before" row
        assert page.locator("[data-testid=bits] rect.wrong").count() == wm["bit_errors_before_resync"] > 0
        assert wm["bit_errors"] == 0
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-job.png"), full_page=True)

        # another group's matrices on request
        options = page.get_by_test_id("group-select").locator("option").all_inner_texts()
        assert len(options) == 3
        page.get_by_test_id("group-select").select_option(index=0)
        expect(page.get_by_test_id("sim-after")).to_have_attribute("width", "16")  # conv1: 16 channels

        page.go_back()
        page.get_by_test_id("job-row").nth(1).wait_for()
        open_job(page, world.plain_job)
        assert page.get_by_test_id("verdict").inner_text() == "match"
        page.get_by_test_id("no-key").wait_for()
        assert page.get_by_test_id("bits").count() == 0
        for testid in PICTURES:
            d = drawn(page, testid)
            assert (d.get("opaque") or d.get("shapes")), (testid, d)

        page.goto(world.url + f"/ui/references/{world.keyed_ref}")
        page.get_by_test_id("ref-name").wait_for()
        assert page.get_by_test_id("ref-name").inner_text() == "mnist-cnn v1"
        page.locator("[data-testid=jobs] [data-testid=job-row]").first.wait_for()
        assert page.locator("[data-testid=jobs] [data-testid=job-row]").count() == 1
        assert watch.problems == []
    finally:
        context.close()


def test_auditor_sees_only_its_job(browser: Any, world: World) -> None:
    context, page, watch = sign_in(browser, world.url, world.auditor)
    try:
        page.get_by_test_id("job-row").first.wait_for()
        assert page.get_by_test_id("ref-row").count() == 0
        assert page.locator("[data-testid=job-row]").evaluate_all("rs => rs.map(r => r.dataset.id)") == [world.keyed_job]
        open_job(page, world.keyed_job)
        page.get_by_test_id("bits").wait_for()
        assert page.get_by_test_id("verdict").inner_text() == "match"
        assert page.get_by_test_id("resynced").count() == 0  # the re-synchronized weights are for the owner
        assert watch.problems == []
    finally:
        context.close()


def test_another_tenant_sees_nothing(browser: Any, world: World) -> None:
    context, page, watch = sign_in(browser, world.url, world.stranger)
    try:
        page.get_by_test_id("no-jobs").wait_for()
        page.get_by_test_id("no-refs").wait_for()
        assert watch.problems == []
        page.goto(world.url + f"/ui/verifications/{world.keyed_job}")
        page.get_by_test_id("error").wait_for()
        assert page.get_by_test_id("verdict").count() == 0 and page.get_by_test_id("margins").count() == 0
        # the only trouble: the API's 404 for a job of another tenant (Chromium logs it)
        api_404 = f"HTTP 404: {world.url}/v1/verifications/{world.keyed_job}"
        assert api_404 in watch.problems
        assert all(p == api_404 or ("404" in p and p.startswith("console")) for p in watch.problems), watch.problems
    finally:
        context.close()


def test_wrong_key_stays_on_the_form(browser: Any, world: World) -> None:
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(world.url + "/ui/")
        page.get_by_test_id("api-key").fill("fl_not_a_key")
        page.get_by_test_id("api-key").press("Enter")
        page.get_by_test_id("login-error").wait_for()
        assert page.evaluate("sessionStorage.getItem('findlady.apiKey')") is None
    finally:
        context.close()


def test_lists_poll_until_the_job_finishes(browser: Any, tmp_path: Path, files: Any) -> None:
    """A job still running when the page opens turns up finished, with its verdict, without a reload."""
    settings = test_settings(tmp_path, test_job_delay=3.0)
    with BackgroundServer(create_app(settings)) as server:
        api = Api(server.url, settings.admin_key_value())
        owner = api.account("owner")
        ref = api.register(owner, "slow-mlp", weights=files.reference, spec=files.spec).json()
        job = api.submit(owner, ref["id"], files.suspect).json()
        context, page, watch = sign_in(browser, server.url, owner)
        try:
            row = page.locator(f"[data-testid=job-row][data-id='{job['id']}']")
            row.wait_for()
            assert row.get_by_test_id("job-status").inner_text() in ("queued", "running")
            assert row.get_by_test_id("job-verdict").count() == 0
            expect(row.get_by_test_id("job-status")).to_have_text("succeeded", timeout=60_000)
            assert row.get_by_test_id("job-verdict").inner_text() == api.wait(owner, job["id"])["report"]["verdict"]
            assert watch.problems == []
        finally:
            context.close()

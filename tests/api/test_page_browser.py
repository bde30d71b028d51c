"""The page at ``/``, ``/runs`` and a ``framepool report`` file in a real browser: Debian's
chromium, headless, driven by Playwright, against the service under uvicorn over the tiny store
and runs of ``conftest.py``.

Screenshots go to a temporary folder, or to ``FRAMEPOOL_SCREENSHOTS`` when it names one (the
docs' pictures come from there). The scan for external URLs needs no browser.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from api.cli import main as cli_main
from api.service import Settings, create_app
from api.service.routes.page import static_dir
from extractor.prepare import select_frames
from tests.api.browser import chromium, screenshot_dir
from tests.api.conftest import CLASSES, Served
from tests.api.live import LiveServer
from tests.conftest import real_clip

FRAMES = 8  # frames the page asks for: those the store holds of every clip
# uploads over 0.75 MiB are refused (413); 0.6 MiB of uploads at once fill the disk budget (503)
MAX_UPLOAD_MB, UPLOAD_BUDGET_MB = 0.75, 0.6
SMALL, TOO_LARGE, OVER_BUDGET = (
    "mm_part_0.mp4",
    "mm_S001C001P001R001A001_rgb.avi",
    ("vf_v_GGSY1Qvo990.mp4"),
)
EXTERNAL = re.compile(r"https?://(?!(?:127\.0\.0\.1|localhost)(?:[:/]|$))[^\s\"'<>)]*")


@pytest.fixture(scope="module")
def server(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = Settings(
        runs=[served.tp, served.gap],
        store=served.store,
        upload_dir=tmp_path_factory.mktemp("page-uploads"),
        max_upload_mb=MAX_UPLOAD_MB,
        upload_budget_mb=UPLOAD_BUDGET_MB,
        retry_after_s=1,
    )
    with LiveServer(create_app(settings)) as live:
        yield live


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return screenshot_dir(tmp_path_factory)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page whose every request off 127.0.0.1 (or file://) is refused and recorded in
    ``page.outside``: the page must work with the network off."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.outside = []

    def only_local(route: Any) -> None:
        url = route.request.url
        if url.startswith(("http://127.0.0.1:", "file://", "data:")):
            route.continue_()
        else:
            page.outside.append(url)
            route.abort()

    page.route("**/*", only_local)
    yield page
    assert page.outside == [], f"the page asked for {page.outside}"
    context.close()


def _url(server: LiveServer, path: str = "/") -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def _open(page: Any, server: LiveServer) -> None:
    """Open ``/`` and wait until it has listed the loaded models."""
    page.goto(_url(server))
    page.wait_for_selector("#model option", state="attached")


def _open_file_with_the_keyboard(page: Any, clip: Path) -> None:
    """Tab to the file input and open it with the space bar, as a keyboard user would."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for _ in range(10):
        if page.evaluate("document.activeElement && document.activeElement.id") == "file":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file", "Tab never reaches the upload"
    for attempt in range(2):  # a starved browser can miss the first key press
        try:
            with page.expect_file_chooser() as chooser:
                page.keyboard.press("Space")
            break
        except PlaywrightTimeout:
            if attempt:
                raise
            page.focus("#file")
    chooser.value.set_files(str(clip))


# ------------------------------------------------------------------------------ the page
def test_a_real_clip_shows_classes_beta_frames_and_neighbours(
    server: LiveServer, page: Any, served: Served, shots: Path
) -> None:
    _open(page, server)
    for control in (
        "Video file",
        "Model",
        "Frames used at most",
        "Nearest training videos to list",
    ):
        assert page.get_by_label(control, exact=True).count() == 1, control
    clip = real_clip(SMALL)
    _open_file_with_the_keyboard(page, clip)
    assert SMALL in page.inner_text("#chosen")
    page.fill("#max_frames", str(FRAMES))
    page.press("#max_frames", "Enter")  # submits the form from the keyboard
    page.wait_for_selector("#frames img", timeout=90_000)
    page.screenshot(path=str(shots / "page-prediction.png"), full_page=True)

    # the classes shown are the service's answer to the same upload, with the numbers as text
    with clip.open("rb") as f:
        direct = httpx.post(
            _url(server, "/v1/predict"),
            params={"max_frames": FRAMES, "similar": 5},
            files={"file": (clip.name, f)},
            timeout=120,
        ).json()
    rows = page.locator("#classes li")
    assert rows.count() == len(CLASSES) == len(direct["top_k"])
    for i, expected in enumerate(direct["top_k"]):
        assert rows.nth(i).locator(".label").inner_text() == expected["label"]
        shown = float(rows.nth(i).locator(".value").inner_text().removesuffix(" %"))
        assert shown == pytest.approx(100 * expected["probability"], abs=0.051)

    # beta, level by level over the frames used: one cell per node, its weight printed
    beta = direct["beta"]
    assert set(beta) == {"appearance", "motion"}
    for stream, levels in beta.items():
        figure = page.locator(f'#beta figure[data-stream="{stream}"]')
        assert figure.locator(".level").count() == len(levels) == 3
        cells = figure.locator(".cell").all_inner_texts()
        assert cells == [f"{b:.2f}" for level in levels for b in level]
    # the halves of level 2 split the 8 frames used at frame 4
    halves = page.locator('#beta figure[data-stream="appearance"] .level').nth(1).locator(".cell")
    assert [halves.nth(k).get_attribute("style").split(";")[0] for k in range(2)] == [
        "grid-column:1/5",
        "grid-column:5/9",
    ]

    # the frames used: evenly spread thumbnails of the frames the prediction used
    thumbs = page.locator("#frames img")
    assert thumbs.count() == FRAMES  # 8 frames used, all shown (12 asked at most)
    assert all(
        page.evaluate("img => img.naturalHeight", thumbs.nth(i).element_handle()) == 72
        for i in range(thumbs.count())
    )

    # the nearest training videos: the clip itself first (the store holds the same 8 frames)
    neighbours = page.locator("#neighbour-table tbody tr")
    assert neighbours.count() == 5
    first = neighbours.nth(0).locator("td").all_inner_texts()
    assert first[1] == "mm_part_0" and first[2] == "people" and float(first[3]) < 0.01
    distances = [float(neighbours.nth(i).locator("td").nth(3).inner_text()) for i in range(5)]
    assert distances == sorted(distances)
    assert [n["video_id"] for n in direct["similar"]] == [
        neighbours.nth(i).locator("td").nth(1).inner_text() for i in range(5)
    ]
    assert page.locator("#timing-table tbody tr").count() == 7


def test_a_head_without_beta_says_so(server: LiveServer, page: Any, served: Served) -> None:
    _open(page, server)
    page.select_option("#model", json.loads((served.gap / "config.json").read_text())["run_id"])
    _drop(page, real_clip(SMALL))
    assert page.inner_text("#chosen") == f"Chosen: {SMALL} (154.9 KiB)"
    page.fill("#max_frames", "4")
    page.fill("#similar", "0")
    page.click("#go")
    page.wait_for_selector("#frames img", timeout=90_000)
    assert "gap head learns no pyramid weights" in page.inner_text("#no-beta")
    assert page.locator("#beta .cell").count() == 0
    assert "Not asked for" in page.inner_text("#neighbours")
    assert page.locator("#frames img").count() == 4


def _drop(page: Any, clip: Path) -> None:
    """Drop ``clip`` on the upload box, as a file dragged from the desktop."""
    transfer = page.evaluate_handle(
        """([b64, name]) => {
            const bin = atob(b64);
            const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "video/mp4" }));
            return transfer;
        }""",
        [base64.b64encode(clip.read_bytes()).decode("ascii"), clip.name],
    )
    page.dispatch_event("#drop", "dragover", {"dataTransfer": transfer})
    assert "over" in (page.get_attribute("#drop", "class") or "")
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def _refusal(page: Any, path: Path) -> str:
    page.set_input_files("#file", str(path))
    page.click("#go")
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert page.locator("#results").is_hidden()
    return str(page.inner_text("#error"))


def test_refusals_are_shown_with_their_reason(
    server: LiveServer, page: Any, tmp_path: Path, shots: Path
) -> None:
    png = tmp_path / "still.png"
    Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(png)
    playlist = tmp_path / "clip.mp4"
    playlist.write_text(f"ffconcat version 1.0\nfile {real_clip(SMALL)}\n")
    _open(page, server)
    page.click("#go")  # nothing chosen yet: said on the page, the upload gets the focus
    assert "No video chosen" in page.inner_text("#error")
    assert page.evaluate("document.activeElement.id") == "file"

    text = _refusal(page, png)
    assert "not a video the service can read (HTTP 415)" in text
    assert "png_pipe" in text and "still.png" in text

    text = _refusal(page, playlist)
    assert "(HTTP 415)" in text and "concat playlist" in text and "clip.mp4" in text
    page.screenshot(path=str(shots / "page-refused.png"))

    text = _refusal(page, real_clip(TOO_LARGE))
    assert "too large for this service (HTTP 413)" in text
    assert "upload larger than the limit of 0.75 MiB" in text and "up to 0.75 MiB" in text

    # a real 503: the upload would take the service past its disk budget for uploads
    text = _refusal(page, real_clip(OVER_BUDGET))
    assert "cannot take this video now (HTTP 503)" in text and "retry later" in text
    assert "wait 1 s" in text
    retry = page.locator("#retry")
    assert retry.is_disabled()
    page.wait_for_function("!document.getElementById('retry').disabled", timeout=10_000)
    assert "try again now" in page.inner_text("#retry-note")


# ------------------------------------------------------------------------------ the runs
def test_runs_page_compares_the_loaded_runs(
    server: LiveServer, page: Any, served: Served, shots: Path
) -> None:
    page.goto(_url(server))
    page.click("text=Runs: what each model learned")
    page.wait_for_selector("#runs")
    assert page.url == _url(server, "/runs")
    ids = [json.loads((d / "config.json").read_text())["run_id"] for d in (served.tp, served.gap)]
    assert page.locator("#runs thead th").all_inner_texts() == ["run", *ids]
    assert page.locator(".beta .cell").count() == 2 * 7  # tp: two streams, 3 levels
    assert "gap learns no pyramid weights" in page.inner_text("body")
    page.screenshot(path=str(shots / "runs.png"), full_page=True)


def test_report_of_two_runs_opens_with_both_columns(
    browser: Any, page: Any, served: Served, tmp_path: Path
) -> None:
    out = tmp_path / "report.html"
    assert cli_main(["report", str(served.gap), str(served.tp), "--out", str(out)]) == 0
    page.goto(out.as_uri())
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (served.gap, served.tp)]
    header = page.locator("#runs thead th").all_inner_texts()
    assert header == ["run", *(m["run_id"] for m in metrics)]
    top1 = page.locator("#runs tbody tr", has_text="test top-1").locator("td").all_inner_texts()
    assert [cell.split(" %")[0] for cell in top1] == [f"{100 * m['top1']:.1f}" for m in metrics]
    for cell, m in zip(top1, metrics, strict=True):
        assert f"global mean {100 * m['probe']['global_mean']['top1']:.1f} %" in cell
    # every picture is inline and drawn (curves and confusion matrix for both runs)
    images = page.locator("img")
    assert images.count() == 4
    for i in range(4):
        assert images.nth(i).get_attribute("src").startswith("data:image/png;base64,")
        assert page.evaluate("img => img.naturalWidth", images.nth(i).element_handle()) > 100


# ------------------------------------------------------------------------------ offline
def test_no_served_asset_or_report_names_an_external_url(
    server: LiveServer, served: Served, tmp_path: Path
) -> None:
    assets = sorted(p.name for p in static_dir().iterdir() if p.is_file())
    assert {"index.html", "page.css", "page.js"} <= set(assets)
    pages = {"/": "", "/runs": ""} | {f"/static/{name}": "" for name in assets}
    for path in pages:
        r = httpx.get(_url(server, path), timeout=120)
        assert r.status_code == 200, (path, r.status_code)
        pages[path] = r.text
    out = tmp_path / "report.html"
    assert cli_main(["report", str(served.gap), str(served.tp), "--out", str(out)]) == 0
    pages["report.html"] = out.read_text()
    for name, text in pages.items():
        assert EXTERNAL.findall(text) == [], name
    # the scan itself finds what it looks for
    assert EXTERNAL.findall('<img src="https://cdn.example/x.png">') == [
        "https://cdn.example/x.png"
    ]
    assert EXTERNAL.findall("fetch('http://127.0.0.1:8000/v1/models')") == []


# ------------------------------------------------------------------------------ the endpoint
def test_thumbnails_are_of_the_frames_a_prediction_uses(server: LiveServer, tmp_path: Path) -> None:
    clip = real_clip(SMALL)
    params = {"stride": 2, "max_frames": 5, "count": 3, "height": 32}
    with clip.open("rb") as f:
        r = httpx.post(
            _url(server, "/v1/thumbnails"),
            params=params,
            files={"file": (clip.name, f)},
            timeout=60,
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n_frames"] == 32 and body["fps"] == pytest.approx(30.0)
    assert body["used"] == select_frames(32, 2, 5).tolist() == [0, 8, 16, 22, 30]
    assert [t["frame"] for t in body["thumbnails"]] == [0, 16, 30]
    for t in body["thumbnails"]:
        assert t["time"] == pytest.approx(t["frame"] / 30.0)
        jpeg = base64.b64decode(t["image"].removeprefix("data:image/jpeg;base64,"))
        with Image.open(io.BytesIO(jpeg)) as image:
            assert image.format == "JPEG" and image.height == 32
            assert image.width == round(340 * 32 / 256)
    # the same frames as the prediction with these options
    with clip.open("rb") as f:
        predicted = httpx.post(
            _url(server, "/v1/predict"),
            params={"stride": 2, "max_frames": 5},
            files={"file": (clip.name, f)},
            timeout=60,
        ).json()
    assert predicted["frames"]["used"] == {"appearance": 5, "motion": 5}
    png = tmp_path / "still.png"
    Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(png)
    r = httpx.post(_url(server, "/v1/thumbnails"), files={"file": ("a.mp4", png.read_bytes())})
    assert r.status_code == 415 and "png_pipe" in r.json()["detail"]

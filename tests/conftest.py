import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# One thread in every test process and in the CLI runs it starts: the suite runs two pytest workers on a
# 2-core machine (README's test command), and two-thread torch processes sharing two cores lose up to 6x
# to each other on the tiny model's small ops (a smoke run took 106 s beside a busy core, 17 s at one
# thread); alone, one thread is within 10% of two. It also makes every pinned number independent of
# how many workers run.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (tiny checkpoint + fixture) for the whole session, shared with CLI subprocesses."""
    path = Path(os.environ.get("WANEXP_TEST_CACHE") or tmp_path_factory.mktemp("wanexp_cache"))
    os.environ["WANEXP_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_pipe(cache_dir):
    from wanexp.models import load_pipeline
    return load_pipeline({"name": "tiny", "dtype": "bf16"}, cache_dir)


@pytest.fixture(scope="module")
def tiny_expert(tiny_pipe):
    """A bf16 copy of the tiny high-noise transformer (one per test module), for collector tests."""
    import copy
    return copy.deepcopy(tiny_pipe.transformer).float().to(torch.bfloat16)


@pytest.fixture(scope="session")
def collect_block0():
    """``collect(model, needs, timesteps, **collector_options) -> (stats, layers)``: an
    ActivationCollector on block 0's linears of a tiny expert (two bins, split at t = 500), one
    seeded tiny forward per timestep."""
    def collect(model, needs, timesteps, **options):
        from wanexp.calib import ActivationCollector, CalibStats
        from wanexp.quant.context import TimestepBins, TimestepContext
        layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.0.")]
        ctx = TimestepContext(bins=TimestepBins((500.0,)))
        stats = CalibStats()
        col = ActivationCollector("high_noise", model, layers, ctx, list(needs), stats, max_tokens=16, **options)
        g = torch.Generator().manual_seed(0)
        for t in timesteps:
            ctx.set_timestep(t)
            x = torch.randn(1, 36, 2, 8, 8, generator=g).to(torch.bfloat16)
            text = torch.randn(1, 12, 64, generator=g).to(torch.bfloat16)
            with torch.no_grad():
                model(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=text, return_dict=False)
        col.check()
        col.remove()
        return stats, layers
    return collect


@pytest.fixture
def cli(cache_dir, tmp_path):
    """Run ``python -m wanexp ARGS`` in a subprocess with outputs under tmp_path; returns CompletedProcess."""
    def run(*args, env=None, timeout=600):
        full_env = dict(os.environ, WANEXP_CACHE=str(cache_dir), WANEXP_OUTPUT_ROOT=str(tmp_path / "outputs"),
                        WANDB_MODE=os.environ.get("WANDB_MODE", ""), **(env or {}))
        full_env.pop("WANDB_MODE") if not full_env["WANDB_MODE"] else None
        return subprocess.run([sys.executable, "-m", "wanexp", *args, "progress=false"], cwd=tmp_path,
                              env=full_env, capture_output=True, text=True, timeout=timeout)
    return run


# ---------------------------------------------------------------------------------------------
# report.html in a real browser: Debian's chromium, headless, driven through selenium + chromedriver
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """A headless Chromium (no network: background services off, a fresh profile); skipped without one."""
    import shutil
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("headless Chromium is not installed (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


# Waits (up to 20 s) until every image finished loading and every video can show a frame, then reports
# what each element loaded, every table cell with its data attributes, and any network request made.
_PAGE_STATE = """
const done = arguments[arguments.length - 1];
const start = Date.now();
function state() {
  return {
    images: [...document.images].map(i => ({src: i.getAttribute("src"), complete: i.complete, width: i.naturalWidth})),
    videos: [...document.querySelectorAll("video")].map(v => ({src: v.getAttribute("src"), ready: v.readyState,
                                                                 width: v.videoWidth, error: v.error && v.error.code})),
    cells: [...document.querySelectorAll("table[data-table] td")].map(td => ({
      table: td.closest("table").dataset.table, col: td.dataset.col || null, value: td.dataset.value || null,
      text: td.textContent.trim(), row: td.parentElement.rowIndex})),
    remote: performance.getEntriesByType("resource").map(e => e.name).filter(n => !n.startsWith("file:")),
  };
}
(function poll() {
  const s = state();
  const loaded = s.images.every(i => i.complete) && s.videos.every(v => v.ready >= 2 || v.error);
  if (loaded || Date.now() - start > 20000) done(s); else setTimeout(poll, 100);
})();
"""


@pytest.fixture(scope="session")
def render_report(browser):
    """``render(path, screenshot)``: open a report.html from the filesystem, wait for its media, save a
    full-page screenshot to ``screenshot``; returns the page state (images, videos, table cells)."""
    def render(path: Path, screenshot: Path) -> dict:
        import base64
        browser.get(Path(path).resolve().as_uri())
        browser.set_script_timeout(30)
        page = browser.execute_async_script(_PAGE_STATE)
        shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return page
    return render


@pytest.fixture
def keep_artifact(capsys):
    """``keep(path)``: copy a test artifact (a screenshot) to $WANEXP_TEST_ARTIFACTS (default:
    test-artifacts/ in the repository) and print where, past pytest's output capture."""
    import shutil

    def keep(path: Path) -> Path:
        dest_dir = Path(os.environ.get("WANEXP_TEST_ARTIFACTS") or REPO / "test-artifacts")
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / Path(path).name
        shutil.copyfile(path, dest)
        with capsys.disabled():
            print(f"\n[artifact] {dest} (kept from {path})")
        return dest
    return keep


@pytest.fixture
def interpreter_run():
    """``run(test_file)``: that file's ``-k interp`` tests in a subprocess with TRITON_INTERPRET=1 (the flag
    must be set before triton is imported), asserted to pass; returns their stdout, for the count."""
    def run(test_file: str) -> str:
        env = dict(os.environ, TRITON_INTERPRET="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "interp"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        return proc.stdout
    return run

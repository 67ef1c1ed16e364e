"""`cl-bench report` and `show --plot`: page structure, the numbers each figure plots, PNG files,
escaping of hostile names, bad input, and the page in headless Chromium (skipped without it)."""
import base64
import json
import os
import select
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cl_bench import leaderboard, metrics, report
from cl_bench.cli import main
from cl_bench.config import compose
from cl_bench.runner import run

HOSTILE = "<script>alert(1)</script><b>x</b>$x$ $\\undefinedmathcommand$"
HOSTILE_RUN_ID = "<img src=x onerror=alert(1)>$x$<b>x"  # a folder name: no slash
ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """Toy runs (finetune, joint x 2 seeds), a run with markup in its names and config, one partial run."""
    directory = tmp_path_factory.mktemp("results")
    for strategy in ("finetune", "joint"):
        for seed in (0, 1):
            run(compose(["scenario=toy", f"strategy={strategy}", f"seed={seed}", "progress=false",
                         f"results_dir={directory}", f"cache_dir={directory}/cache"]))
    runs = sorted((directory / "runs").iterdir())
    hostile = directory / "runs" / HOSTILE_RUN_ID
    shutil.copytree(runs[0], hostile)
    summary = json.loads((hostile / "summary.json").read_text())
    summary.update(run_id=HOSTILE_RUN_ID, strategy=HOSTILE, scenario=f"toy {HOSTILE}", config_hash="f" * 16,
                   group_hash="e" * 16)
    summary["provenance"]["command"] = f"cl-bench run strategy={HOSTILE}"
    (hostile / "summary.json").write_text(json.dumps(summary))
    (hostile / "config.yaml").write_text(f"strategy:\n  name: '{HOSTILE}'\n")
    with open(hostile / "train_log.csv", "a") as log:  # damaged rows are skipped, the others plotted
        log.write("x,1,1,nan-ish,,\n7,\n\x00\x01,,\n")
    partial = directory / "runs" / "toy-partial"
    shutil.copytree(runs[1], partial)
    summary = json.loads((partial / "summary.json").read_text())
    summary.update(run_id="toy-partial", status="running", config_hash="d" * 16)
    (partial / "summary.json").write_text(json.dumps(summary))
    return directory


@pytest.fixture(scope="module")
def page(results, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("report")
    written = report.write(results, out)
    assert written == [out / "index.html"]
    return written[0].read_text(), written[0]


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text inside each board table's cells."""

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.tables, self._cell, self._in_board = [], [], None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table" and attrs.get("class") == "board":
            self.tables.append([])
            self._in_board = True
        elif tag == "tr" and self._in_board:
            self.tables[-1].append([])
        elif tag in ("td", "th") and self._in_board:
            self._cell = {"value": attrs.get("data-value"), "text": ""}
            self.tables[-1][-1].append(self._cell)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._cell = None
        elif tag == "table":
            self._in_board = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data

    def images(self, suffix: str) -> list[dict]:
        return [a for t, a in self.tags if t == "img" and a.get("alt", "").endswith(suffix)]


def test_page_has_a_table_and_figures_per_scenario_and_model_and_a_heatmap_per_run(page):
    text, _ = page
    elements = Elements(text)
    assert len(elements.tables) == 2  # toy on mlp, and the hostile run's scenario on mlp
    for kind in ("curves", "forgetting", "acc-vs-params", "acc-vs-train-time", "loss"):
        assert len(elements.images(f": {kind}")) == 2, kind
    assert len([a for t, a in elements.tags if t == "img" and a["alt"].startswith("score matrix of")]) == 5
    assert all(a["src"].startswith("data:image/png;base64,") for t, a in elements.tags if t == "img")
    for name in metrics.METRIC_COLUMNS:
        assert f"<dt><code>{name}</code></dt>" in text
    assert "toy-partial</code>: running after" in text  # the excluded run and its reason
    assert "http://" not in text and "https://" not in text
    assert not [a for t, a in elements.tags if t in ("link", "iframe") or (t == "script" and "src" in a)]


def test_table_values_equal_the_leaderboard_csv(page, results, tmp_path):
    text, _ = page
    board, _, out = leaderboard.build(results, tmp_path)
    csv = pd.read_csv(out / "leaderboard.csv")
    header, *rows = Elements(text).tables[0]
    columns = [cell["text"] for cell in header]
    assert len(rows) == 2
    for row in rows:
        strategy = row[0]["text"]
        expected = csv[(csv["strategy"] == strategy) & (csv["scenario"] == "toy")].iloc[0]
        for name, cell in zip(columns[3:], row[3:]):
            if pd.isna(expected[f"{name}_mean"]):
                assert cell["value"] == "" and cell["text"] == "", name
            else:
                assert float(cell["value"]) == pytest.approx(expected[f"{name}_mean"], abs=1e-4), name
                if name != "trainable_params":  # the CSV holds 4 decimals; the text rounds the full value
                    assert cell["text"].startswith(f"{float(cell['value']):.2f}"), name


def test_curves_plot_the_seed_spread_and_forgetting_bars_their_metric(results):
    sections, _, _ = report.load(results)
    toy = next(s for s in sections if s.scenario == "toy")
    _, plotted = report.curves_figure(toy.groups, "t")
    for group in toy.groups:
        per_seed = np.array([report.seen_task_scores(r["_sums"], r["_counts"]) for r in group.runs])
        assert len(per_seed) == 2
        band = plotted[group.label]
        np.testing.assert_allclose(band["low"], per_seed.min(axis=0))
        np.testing.assert_allclose(band["high"], per_seed.max(axis=0))
        np.testing.assert_allclose(band["mean"], per_seed.mean(axis=0))
        for r, curve in zip(group.runs, per_seed):
            assert curve.mean() == pytest.approx(r["metrics"]["acc_avg_incremental"])
            assert curve[-1] == pytest.approx(r["metrics"]["acc_final_sample_weighted"])
            assert report.forgetting_per_task(r["_sums"], r["_counts"]).mean() == pytest.approx(
                r["metrics"]["forgetting_max_prev"])
    assert not np.allclose(plotted["finetune"]["low"], plotted["finetune"]["high"])  # seeds differ
    _, bars = report.forgetting_figure(toy.groups, "t")
    assert list(bars["finetune"]["tasks"]) == [1, 2]
    _, points = report.scatter_figure(toy.groups, "trainable_params", "p", "t")
    row = next(g.row for g in toy.groups if g.label == "joint")
    assert points["joint"] == (row["trainable_params_mean"], row["acc_final_task_mean_mean"])


def test_loss_curves_are_the_seed_mean_and_spread_of_the_training_logs(results, tmp_path):
    sections, _, _ = report.load(results)
    toy = next(s for s in sections if s.scenario == "toy")
    _, plotted = report.loss_figure(toy.groups, results / "runs", "t")
    for group in toy.groups:
        logs = [pd.read_csv(results / "runs" / r["run_id"] / "train_log.csv") for r in group.runs]
        assert len(logs) == 2 and all(list(log["step"]) == list(logs[0]["step"]) for log in logs)
        losses = np.array([log["loss"] for log in logs])
        np.testing.assert_allclose(plotted[group.label]["steps"], logs[0]["step"])
        np.testing.assert_allclose(plotted[group.label]["mean"], losses.mean(axis=0))
        np.testing.assert_allclose(plotted[group.label]["low"], losses.min(axis=0))
    hostile = next(s for s in sections if s.scenario != "toy")
    _, plotted = report.loss_figure(hostile.groups, results / "runs", "t")
    [curve] = plotted.values()
    clean = pd.read_csv(results / "runs" / sorted(g.runs[0]["run_id"] for g in toy.groups)[0] / "train_log.csv")
    assert len(curve["steps"]) == len(clean)  # the damaged rows appended to the copy are left out
    (tmp_path / "train_log.csv").write_bytes(b"\x89PNG\x00\xff")
    assert report.read_train_log(tmp_path) is None and report.read_train_log(tmp_path / "missing") is None


def test_figures_tell_strategies_apart_without_colour_and_show_dollars_verbatim(results):
    looks = [report.style(i, 4) for i in range(4)]
    for key in ("marker", "linestyle", "hatch"):
        assert len({look[key] for look in looks}) == 4, key
    sections, _, _ = report.load(results)
    hostile = next(s for s in sections if s.scenario != "toy")
    figure, _ = report.curves_figure(hostile.groups, hostile.scenario)
    report.png(figure, 50)  # mathtext would reject the unknown command in the name
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend == [report.literal(f"{HOSTILE} (1 seed)")]


def test_png_writes_every_figure(results, tmp_path, capsys):
    assert main(["report", str(results), "--out", str(tmp_path), "--png"]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(Path(p).name for p in printed) == names and printed[0] == str(tmp_path / "index.html")
    runs = [p.name for p in (results / "runs").iterdir() if p.name != "toy-partial"]
    hostile_section = report.slug(f"toy {HOSTILE}") + "-mlp"
    expected = {f"{section}-{kind}.png" for section in ("toy-mlp", hostile_section)
                for kind in ("curves", "forgetting", "acc-vs-params", "acc-vs-train-time", "loss")}
    expected |= {f"{report.slug(name)}-heatmap.png" for name in runs}
    assert set(names) == expected | {"index.html"}
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in expected)


def test_show_plot_writes_the_run_figures_next_to_it(results, capsys):
    directory = results / "runs" / "toy-partial"  # any run, finished or not
    assert main(["show", str(directory), "--plot"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    expected = [directory / "figures" / f"{name}.png" for name in ("heatmap", "accuracy_curve", "forgetting", "loss")]
    assert printed == [str(p) for p in expected]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in expected)


def test_markup_in_results_is_escaped(page):
    text, _ = page
    assert text.count("<script>") == 1  # the page's own sort script
    assert "<b>" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;$x$" in text
    assert 'alt="score matrix of &lt;img src=x onerror=alert(1)&gt;$x$&lt;b&gt;x"' in text


@pytest.mark.parametrize("which", ["missing", "no_runs", "out_is_a_file"])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, results, which):
    argv = {"missing": ["report", str(tmp_path / "nope")],
            "no_runs": ["report", str(tmp_path)],
            "out_is_a_file": ["report", str(results), "--out", str(results / "runs" / "toy-partial" / "scores.csv")]}
    before = (results / "runs" / "toy-partial" / "scores.csv").read_bytes()
    assert main(argv[which]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert (results / "runs" / "toy-partial" / "scores.csv").read_bytes() == before


# --- in a real browser ------------------------------------------------------------------------------

class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4, NUL-separated JSON)."""

    def __init__(self, binary: str, profile: Path):
        command_read, self._command_write = os.pipe()
        self._reply_read, reply_write = os.pipe()

        def wire():  # the child reads commands on fd 3 and writes replies on fd 4
            high_command, high_reply = (os.dup2(command_read, 100), os.dup2(reply_write, 101))
            os.dup2(high_command, 3), os.dup2(high_reply, 4)

        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=False,
            preexec_fn=wire)
        os.close(command_read), os.close(reply_write)
        self.events, self._buffer, self._next_id, self.session = [], b"", 0, None

    def post(self, method: str, **params) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._command_write, json.dumps(message).encode() + b"\0")
        return self._next_id

    def send(self, method: str, timeout: float = 30, **params) -> dict:
        number = self.post(method, **params)
        reply = self.wait(lambda m: m.get("id") == number, timeout)
        assert "error" not in reply, (method, reply["error"])
        return reply["result"]

    def wait(self, matches, timeout: float = 30) -> dict:
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" not in message:
                    self.events.append(message)
                if message.get("method") == "Page.javascriptDialogOpening":  # an alert would block the page
                    self.post("Page.handleJavaScriptDialog", accept=True)
                if matches(message):
                    return message
            ready, _, _ = select.select([self._reply_read], [], [], timeout)
            assert ready, "Chromium did not answer in time"
            chunk = os.read(self._reply_read, 1 << 20)
            assert chunk, "Chromium closed the pipe"
            self._buffer += chunk

    def open(self, url: str, width: int = 1280, height: int = 900) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)
        self.send("Page.navigate", url=url)
        self.wait(lambda m: m.get("method") == "Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"]["value"]

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def problems(self) -> list:
        """Uncaught exceptions, console errors, dialogs (alert) and requests that left the file."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method in ("Runtime.exceptionThrown", "Page.javascriptDialogOpening"):
                found.append(event)
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(event)
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(event)
            elif method == "Network.requestWillBeSent" and not params["request"]["url"].startswith(("file:", "data:")):
                found.append(event)
        return found

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        os.close(self._command_write), os.close(self._reply_read)


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


PAGE_CHECK = """(async () => {
  const rows = table => Array.from(table.tBodies[0].rows).map(row => row.cells[0].textContent);
  const board = document.querySelector("table.board");
  const before = rows(board);
  board.querySelector("th").click();
  const sorted = rows(board);
  document.querySelectorAll("details").forEach(d => d.open = true);
  const images = Array.from(document.images);
  await Promise.all(images.map(image => image.decode().catch(() => null)));
  return {before, sorted, tables: document.querySelectorAll("table.board").length, images: images.length,
          broken: images.filter(image => !(image.complete && image.naturalWidth > 0)).map(image => image.alt),
          text: document.body.innerText, bold: document.querySelectorAll("b").length,
          scripts: document.scripts.length};
})()"""


def check_in_chromium(page_path: Path, screenshot: Path) -> dict:
    binary = chromium_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed on this CI machine: `make test` installs it as root")
        pytest.skip("chromium is not installed (`make browser` installs Debian's chromium as root)")
    browser = Chromium(binary, page_path.parent / "chromium-profile")
    try:
        browser.open(page_path.resolve().as_uri())
        browser.screenshot(screenshot)
        result = browser.evaluate(PAGE_CHECK)
        result["problems"] = browser.problems()
    finally:
        browser.close()
    return result


def test_report_renders_in_headless_chromium(page):
    _, path = page
    screenshot = ARTIFACTS / "report.png"
    result = check_in_chromium(path, screenshot)
    print(f"screenshot of the report: {screenshot}")
    assert result["problems"] == []
    assert result["tables"] == 2
    assert result["images"] == 2 * 5 + 5 and result["broken"] == []
    assert result["before"] == ["finetune", "joint"] or result["before"] == ["joint", "finetune"]
    assert result["sorted"] == sorted(result["before"])  # the first header sorts by strategy name
    assert HOSTILE in result["text"] and HOSTILE_RUN_ID in result["text"]  # shown as text, not markup
    assert json.dumps(f"cl-bench run strategy={HOSTILE}") in result["text"]  # the provenance, as JSON
    assert result["bold"] == 0 and result["scripts"] == 1
    assert screenshot.read_bytes()[:4] == b"\x89PNG"

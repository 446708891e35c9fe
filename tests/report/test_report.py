"""The HTML report: self-contained, with its plots and tables, as a browser renders it."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab.config import validate_config
from tunelab.report.run_report import report_run
from tunelab.train.loop import train


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("needs headless Chromium (Debian package chromium; `make test` installs it when run as root)")


HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_report_renders_in_chromium_with_plots_and_tables(tmp_path, stories260k):
    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                       data={"eval_fraction": 0.25}, train={"max_steps": 6, "eval_every": 3})
    result = train(validate_config(tree))
    page = report_run(result.run_dir)
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 3  # loss, learning rate, gradient norm
    assert "<table>" in html and "http" not in html.replace("http-equiv", "")  # nothing to fetch
    md = (result.run_dir / "report.md").read_text()
    assert "## Training" in md and "| step | eval loss |" in md

    browser = _chromium()
    user_dir = tmp_path / "chrome-profile"
    dom = subprocess.run([browser, *HEADLESS, f"--user-data-dir={user_dir}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<img") == 3 and dom.count("<table>") >= 1 and "Training" in dom
    shot = tmp_path / "report.png"
    subprocess.run([browser, *HEADLESS, f"--user-data-dir={user_dir}", f"--screenshot={shot}",
                    "--window-size=1000,2400", page.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    colours = image.resize((200, 480)).getcolors(maxcolors=1_000_000)
    assert len(colours) > 50  # the plots drew: a blank page has a handful of colours


def test_report_of_a_diff(tmp_path):
    diff = {"base": "b", "tuned": "t",
            "task": {"metric": "accuracy", "base": {"accuracy": 0.1}, "tuned": {"accuracy": 0.8}, "gain": 0.7,
                     "mode": "score", "num_examples": 10, "verdict": "better on the task"},
            "forgetting": {"reference": "samples", "num_texts": 4, "perplexity_base": 3.0, "perplexity_tuned": 3.6,
                           "perplexity_ratio": 1.2, "kl_base_to_tuned": 0.2, "perplexity_verdict": "mild forgetting",
                           "kl_verdict": "moderate shift"},
            "drift": {"prompts": "p", "length_base": {"mean": 20.0}, "length_tuned": {"mean": 5.0},
                      "eos_share_base": 0.5, "eos_share_tuned": 1.0, "format_collapse_base": 0.0,
                      "format_collapse_tuned": 0.5, "length_verdict": "drifted", "eos_verdict": "still stops",
                      "collapse_verdict": "collapsed", "examples": [{"prompt": "a", "base": "b", "tuned": "c"}]}}
    (tmp_path / "diff.json").write_text(json.dumps(diff))
    html = report_run(tmp_path).read_text()
    assert html.count("data:image/png;base64,") == 2
    for text in ("mild forgetting", "moderate shift", "collapsed", "better on the task"):
        assert text in html


# the demo's task-3 table as it was measured (README, 2026-12-06): eight strategies, a soft prompt whose forgetting
# with the adaptation on is ~10,000x where the others are near 1
SMALL_DATA = [("zero-shot", 0, 0.047, 1.0, None), ("few-shot", 0, 0.078, 1.0, None),
              ("soft_prompt", 73_728, 0.099, 9_870.0, 1.0), ("lora", 98_304, 0.380, 1.79, 1.0),
              ("ia3", 1_536, 0.028, 1.02, 1.0), ("freeze", 1_050_624, 0.281, 1.41, None),
              ("full", 1_838_080, 0.430, 1.70, None), ("prompt_lm", 1_846_272, 0.41, 2.2, None)]


def _small_data_compare() -> dict:
    from tunelab.compare import CompareRow

    rows = [CompareRow(name, params, params / 1_838_080, 12.5, 812.0 if params else None, 9_000.0, 1.2, 1.4, 1e-3,
                       train_flops=3.1e13 if params else 0.0, metrics={"rouge_l": score}, perplexity_ratio=on,
                       kl_base_to_tuned=0.3, perplexity_ratio_off=off, kl_base_to_tuned_off=None if off is None else 0.0,
                       eos_share=0.9, task_format_share=0.5, probes_right=40, probes_right_base=42,
                       probes_right_off=None if off is None else 42).as_dict()
            for name, params, score, on, off in SMALL_DATA]
    return {"metric": "rouge_l", "table": rows, "note": "same data, seed and step budget for every strategy",
            "baselines": {"copy the prompt": {"answer": "the prompt", "source": "eval", "rouge_l": 0.436}},
            "forgetting_ranked_by": "forgetting ranked by ...", "recommendation": "measured: lora"}


def test_compare_report_draws_the_strategy_map_and_log_scale_forgetting(tmp_path, monkeypatch):
    from tunelab.report import plots

    figures = []
    real_png = plots._png
    monkeypatch.setattr(plots, "_png", lambda fig: (figures.append((fig.axes[0].get_xscale(), fig.axes[0].get_yscale(),
                                                                    [ln.get_ydata()[0] for ln in fig.axes[0].lines
                                                                     if ln.get_linestyle() == "--"])),
                                                    real_png(fig))[1])
    (tmp_path / "compare.json").write_text(json.dumps(_small_data_compare()))
    html = report_run(tmp_path).read_text()
    assert html.count("data:image/png;base64,") == 3 and "strategy map" in html
    (_, task_y, _), (map_x, _, baseline_lines), (_, forgetting_y, _) = figures  # task bars, map, forgetting bars
    assert (task_y, map_x, forgetting_y) == ("linear", "log", "log")
    assert baseline_lines == [0.436]  # copy the prompt, as a line across the map


def test_compare_tables_fit_the_page_in_chromium(tmp_path):
    """The widest table people get (compare's, every column) fits a 1000-pixel window: nothing scrolls sideways."""
    (tmp_path / "compare.json").write_text(json.dumps(_small_data_compare()))
    page = report_run(tmp_path)
    probe = tmp_path / "probe.html"  # the report with a script that writes what the browser laid out into the DOM
    probe.write_text(page.read_text().replace("</body>", (
        "<script>const t=[...document.querySelectorAll('table')].map(e=>e.getBoundingClientRect().right);"
        "document.body.insertAdjacentHTML('beforeend','<p id=probe>'+JSON.stringify({page:document.documentElement"
        ".scrollWidth,window:window.innerWidth,tables:t})+'</p>')</script></body>")))
    browser = _chromium()
    dom = subprocess.run([browser, *HEADLESS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    laid_out = json.loads(dom.split("<p id=\"probe\">", 1)[1].split("</p>", 1)[0])
    assert laid_out["tables"] and laid_out["page"] <= laid_out["window"], laid_out
    assert max(laid_out["tables"]) <= laid_out["window"], laid_out

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

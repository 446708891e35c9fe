"""The data check's HTML report: length histograms, findings, and a preview with trained tokens highlighted."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from tunelab.report import plots
from tunelab.report.page import Section, write_report


def write_data_report(result: dict[str, Any], out_dir: Path, stem: str = "data-check") -> Path:
    lengths = result["lengths"]
    s = Section("Token lengths", text=[f"{result['num_examples']} examples."])
    if lengths["prompt_values"]:
        s.images.append(("prompt and target lengths in tokens",
                         plots.histogram({"prompt": lengths["prompt_values"], "target": lengths["target_values"]},
                                         "token lengths", "tokens")))
    s.table = [{"": k, **v} for k, v in (("prompt", lengths["prompt_tokens"]), ("target", lengths["target_tokens"])) if v]
    findings = Section("Findings", table=[{"finding": k, "severity": v["severity"], "rows": v["count"], "message": v["message"]}
                                          for k, v in result.items() if isinstance(v, dict) and "severity" in v])
    preview = Section("Preview (trained tokens highlighted)")
    for item in result["preview"]:
        marked = "".join(f"<mark>{html.escape(t)}</mark>" if trained else html.escape(t) for t, trained in item["tokens"])
        trained = ", ".join(repr(run) for run in item["trained"])
        preview.text.append(f"row {item['row']}: " + "".join(t for t, _ in item["tokens"]) + f"\ntrained: {trained}")
        preview.raw_html.append(f"<pre>row {item['row']}: {marked}\ntrained: {html.escape(trained)}</pre>")
    path = write_report(out_dir, f"tunelab data check: {result['train']}", [s, findings, preview], stem=stem)
    return path

"""Reports: turn metrics and results into one self-contained HTML page (plots embedded) and markdown."""

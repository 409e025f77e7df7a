"""``raydpo report``: report.html and PNG plots of one run directory, or several side by side."""

from __future__ import annotations

import os

from raydpo.observability.report.html import render
from raydpo.observability.report.plots import write_plots
from raydpo.observability.report.runs import label_runs, load_run


def write_report(run_dirs: list[str], out_dir: str) -> str:
    """Write ``out_dir/report.html`` and its plots for ``run_dirs``; returns the HTML file's path.

    Reads only the run directories' files (config.yaml, summary.json, metrics.jsonl), so it works
    for a finished run, one still training, and on a machine without Ray or the model."""
    from raydpo import storage

    runs = [load_run(d) for d in run_dirs]
    label_runs(runs)
    # Run directories and ``out_dir`` may be URIs: the plots are drawn locally, then uploaded.
    with storage.local_dir_for_writing(out_dir) as local:
        plots = write_plots(runs, local)
        with open(os.path.join(local, "report.html"), "w") as f:
            f.write(render(runs, plots))
    return storage.join(out_dir, "report.html")

"""One self-contained HTML page comparing run directories, side by side.

For every run: the head and its configuration, the test metrics beside both linear probes
(global mean, pyramid nodes), the learned pyramid weights beta as a heatmap with the weights as
text, the training curves and the confusion matrix (PNG images inline as ``data:`` URIs), and
the seconds it took. Nothing on the page refers to another file or to the network, so it can be
mailed, archived or opened offline. ``framepool report`` writes it; the service shows it for its
loaded runs at ``/runs``.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator import plots
from aggregator.rundir import METRICS_FILE, read_config, read_metrics


@dataclass(frozen=True)
class RunView:
    """What the report shows of one run directory."""

    run_dir: Path
    config: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def run_id(self) -> str:
        return str(self.config.get("run_id") or self.metrics.get("run_id") or self.run_dir.name)

    @property
    def head(self) -> str:
        return str(self.config.get("head", "?"))

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.config.get("class_names") or []]


def load_view(run_dir: str | Path) -> RunView:
    """A run's ``config.json`` (a directory without one is named in the error,
    ``FileNotFoundError``) and its ``metrics.json`` (empty when the run has none yet)."""
    path = Path(run_dir)
    config = read_config(path)
    metrics = read_metrics(path) if (path / METRICS_FILE).is_file() else {}
    return RunView(path, config, metrics)


# --------------------------------------------------------------------------- formatting
def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{100 * value:.1f} %"
    return "–"


def _seconds(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.2f} s"
    return "–"


def _probe(view: RunView, name: str, key: str) -> Any:
    probe = view.metrics.get("probe")
    if not isinstance(probe, Mapping):
        return None
    entry = probe.get(name)
    return entry.get(key) if isinstance(entry, Mapping) else None


def _compact(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _weights(value: Any) -> str:
    if not isinstance(value, Mapping) or not value:
        return _compact(value)
    return ", ".join(f"{k} {float(w):.3f}" for k, w in value.items())


def _extractor_summary(config: Mapping[str, Any]) -> str:
    parts = []
    for stream, cfg in (config.get("extractor") or {}).items():
        if not isinstance(cfg, Mapping):
            continue
        if cfg.get("source_stream"):  # a map stream: maps of another stream's backbone
            parts.append(
                f"{stream}: maps of {cfg['source_stream']} ({cfg.get('channels', '?')} channels, "
                f"frame stride {cfg.get('frame_stride', '?')})"
            )
            continue
        bits = [str(cfg.get("arch", "?")), f"weights {cfg.get('weights', '?')}"]
        flow = cfg.get("flow")
        if isinstance(flow, Mapping) and flow.get("backend"):
            bits.append(f"flow {flow['backend']}")
        elif isinstance(flow, str):
            bits.append(f"flow {flow}")
        parts.append(f"{stream}: {', '.join(bits)}")
    return "; ".join(parts) or "–"


# --------------------------------------------------------------------------- figures
def _png_uri(draw: Callable[[Path], Path]) -> str:
    """Draw a figure with one of :mod:`aggregator.plots`' functions and inline its PNG."""
    with tempfile.TemporaryDirectory(prefix="framepool-report-") as tmp:
        png = draw(Path(tmp) / "figure.png").read_bytes()
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _curves(view: RunView) -> str:
    history = view.metrics.get("history") or []
    if not any(isinstance(h, Mapping) and "train_loss" in h for h in history):
        return '<p class="none">no training curves (this head does not train by steps)</p>'
    refit = view.metrics.get("refit_history") or None
    uri = _png_uri(lambda p: plots.plot_history(history, p, title=view.run_id, refit=refit))
    return f'<img src="{uri}" alt="training curves of {_esc(view.run_id)}: loss and top-1">'


def _confusion(view: RunView) -> str:
    cm = view.metrics.get("confusion_matrix")
    names = view.class_names
    if not cm or not names or int(np.asarray(cm).sum()) == 0:
        return '<p class="none">no confusion matrix (no test videos)</p>'
    uri = _png_uri(lambda p: plots.plot_confusion(cm, names, p, title=view.run_id))
    return (
        f'<img src="{uri}" alt="confusion matrix of {_esc(view.run_id)} on '
        f'{int(np.asarray(cm).sum())} test videos">'
    )


def beta_levels(view: RunView) -> dict[str, list[list[list[float]]]]:
    """``{stream: [pyramid][level][node]}`` of the run's learned node weights (empty without)."""
    pyramids = view.metrics.get("beta_pyramids")
    if isinstance(pyramids, Mapping) and pyramids:
        return {str(s): [list(p) for p in rows] for s, rows in pyramids.items()}
    beta = view.metrics.get("beta")
    if isinstance(beta, Mapping) and beta:
        return {str(s): [list(levels)] for s, levels in beta.items() if levels}
    return {}


def _cell_colour(value: float, vmax: float) -> tuple[str, str]:
    """Background (a single-hue scale, white to dark blue) and a text colour that reads on it."""
    t = 0.0 if vmax <= 0 else max(0.0, min(1.0, value / vmax))
    low, high = np.array([0.97, 0.98, 1.0]), np.array([0.03, 0.19, 0.42])
    rgb = low + t * (high - low)
    hexed = "#" + "".join(f"{round(255 * c):02x}" for c in rgb)
    return hexed, plots.text_colour(rgb)


def beta_heatmap_html(levels: Sequence[Sequence[float]], *, vmax: float, caption: str) -> str:
    """One pyramid's weights as rows of cells, one row per level, each cell spanning its node's
    share of the video (time left to right), the weight printed in the cell."""
    rows = []
    for depth, nodes in enumerate(levels, start=1):
        cells = []
        for k, b in enumerate(nodes, start=1):
            bg, fg = _cell_colour(float(b), vmax)
            label = f"level {depth}, part {k} of {len(nodes)}: beta {float(b):.3f}"
            cells.append(
                f'<span class="cell" style="background:{bg};color:{fg}" title="{label}" '
                f'aria-label="{label}">{float(b):.2f}</span>'
            )
        rows.append(
            f'<div class="level"><span class="lvl">l={depth}</span>'
            f'<span class="cells">{"".join(cells)}</span></div>'
        )
    return (
        f'<figure class="beta"><figcaption>{_esc(caption)}</figcaption>{"".join(rows)}'
        '<p class="axis"><span>start</span><span>time →</span><span>end</span></p></figure>'
    )


def _beta(view: RunView) -> str:
    betas = beta_levels(view)
    if not betas:
        return f'<p class="none">{_esc(view.head)} learns no pyramid weights</p>'
    vmax = max(
        (float(b) for pyr in betas.values() for levels in pyr for lv in levels for b in lv),
        default=1.0,
    )
    out = []
    for stream, pyramids in betas.items():
        for i, levels in enumerate(pyramids, start=1):
            caption = stream if len(pyramids) == 1 else f"{stream}, pyramid {i}"
            out.append(beta_heatmap_html(levels, vmax=vmax, caption=caption))
    return "".join(out)


# figures a trainer draws that the report does not redraw from metrics.json
OWN_FIGURES = {
    "attention.png": "spatial attention (stpn)",
    "datp_weights.png": "DATP temporal weights",
}


def _own_figures(view: RunView) -> str:
    out = []
    for name, what in OWN_FIGURES.items():
        path = view.run_dir / name
        if path.is_file():
            uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
            out.append(f'<img src="{uri}" alt="{_esc(what)} of {_esc(view.run_id)}">')
    return "".join(out) or '<p class="none">none (no attention or DATP weights drawn)</p>'


# --------------------------------------------------------------------------- the page
def _rows(views: Sequence[RunView]) -> list[tuple[str, list[str]]]:
    """Label and one cell per run of every row of the comparison table (cells are HTML)."""

    def row(label: str, fn: Callable[[RunView], Any]) -> tuple[str, list[str]]:
        return label, [_esc(fn(v)) for v in views]

    def score(key: str) -> Callable[[RunView], str]:
        def cell(v: RunView) -> str:
            head = _pct(v.metrics.get(key))
            gm, nodes = _pct(_probe(v, "global_mean", key)), _pct(_probe(v, "pyramid_nodes", key))
            return f"{head}  (probes: global mean {gm}, nodes {nodes})"

        return cell

    train = lambda v: v.config.get("train_args") or {}  # noqa: E731
    training = lambda v: v.metrics.get("training") or {}  # noqa: E731
    return [
        row("head", lambda v: v.head),
        row("streams", lambda v: ", ".join(v.config.get("streams") or []) or "–"),
        row("head options", lambda v: _compact(v.config.get("head_kwargs") or {})),
        row("fusion", lambda v: _compact(v.config.get("fusion"))),
        row("fusion weights", lambda v: _weights(v.metrics.get("fusion_weights"))),
        row("features", lambda v: _extractor_summary(v.config)),
        row(
            "splits",
            lambda v: (
                f"train {(v.config.get('splits') or {}).get('train', '?')!s}, "
                f"test {(v.config.get('splits') or {}).get('test', '?')!s}"
            ),
        ),
        row("seed", lambda v: _compact(v.config.get("seed"))),
        row("epochs asked", lambda v: _compact(train(v).get("epochs"))),
        row("learning rate", lambda v: _compact(training(v).get("lr", train(v).get("lr")))),
        row(
            "weight decay",
            lambda v: _compact(training(v).get("weight_decay", train(v).get("weight_decay"))),
        ),
        row("test top-1", score("top1")),
        row("test mean class accuracy", score("mean_class_accuracy")),
        row("test top-5", lambda v: _pct(v.metrics.get("top5"))),
        row(
            "videos: train / test",
            lambda v: f"{v.metrics.get('n_train')} / {v.metrics.get('n_test')}",
        ),
        row("seconds (whole run)", lambda v: _seconds(v.metrics.get("seconds"))),
        row("seconds (training)", lambda v: _seconds(v.metrics.get("seconds_train"))),
    ]


CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:1.5rem;color:#111;background:#fff}
h1{font-size:1.4rem}h2{font-size:1.15rem;margin-top:2rem}
table{border-collapse:collapse;width:100%}
th,td{border:1px solid #bbb;padding:.35rem .5rem;text-align:left;vertical-align:top}
thead th{background:#eef2f7}tbody th{font-weight:600;background:#f7f7f7;width:14rem}
.figs{display:grid;gap:1rem;grid-template-columns:repeat(var(--n),minmax(0,1fr))}
.figs>section{border:1px solid #ccc;padding:.5rem;min-width:0}
.figs h3{font-size:1rem;margin:.2rem 0 .5rem;word-break:break-all}
img{max-width:100%;height:auto}
.beta{margin:0 0 .8rem}.beta figcaption{font-weight:600}
.level{display:flex;align-items:stretch;gap:.3rem;margin:2px 0}
.lvl{width:2.5rem;font-size:.85rem}
.cells{display:flex;flex:1;gap:1px}
.cell{flex:1;text-align:center;font-size:.8rem;padding:.15rem 0;border:1px solid #999;min-width:0;
overflow:hidden}
.axis{display:flex;justify-content:space-between;margin:0 0 0 2.8rem;font-size:.8rem;color:#444}
.none{color:#444;font-style:italic}
details pre{white-space:pre-wrap;font-size:.8rem}
"""


def render_report(run_dirs: Sequence[str | Path], *, title: str = "framepool runs") -> str:
    """The comparison page of ``run_dirs`` (in that order) as one HTML document."""
    if not run_dirs:
        raise ValueError("no run directory to report on")
    views = [load_view(d) for d in run_dirs]
    head_cells = "".join(f'<th scope="col">{_esc(v.run_id)}</th>' for v in views)
    body = "".join(
        f'<tr><th scope="row">{_esc(label)}</th>{"".join(f"<td>{c}</td>" for c in cells)}</tr>'
        for label, cells in _rows(views)
    )

    def figures(name: str, fn: Callable[[RunView], str]) -> str:
        sections = "".join(
            f'<section aria-label="{_esc(name)} of {_esc(v.run_id)}">'
            f"<h3>{_esc(v.run_id)}</h3>{fn(v)}</section>"
            for v in views
        )
        return f'<h2>{_esc(name)}</h2><div class="figs" style="--n:{len(views)}">{sections}</div>'

    configs = "".join(
        f"<details><summary>{_esc(v.run_id)}: config.json</summary>"
        f"<pre>{_esc(json.dumps(v.config, indent=2, sort_keys=True))}</pre></details>"
        for v in views
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{_esc(title)}</h1>"
        f"<p>{len(views)} run(s). Accuracies are on each run's test split; the probes are the "
        "standardised logistic regressions on the global mean and on the pyramid nodes, fitted "
        "on the same training videos.</p>"
        f'<table id="runs"><thead><tr><th scope="col">run</th>{head_cells}</tr></thead>'
        f"<tbody>{body}</tbody></table>"
        + figures("learned pyramid weights beta (darker is heavier)", _beta)
        + (
            figures("attention and temporal weights, as the trainer drew them", _own_figures)
            if any((v.run_dir / n).is_file() for v in views for n in OWN_FIGURES)
            else ""
        )
        + figures("training curves", _curves)
        + figures("confusion matrices", _confusion)
        + f"<h2>configurations</h2>{configs}</body></html>"
    )


def write_report(
    run_dirs: Sequence[str | Path], out: str | Path, *, title: str = "framepool runs"
) -> Path:
    """Write :func:`render_report` to ``out``; returns the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(run_dirs, title=title), encoding="utf-8")
    return path

"""Compare runs: a table of what differs and what each run scored, seed aggregates, plots, one HTML page.

``python scripts/compare_runs.py outputs/multirun/<date>/<time>`` (or several run folders). A run folder
is one with ``.hydra/config.yaml``; its ``results.json`` (test metrics with their 95% CI over test tasks)
and ``csv/metrics.csv`` (learning curves) are read when present. Runs whose configs differ only in
``seed`` form a group, reported as mean +- 95% CI over seeds (Student's t).
"""
from __future__ import annotations

import base64
import csv
import html
import json
import math
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metalstm.errors import DataError

# keys that differ between runs without meaning anything: where files go, how they are logged
PLUMBING = ("paths.", "hydra.", "logger.", "callbacks.", "run_id", "resume", "trainer.default_root_dir")
CHOICES = ("experiment", "meta_learner.name", "base_learner.name", "data.name")  # shown first, whenever they differ
MAIN_METRICS = ("test/acc", "test/mse", "test/token_acc", "test/seq_acc", "test/point_error")  # reported first
# two-sided 95% Student's t for 1..30 degrees of freedom; 1.96 beyond
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


@dataclass
class Run:
    path: Path
    name: str  # the folder, relative to the compared folders
    config: dict[str, Any]  # flattened: "meta_learner.inner_lr" -> 0.01
    results: dict[str, Any] | None  # results.json, None for a run that did not finish
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]

    @property
    def status(self) -> str:
        """done (tested) | unfinished (trained, stopped before its test) | empty (refused or stopped before step 1)."""
        if self.results:
            return "done"
        return "unfinished" if self.curves or (self.path / "checkpoints").is_dir() else "empty"

    def metric(self, name: str) -> tuple[float, float] | None:
        metrics = (self.results or {}).get("metrics", {})
        if name not in metrics or not math.isfinite(metrics[name]):
            return None
        return metrics[name], metrics.get(f"{name}_ci95", float("nan"))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def natural_key(parts: list[str] | tuple[str, ...]) -> list[list[Any]]:
    """Sort key that orders numbers by value: run 2 before run 10, layer body.3 before body.10 (each part splits
    into text, number, text, ...: the types line up between any two keys)."""
    return [[int(t) if t.isdigit() else t for t in re.split(r"(\d+)", part)] for part in parts]


def find_runs(folders: list[Path]) -> list[Run]:
    """Every run folder in or below ``folders`` (multirun sweeps hold one per job), in order."""
    runs: list[Run] = []
    for folder in folders:
        if not folder.is_dir():
            raise DataError(f"{folder} is not a folder. Pass run folders or sweep folders (outputs/multirun/<date>/<time>).")
        configs = sorted((p for p in folder.rglob("config.yaml") if p.parent.name == ".hydra"),
                         key=lambda p: natural_key(p.parts))
        for config_file in configs:
            run_dir = config_file.parent.parent
            name = str(run_dir.relative_to(folder.parent)) if run_dir != folder else folder.name
            try:
                runs.append(read_run(run_dir, name))
            except (OSError, ValueError, KeyError, OmegaConfBaseException, yaml.YAMLError) as e:  # one bad folder hides no other
                print(f"warning: skipping {run_dir}: its files are damaged ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:200]})", file=sys.stderr)
    if not runs:
        raise DataError(
            f"No runs found in {', '.join(map(str, folders))}: a run folder holds .hydra/config.yaml (train.py writes "
            f"it). Pass the folder printed at the end of a run, or a sweep folder outputs/multirun/<date>/<time>."
        )
    return runs


def read_run(run_dir: Path, name: str) -> Run:
    config = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=False)
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():  # the experiment is a config-group choice, not a config key
        choices = OmegaConf.load(hydra_file).hydra.runtime.choices or {}
        config["experiment"] = choices.get("experiment") or "default"
    results_file = run_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else None  # a folder there: OSError
    if results is not None and not isinstance(results, dict):
        raise ValueError(f"results.json holds a {type(results).__name__}, not the results object train.py writes")
    return Run(run_dir, name, flatten(config), results, read_curves(run_dir / "csv" / "metrics.csv"))


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return curves
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value not in ("", None) and not key.startswith("test/"):
                    curves.setdefault(key, []).append((int(row["step"]), float(value)))
    return curves


def differing_keys(runs: list[Run]) -> list[str]:
    """The settings that tell the runs apart: the group choices, then every key that two runs both set and set
    differently. A key only some runs have (data.ways beside a sinusoid run) comes with their group choice."""
    keys = sorted({k for r in runs for k in r.config if not k.startswith(PLUMBING) and not k.endswith("_target_")})

    def values(key: str, everywhere: bool) -> set[str]:
        return {json.dumps(r.config.get(key), sort_keys=True) for r in runs if everywhere or r.config.get(key) is not None}

    choices = [k for k in CHOICES if len(values(k, True)) > 1]
    return choices + [k for k in keys if k not in CHOICES and len(values(k, False)) > 1]


def test_metrics(runs: list[Run]) -> list[str]:
    names = {k for r in runs for k in (r.results or {}).get("metrics", {})
             if k.startswith("test/") and not k.endswith("_ci95") and k != "test/num_tasks" and k != "test/loss"}
    return sorted(names, key=lambda n: (MAIN_METRICS.index(n) if n in MAIN_METRICS else len(MAIN_METRICS), n))


def student_t_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student's t over the values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    t = T95[len(values) - 2] if len(values) - 1 <= len(T95) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def fmt_ci(pair: tuple[float, float] | None) -> str:
    if pair is None:
        return ""
    mean, ci = pair
    return f"{mean:.4g}" if math.isnan(ci) else f"{mean:.4g} ± {ci:.2g}"


@dataclass
class Report:
    runs: list[Run]
    keys: list[str]  # config keys that differ between runs
    metrics: list[str]  # test metrics found
    run_rows: list[dict[str, str]]
    seed_rows: list[dict[str, str]]  # one per group of runs that differ only by seed (2 or more runs)
    empty: list[Run] = field(default_factory=list)  # folders of runs refused or stopped before their first step


def build_report(runs: list[Run]) -> Report:
    """The table's runs: those that trained (folders of refused runs are listed in the summary only)."""
    empty = [r for r in runs if r.status == "empty"]
    runs = [r for r in runs if r.status != "empty"]
    keys = differing_keys(runs)
    metrics = test_metrics(runs)
    run_rows = []
    for number, run in enumerate(runs, 1):
        row = {"#": str(number), "run": run.name, "status": run.status,
               **{k: "" if run.config.get(k) is None else fmt(run.config.get(k)) for k in keys}}
        for metric in metrics:
            row[metric] = fmt_ci(run.metric(metric))
        row["steps"] = fmt((run.results or {}).get("steps", ""))
        row["train_seconds"] = fmt((run.results or {}).get("train_seconds", ""))
        row["steps/s"] = fmt((run.results or {}).get("steps_per_second", ""))
        run_rows.append(row)
    group_keys = [k for k in keys if k != "seed"]
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(fmt(run.config.get(k)) for k in group_keys), []).append(run)
    seed_rows = []
    if "seed" in keys:
        for values, members in groups.items():
            done = [r for r in members if r.results]
            if len(done) < 2:
                continue
            row = {**dict(zip(group_keys, values)), "seeds": ", ".join(fmt(r.config.get("seed")) for r in done)}
            for metric in metrics:
                scores = [r.metric(metric)[0] for r in done if r.metric(metric)]
                row[metric] = fmt_ci(student_t_ci95(scores)) if scores else ""
            seed_rows.append(row)
    return Report(runs, keys, metrics, run_rows, seed_rows, empty)


# ------------------------------------------------------------------------------------------ files


def write_table(rows: list[dict[str, str]], stem: Path) -> None:
    """``stem``.csv and ``stem``.md."""
    columns = list(rows[0])
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    stem.with_suffix(".md").write_text(markdown_table(rows, columns))


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


LABEL_CHARS = 48  # a legend entry's length: the runs table holds the full settings


def run_label(run: Run, report: Report) -> str:
    """The run's number in the table and the settings that set it apart, shortened to their last name part."""
    number = report.runs.index(run) + 1
    choices = "/".join(fmt(run.config.get(k)) for k in report.keys if k in CHOICES)  # e.g. omniglot_5way/maml/conv4
    settings = [f"{k.rsplit('.', 1)[-1]}={fmt(run.config.get(k))}" for k in report.keys
                if k not in CHOICES and run.config.get(k) is not None]
    text = ", ".join(([choices] if choices else []) + settings) or run.name
    return f"{number}. {text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + '…'}"


def run_colour(run: Run, report: Report) -> Any:
    """One colour per run, the same in every figure."""
    cmap = pyplot().get_cmap("tab10" if len(report.runs) <= 10 else "tab20")
    return cmap(report.runs.index(run) % cmap.N)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: figures go to files, no display needed (imported when first plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(rows: int, columns: int, width: float = 13.0, row_height: float = 4.2) -> tuple[Any, list[Any]]:
    """A page-wide figure of ``rows`` x ``columns`` panels, laid out by matplotlib's constrained layout (room for
    long tick labels and a legend outside the panels, without tight_layout's warnings)."""
    fig, axes = pyplot().subplots(rows, columns, figsize=(width, row_height * rows), squeeze=False, layout="constrained")
    return fig, [ax for row in axes for ax in row]


def save_figure(fig: Any, path: Path) -> bool:
    """Write a matplotlib figure as a PNG and close it; True (the plot functions' "written")."""
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return True


def legend_below(fig: Any, report: Report, runs: list[Run]) -> None:
    """One legend for the figure, under its panels, so that no curve is covered."""
    handles = [pyplot().Line2D([], [], color=run_colour(r, report), linewidth=2) for r in runs]
    fig.legend(handles, [run_label(r, report) for r in runs], loc="outside lower center", ncol=min(3, len(runs)),
               fontsize=8, frameon=False)


def smoothed(values: list[float], weight: float = 0.8) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start; ``weight`` shrinks for short
    curves so that a few points are not flattened."""
    weight = min(weight, 1 - 4 / max(len(values), 5))
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def plot_curves(report: Report, path: Path) -> bool:
    """Meta-training loss and every validation metric against steps: the smoothed curve solid, the logged points
    faint. A validation panel is always drawn; where no run validated, it says why."""
    runs = [r for r in report.runs if r.curves]
    if not runs:
        return False
    val_names = sorted({k for r in runs for k in r.curves if k.startswith("val/") and k != "val/loss"},
                       key=lambda k: (f"test/{k[4:]}" not in MAIN_METRICS, k))
    panels = [("train/loss", "meta-training loss (query loss after adaptation)")]
    panels += [(k, f"validation {k[4:]}") for k in val_names] or [("val/", "validation")]
    columns = min(2, len(panels))
    fig, axes = figure(math.ceil(len(panels) / columns), columns)
    for ax, (key, title) in zip(axes, panels):
        for run in runs:
            if key in run.curves:
                steps, values = zip(*run.curves[key])
                colour = run_colour(run, report)
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8, marker="o" if len(steps) < 30 else None,
                        markersize=2.5)
                ax.plot(steps, smoothed(list(values)), color=colour, linewidth=1.8, marker="o" if len(steps) <= 2 else None,
                        markersize=4)
        if key == "val/":
            intervals = sorted({fmt(r.config.get("trainer.val_check_interval")) for r in runs})
            steps = sorted({fmt((r.results or {}).get("steps", "?")) for r in runs})
            ax.text(0.5, 0.5, "no validation ran in these runs:\nit runs every trainer.val_check_interval steps "
                    f"({', '.join(intervals)}),\nand the runs trained {', '.join(steps)} steps",
                    ha="center", va="center", transform=ax.transAxes, fontsize=9, color="#555")
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("meta-training step")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    legend_below(fig, report, runs)
    return save_figure(fig, path)


GATE = re.compile(r"train/gates/(?P<gate>\w+)/(?P<layer>.+)/step(?P<step>\d+)$")


def gate_values(run: Run) -> dict[str, dict[str, list[tuple[int, float, float]]]]:
    """gate -> layer -> [(inner step, mean, spread)] at the last logged meta-training step (train/gates/...)."""
    values: dict[str, dict[str, list[tuple[int, float, float]]]] = {}
    for key, curve in run.curves.items():
        match = GATE.match(key)
        if match:
            spread = run.curves.get(f"{key}_std", [(0, 0.0)])[-1][1]
            values.setdefault(match["gate"], {}).setdefault(match["layer"], []).append(
                (int(match["step"]), curve[-1][1], spread))
    return values


def plot_gates(report: Report, path: Path) -> bool:
    """The learned optimizer's gates per inner step and layer at the end of meta-training (Ravi & Larochelle's
    Figure 2): one panel per run and gate, a line per layer, the band one standard deviation over coordinates."""
    import matplotlib.ticker

    panels = [(run, gate, layers) for run in report.runs for gate, layers in sorted(gate_values(run).items())]
    if not panels:
        return False
    fig, axes = figure(1, len(panels), width=5.5 * len(panels), row_height=4)
    for ax, (run, gate, layers) in zip(axes, panels):
        for layer, points in sorted(layers.items(), key=lambda item: natural_key([item[0]])):
            steps, means, spreads = zip(*sorted(points))
            ax.plot(steps, means, marker="o", markersize=3, label=layer)
            ax.fill_between(steps, [m - s for m, s in zip(means, spreads)], [m + s for m, s in zip(means, spreads)],
                            alpha=0.15)
        ax.set_title(f"{gate} gate, {run_label(run, report)}", fontsize=9)
        ax.set_xlabel("inner step")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    return save_figure(fig, path)


def plot_final(report: Report, path: Path) -> bool:
    """Each test metric as horizontal bars, one per finished run in the table's order and colours, with the 95% CI
    over test tasks; the labels sit beside the bars, so long ones are not cut."""
    scored = [(m, [(r, r.metric(m)) for r in report.runs if r.metric(m)]) for m in report.metrics]
    scored = [(m, pairs) for m, pairs in scored if pairs]
    if not scored:
        return False
    most = max(len(pairs) for _, pairs in scored)
    columns = min(2, len(scored))
    fig, axes = figure(math.ceil(len(scored) / columns), columns, row_height=1.2 + 0.38 * most)
    for ax, (metric, pairs) in zip(axes, scored):
        ys = list(range(len(pairs)))[::-1]  # the first run on top, as in the table
        means = [p[0] for _, p in pairs]
        cis = [0.0 if math.isnan(p[1]) else p[1] for _, p in pairs]
        ax.barh(ys, means, xerr=cis, capsize=3, color=[run_colour(r, report) for r, _ in pairs], height=0.7)
        ax.set_yticks(ys, [run_label(r, report) for r, _ in pairs], fontsize=8)
        for y, mean, ci in zip(ys, means, cis):
            ax.annotate(f"{mean:.4g}", (mean + ci, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=7)
        ax.margins(x=0.12)
        ax.set_title(f"{metric} (95% CI over test tasks)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[len(scored):]:
        ax.set_visible(False)
    return save_figure(fig, path)


def html_table(rows: list[dict[str, str]], row_class: str | Callable[[dict[str, str]], str],
               columns: list[str] | None = None) -> str:
    """A table of ``rows`` (``columns``: default, the first row's keys); each ``<tr>`` gets ``row_class``, or
    ``row_class(row)``."""
    if not rows:
        return ""
    columns = columns or list(rows[0])
    classes = row_class if callable(row_class) else lambda _: row_class
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(f'<tr class="{classes(r)}">' + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns)
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def embedded_png(path: Path, caption: str, alt: str) -> str:
    """A heading and the image inlined as a data URI: the page opens offline, as one file."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<h2>{caption}</h2><img alt="{alt}" src="data:image/png;base64,{data}">'


def render_probe(row_selector: str) -> str:
    """A script that lets a headless browser confirm what rendered: the rows and the decoded images."""
    return (
        '<script>\nwindow.addEventListener("load", function () {\n'
        "  var images = Array.prototype.slice.call(document.images);\n"
        f'  document.body.dataset.rows = document.querySelectorAll("{row_selector}").length;\n'
        "  document.body.dataset.imagesLoaded = images.filter(function (i) "
        "{ return i.complete && i.naturalWidth > 0; }).length;\n});\n</script>"
    )


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>metalstm: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f0f0f0; }} td:first-child {{ text-align: left; }}
.wide {{ overflow-x: auto; }}
img {{ width: 100%; max-width: 1430px; border: 1px solid #eee; }}
</style></head>
<body>
<h1>Run comparison</h1>
<p>{summary}</p>
<h2>Runs</h2>
<p>Config keys that differ between runs (blank: the run's config groups have no such key), and each run's test
metrics (mean ± 95% CI over its test tasks). The figures name runs by their number here.</p>
<div class="wide">{runs}</div>
{seeds}
{images}
{probe}
</body></html>
"""


INSTANCE = re.compile(r"test/acc_(?P<k>\d+)$")
# Santoro et al. (2016), Table 1, Omniglot, 5 classes: accuracy (%) at the 1st, 2nd, 3rd, 5th and 10th instance
SANTORO_ROWS = {"LSTM (Santoro et al.)": {1: 24.4, 2: 49.5, 3: 55.3, 5: 63.6, 10: 62.5},
                "MANN (Santoro et al.)": {1: 36.4, 2: 82.8, 3: 91.0, 5: 94.9, 10: 98.1}}


def instance_accuracy(run: Run) -> list[tuple[int, float, float]]:
    """[(instance k, test accuracy, its 95% CI)] of a stream run (test/acc_<k>), in order of k; [] otherwise."""
    points = []
    for name in (run.results or {}).get("metrics", {}):
        if (match := INSTANCE.match(name)) and (value := run.metric(name)):
            points.append((int(match["k"]), *value))
    return sorted(points)


def plot_instances(report: Report, path: Path) -> bool:
    """Accuracy at the k-th presentation of a class (stream runs: Santoro et al.'s protocol), with the paper's
    LSTM and MANN rows drawn in (dashed) for comparison."""
    runs = [(run, points) for run in report.runs if (points := instance_accuracy(run))]
    if not runs:
        return False
    fig, (ax,) = figure(1, 1, width=7.5, row_height=4.5)
    for run, points in runs:
        ks, accs, cis = zip(*points)
        ax.errorbar(ks, accs, yerr=cis, marker="o", capsize=3, label=run_label(run, report), color=run_colour(run, report))
    for label, row in SANTORO_ROWS.items():
        ax.plot(list(row), list(row.values()), linestyle="--", marker="x", color="grey", alpha=0.7)
        ax.annotate(label, (10, row[10]), textcoords="offset points", xytext=(-4, 4), ha="right", fontsize=7,
                    color="grey")
    ax.set_xlabel("instance (k-th presentation of a class)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks([1, 2, 3, 5, 10])
    ax.set_ylim(0, 104)  # room for the MANN label above its row
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def write_report(folders: list[Path], out: Path) -> dict[str, Path]:
    """Write runs.{csv,md}, seeds.{csv,md} (when runs differ by seed), curves.png, final.png, gates.png (runs of
    the LSTM optimizer), instances.png (stream runs) and report.html
    to ``out``; returns what was written."""
    report = build_report(find_runs(folders))
    out.mkdir(parents=True, exist_ok=True)
    written = {"runs": out / "runs.md"}
    write_table(report.run_rows, out / "runs")
    if report.seed_rows:
        write_table(report.seed_rows, out / "seeds")
        written["seeds"] = out / "seeds.md"
    images = []
    for name, plot, caption in (("curves", plot_curves, "Learning curves"),
                                ("final", plot_final, "Final test metrics (error bars: 95% CI over test tasks)"),
                                ("gates", plot_gates, "The learned optimizer's gates per inner step and layer"),
                                ("instances", plot_instances, "Accuracy by instance, Santoro et al.'s rows dashed")):
        if plot(report, out / f"{name}.png"):
            written[name] = out / f"{name}.png"
            images.append(embedded_png(out / f"{name}.png", caption, name))
    seeds = ""
    if report.seed_rows:
        seeds = ("<h2>Across seeds</h2><p>Runs that differ only in <code>seed</code>: mean ± 95% CI over seeds "
                 "(Student's t).</p>" + html_table(report.seed_rows, "group"))
    done = sum(r.results is not None for r in report.runs)
    summary = (f"{len(report.runs)} runs ({done} finished) from {html.escape(', '.join(map(str, folders)))}; "
               f"differing keys: {html.escape(', '.join(report.keys) or 'none')}.")
    if report.empty:
        summary += (f" Left out, as they hold no training: {html.escape(', '.join(r.name for r in report.empty))} "
                    "(refused at the config check, or stopped before the first step).")
    page = PAGE.format(title=html.escape(folders[0].name), summary=summary, runs=html_table(report.run_rows, "run"),
                       seeds=seeds, images="\n".join(images), probe=render_probe("tr.run"))
    (out / "report.html").write_text(page)
    written["html"] = out / "report.html"
    return written

"""Reproduce a published table: each row a normal run, then paper and own figure side by side.

A table is a YAML in ``configs/reproduce/`` (or any path): rows of an experiment with overrides (or the
evaluation of an earlier row's checkpoint under other test settings), the published figure with its 95%
interval and source, and the protocol. ``scripts/reproduce.py TABLE`` runs the rows in order, each in
``<out>/<table>/<row>/``: a finished row (``results.json``) is kept, an interrupted one continues from its
``last.ckpt`` (``resume=``), so a table can be finished in pieces. The report compares every row.
"""
from __future__ import annotations

import html
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from metalstm.errors import ConfigError
from metalstm.files import atomic_write, write_json
from metalstm.report import MAIN_METRICS, embedded_png, html_table, markdown_table, pyplot, read_curves, render_probe, save_figure

REPO = Path(__file__).resolve().parents[1]
TABLES = REPO / "configs" / "reproduce"
ROW_KEYS = {"id", "method", "setting", "experiment", "overrides", "evaluate", "published", "protocol"}
PUBLISHED_KEYS = {"value", "ci", "metric", "source"}


@dataclass
class Published:
    value: float  # the paper's figure, in the metric's units (accuracy in %)
    ci: float | None  # its 95% interval half-width as printed; None where the paper gives none
    source: str  # paper and table
    metric: str = "test/acc"


@dataclass
class Row:
    id: str  # the row's folder name
    method: str
    setting: str
    protocol: str
    published: Published | None
    experiment: str | None = None  # train: python train.py +experiment=<experiment> <overrides>
    evaluate: str | None = None  # or evaluate the best checkpoint of that row: python eval.py <overrides>
    overrides: list[str] = field(default_factory=list)


@dataclass
class Table:
    name: str
    title: str
    data_root: bool  # rows read data.root (the runner's --data-root)
    rows: list[Row]
    source: str = ""  # the name or path it was loaded by


def table_error(where: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: {problem}. A table is a YAML with name, title, data_root (true/false) and rows; "
                       f"each row has id, method, setting, protocol, published (value, ci, source) or null, and "
                       f"either experiment (with overrides) or evaluate (the id of an earlier row).")


def load_table(name_or_path: str) -> Table:
    """A table by name (``configs/reproduce/<name>.yaml``) or path, checked before anything runs."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TABLES / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in TABLES.glob("*.yaml"))
        raise ConfigError(f"No reproduction table {name_or_path!r} (looked for {path}). Choose one of {known} "
                          f"or pass the path of a table YAML.")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict) or not isinstance(raw.get("rows"), list) or not raw["rows"]:
        raise table_error(str(path), "no list of rows")
    rows: list[Row] = []
    for i, entry in enumerate(raw["rows"]):
        where = f"{path} row {i + 1}"
        if not isinstance(entry, dict) or set(entry) - ROW_KEYS or not {"id", "method", "setting", "protocol"} <= set(entry):
            raise table_error(where, f"keys {sorted(entry) if isinstance(entry, dict) else entry!r}")
        if (entry.get("experiment") is None) == (entry.get("evaluate") is None):
            raise table_error(where, "give exactly one of experiment and evaluate")
        if entry.get("evaluate") is not None and entry["evaluate"] not in {r.id for r in rows}:
            raise table_error(where, f"evaluate={entry['evaluate']!r} names no earlier row")
        if entry["id"] in {r.id for r in rows} or not str(entry["id"]).replace("_", "").isalnum():
            raise table_error(where, f"id {entry['id']!r} is repeated or not a plain name")
        published = entry.get("published")
        if published is not None:
            if not isinstance(published, dict) or set(published) - PUBLISHED_KEYS or not {"value", "source"} <= set(published):
                raise table_error(where, f"published {published!r}")
            published = Published(**{"ci": None, **published})
        overrides = entry.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise table_error(where, f"overrides {overrides!r} (a list of key=value)")
        rows.append(Row(**{**entry, "published": published, "overrides": overrides}))
    return Table(name=str(raw.get("name") or path.stem), title=str(raw.get("title") or path.stem),
                 data_root=bool(raw.get("data_root", False)), rows=rows, source=name_or_path)


# ------------------------------------------------------------------------------------------------ running


def row_state(folder: Path) -> str:
    """done (results.json), resumable (checkpoints/last.ckpt), started (a folder without either) or new."""
    if (folder / "results.json").is_file():
        return "done"
    if (folder / "checkpoints" / "last.ckpt").is_file():
        return "resumable"
    return "started" if folder.exists() else "new"


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{'+changes' if dirty else ''}" if head else "unknown"


def machine(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    threads = os.environ.get("OMP_NUM_THREADS")
    return f"{platform.machine()} CPU, {os.cpu_count()} cores" + (f", {threads} math thread(s)" if threads else "")


def row_command(table: Table, row: Row, folder: Path, out: Path, state: str, data_root: str, device: str | None,
                extra: list[str]) -> list[str]:
    root = [f"data.root={data_root}"] if table.data_root else []
    if row.evaluate is not None:
        accelerator = [f"accelerator={device}"] if device else []
        return [sys.executable, str(REPO / "eval.py"), f"run_dir={out / row.evaluate}", *row.overrides, *root,
                *accelerator, f"hydra.run.dir={folder}"]
    trainer = [f"trainer={device}"] if device else []
    if state == "resumable":  # the run's own config is kept; its length (trainer.*) may be the table's newer one
        kept = [o for o in [*row.overrides, *extra] if o.startswith("trainer.")]
        # ++: the composed default data set may lack data.root; the run's own config is what resume uses
        return [sys.executable, str(REPO / "train.py"), f"resume={folder}", *("++" + r for r in root), *kept]
    return [sys.executable, str(REPO / "train.py"), f"+experiment={row.experiment}", *row.overrides, *root, *trainer,
            *extra, f"hydra.run.dir={folder}"]


def run_table(table: Table, out: Path, rows: list[str] | None, data_root: str, device: str | None,
              extra: list[str]) -> int:
    """Run the rows not done yet, in order; 0 when all ran, else the first failing row's exit code."""
    ids = [r.id for r in table.rows]
    if rows:
        unknown = [r for r in rows if r not in ids]
        if unknown:
            raise ConfigError(f"--rows {','.join(unknown)}: no such row in table {table.name}; its rows are {ids}.")
    out.mkdir(parents=True, exist_ok=True)
    for row in table.rows:
        if rows and row.id not in rows:
            continue
        folder = out / row.id
        state = row_state(folder)
        running = running_pid(out / f"{row.id}.running")
        if running is not None:
            print(f"[reproduce] {row.id}: running in process {running} (another runner); left alone", flush=True)
            continue
        if state == "done":
            print(f"[reproduce] {row.id}: done, kept ({folder / 'results.json'})", flush=True)
            continue
        if row.evaluate is not None and row_state(out / row.evaluate) != "done":
            print(f"[reproduce] {row.id}: waits for row {row.evaluate}", flush=True)
            continue
        if state == "started":  # killed before its first checkpoint: kept aside, never deleted
            aside = folder.with_name(f"{folder.name}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(aside)
            print(f"[reproduce] {row.id}: an earlier start left no checkpoint; moved it to {aside}", flush=True)
            state = "new"
        command = row_command(table, row, folder, out, state, data_root, device, extra)
        print(f"[reproduce] {row.id}: {'resuming' if state == 'resumable' else 'starting'}: "
              f"{' '.join(command[1:])}", flush=True)
        log = out / f"{row.id}.launches.json"
        launches = json.loads(log.read_text()) if log.is_file() else []
        launches.append({"command": command[1:], "commit": commit(), "machine": machine(device or "auto"),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S"), "state": state})
        write_json(log, launches)
        started = time.time()
        code = run_child(command, out / f"{row.id}.running")
        launches[-1].update(seconds=round(time.time() - started, 1), exit_code=code)
        write_json(log, launches)
        if code != 0:
            then = ("correct the row (the message above names the setting) and run again" if code == 2
                    else "run the same command again to continue")
            print(f"[reproduce] {row.id}: stopped with exit code {code}; {then}.", file=sys.stderr, flush=True)
            return code
    return 0


def running_pid(lock: Path) -> int | None:
    """The process that runs a row, if it is still alive (a stale lock, from a killed runner, is removed)."""
    try:
        pid = int(lock.read_text())
        alive = process_alive(pid)
    except (OSError, ValueError):
        alive = False
    if not alive:
        lock.unlink(missing_ok=True)
        return None
    return pid


def process_alive(pid: int) -> bool:
    proc = Path(f"/proc/{pid}/stat")
    if proc.parent.parent.is_dir() and Path("/proc/self").exists():  # Linux: a zombie (killed, not reaped) is gone
        return proc.is_file() and proc.read_text().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    os.kill(pid, 0)
    return True


def run_child(command: list[str], lock: Path) -> int:
    """Run one row; SIGTERM to the runner is passed on, so the row saves its last.ckpt before both stop.
    ``lock`` names the row's process while it runs, so a second runner of the table leaves the row alone."""
    child = subprocess.Popen(command, cwd=REPO)
    lock.write_text(str(child.pid))
    previous = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    try:
        return child.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the child too (same process group): let it save and stop
        return child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        lock.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ report


@dataclass
class Outcome:
    row: Row
    state: str
    results: dict[str, Any] | None
    launches: list[dict[str, Any]]
    curves: dict[str, list[tuple[int, float]]]

    def ours(self) -> tuple[float, float] | None:
        """The row's test metric (the published one's, else the first of acc, mse, ...) and its 95% CI."""
        metrics = (self.results or {}).get("metrics", {})
        wanted = [self.row.published.metric] if self.row.published else list(MAIN_METRICS)
        metric = next((m for m in wanted if m in metrics), None)
        if metric is None:
            return None
        return metrics[metric], metrics.get(f"{metric}_ci95", float("nan"))


def outcomes(table: Table, out: Path) -> list[Outcome]:
    found = []
    for row in table.rows:
        folder = out / row.id
        results = json.loads((folder / "results.json").read_text()) if (folder / "results.json").is_file() else None
        log = out / f"{row.id}.launches.json"
        source = out / (row.evaluate or row.id)
        found.append(Outcome(row, row_state(folder), results, json.loads(log.read_text()) if log.is_file() else [],
                             read_curves(source / "csv" / "metrics.csv")))
    return found


def compare(published: Published | None, ours: tuple[float, float] | None) -> tuple[str, str]:
    """(ours - published, whether the two 95% intervals overlap) as text."""
    if published is None or ours is None:
        return "", ""
    mean, ci = ours
    ci = 0.0 if math.isnan(ci) else ci
    overlap = abs(mean - published.value) <= ci + (published.ci or 0.0)
    return f"{mean - published.value:+.2f}", "yes" if overlap else "no"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def report_rows(table: Table, found: list[Outcome]) -> list[dict[str, str]]:
    by_id = {o.row.id: o for o in found}
    lines = []
    for o in found:
        trained = by_id[o.row.evaluate] if o.row.evaluate else o
        res, pub = trained.results or {}, o.row.published
        ours = o.ours()
        diff, overlap = compare(pub, ours)
        steps = res.get("steps")
        if steps is None and trained.curves.get("train/loss"):
            steps = trained.curves["train/loss"][-1][0] + 1
        last = o.launches[-1] if o.launches else {}
        status = o.state if o.state == "done" else ("unfinished" if o.state in ("resumable", "started") else "not run")
        lines.append({
            "row": o.row.id,
            "method": o.row.method,
            "setting": o.row.setting,
            "published": "" if pub is None else (f"{pub.value:g}" + (f" ± {pub.ci:g}" if pub.ci is not None else "")),
            "source": "" if pub is None else pub.source,
            "ours (95% CI)": "" if ours is None else f"{ours[0]:.2f} ± {ours[1]:.2f}",
            "difference": diff,
            "intervals overlap": overlap,
            "test tasks": str((o.results or {}).get("num_tasks", "")),
            "steps": "" if steps is None else f"{steps:,}",
            "wall clock": duration(sum(launch.get("seconds", 0.0) for launch in trained.launches) or None),
            "device": last.get("machine", ""),
            "commit": ", ".join(dict.fromkeys(launch["commit"] for launch in o.launches)),
            "protocol": o.row.protocol,
            "status": status,
            "command": row_recipe(table, o.row),
        })
    return lines


def row_recipe(table: Table, row: Row) -> str:
    """The command that runs a row from scratch, as a user types it (each launch's own is in <row>.launches.json)."""
    root = ["data.root=DIR"] if table.data_root else []
    if row.evaluate is not None:
        return " ".join(["python eval.py", f"run_dir=outputs/reproduce/{table.name}/{row.evaluate}", *row.overrides, *root])
    return " ".join(["python train.py", f"+experiment={row.experiment}", *row.overrides, *root])


# wall clock: every launch of the row's training run, start to exit (data loading, validation and test included)
SUMMARY_COLUMNS = ["method", "setting", "published", "ours (95% CI)", "difference", "intervals overlap", "steps",
                   "wall clock", "device", "status"]


def plot_validation(found: list[Outcome], path: Path) -> bool:
    plt = pyplot()

    trained = [o for o in found if o.row.experiment and any(k.startswith("val/") for k in o.curves)]
    if not trained:
        return False
    metrics = sorted({k for o in trained for k in o.curves if k.startswith("val/") and k != "val/loss"})
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for o in trained:
            if metric in o.curves:
                steps, values = zip(*o.curves[metric])
                ax.plot(steps, values, marker="o", markersize=3, label=f"{o.row.method}, {o.row.setting}")
                if o.row.published and o.row.published.metric == f"test/{metric[4:]}":
                    ax.axhline(o.row.published.value, color=ax.lines[-1].get_color(), linestyle=":", linewidth=1)
        ax.set_title(f"validation {metric[4:]} (dotted: published test figure)")
        ax.set_xlabel("meta-training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>metalstm: reproducing {title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f0f0f0; }} tr.miss td {{ background: #fff3f0; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
</style></head>
<body>
<h1>Reproducing: {title}</h1>
<p>{summary}</p>
{table}
{images}
{probe}
</body></html>
"""


def write_reproduction_report(table: Table, out: Path) -> dict[str, Path]:
    """report.md, report.csv-like report.json, validation.png and report.html in ``out``."""
    found = outcomes(table, out)
    rows = report_rows(table, found)
    out.mkdir(parents=True, exist_ok=True)
    notes = "\n".join(f"- `{r['row']}` ({r['method']}, {r['setting']}): {r['protocol'].rstrip('.')}. Published: "
                      f"{r['source'] or 'none'}. Command: `{r['command'] or '-'}`; commit {r['commit'] or '-'}; "
                      f"{r['test tasks'] or '-'} test tasks." for r in rows)
    regenerate = f"python scripts/reproduce.py {table.source or table.name} --report-only"
    (out / "report.md").write_text(f"{markdown_table(rows, SUMMARY_COLUMNS)}\n{notes}\n\nRegenerate: `{regenerate}`\n")
    write_json(out / "report.json", rows)
    written = {"md": out / "report.md", "json": out / "report.json"}
    images = ""
    if plot_validation(found, out / "validation.png"):
        written["png"] = out / "validation.png"
        images = embedded_png(out / "validation.png", "Validation curves", "validation curves")
    columns = [*SUMMARY_COLUMNS, "source", "test tasks", "commit", "protocol", "command"]
    table_html = html_table(rows, lambda r: "row miss" if r["intervals overlap"] == "no" else "row", columns)
    done = sum(r["status"] == "done" for r in rows)
    summary = (f"{len(rows)} rows, {done} done. Ours: mean ± 95% confidence interval over the test tasks; a row is "
               f"shaded where its interval and the published one do not overlap. Regenerate: "
               f"<code>{html.escape(regenerate)}</code>")
    page = PAGE.format(title=html.escape(table.title), summary=summary, table=table_html, images=images,
                       probe=render_probe("tr.row"))
    (out / "report.html").write_text(page)
    written["html"] = out / "report.html"
    return written


def update_readme(readme: Path, table: Table, out: Path) -> None:
    """Replace the block between ``<!-- reproduce:<table> -->`` and ``<!-- /reproduce:<table> -->`` in ``readme``
    with the report's summary table and the command that regenerates it."""
    start, end = f"<!-- reproduce:{table.name} -->", f"<!-- /reproduce:{table.name} -->"
    text = readme.read_text()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ConfigError(f"--readme {readme}: it needs one '{start}' line and one '{end}' line after it, around "
                          f"the place where the table goes.")
    rows = report_rows(table, outcomes(table, out))
    command = f"python scripts/reproduce.py {table.source or table.name} --report-only --readme {readme.as_posix()}"
    block = f"{start}\n{markdown_table(rows, SUMMARY_COLUMNS)}\nGenerated by `{command}` from {len(rows)} rows.\n{end}"
    with atomic_write(readme) as f:
        f.write(text[: text.index(start)] + block + text[text.index(end) + len(end):])

"""The pipeline report card, read back from what the stages leave on disk.

Like upstream nanochat's report.md, but it can be rebuilt at any time (also while a stage still runs):

    python -m nanochat.report                                   # $NANOCHAT_BASE_DIR/runs -> runs/report/report.md
    python -m nanochat.report --runs-dir /data/runs --gpu-hourly-cost 2.5
    # bf16 vs the P100-emulated pipeline: one card per root plus a comparison
    python -m nanochat.report --runs-dir bf16=/a/runs --runs-dir p100=/b/runs --out /tmp/compare
    # a tiny CPU run: any runs root works, e.g. the one the CPU-sized base_train wrote
    python -m nanochat.report --runs-dir ~/.cache/nanochat/runs --no-mlflow
    # on a Ray cluster (the runs root on shared storage)
    ray job submit --working-dir . -- python -m nanochat.report --runs-dir /shared/runs

What it reads (anything may be missing; a stage not run yet is reported as missing):

    <root>/base_d<depth>/summary.json, metrics.jsonl, base_eval.json
    <root>/{mid,sft,rl}_d<depth>/summary.json, metrics.jsonl, chat_eval.json
    <root>/speedrun.json    a speedrun's budget and each stage's planned and actual seconds (ray_jobs/speedrun.py)

What it writes, into --out (default <root>/report): report.md, loss_<stage>.png, eval.png; when
comparing, report.md is the comparison and each root's card sits in <out>/<label>/. The same files
and the headline numbers go to an MLflow run named "report".
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nanochat.config import option, parse_config
from nanochat.runlog import plot_bars, plot_curves

# -----------------------------------------------------------------------------
# Collecting a runs root
STAGES = ("base", "mid", "sft", "rl")  # pipeline order
EVAL_FILE = {"base": "base_eval.json", "mid": "chat_eval.json", "sft": "chat_eval.json", "rl": "chat_eval.json"}
CURVE_KEYS = ("loss", "val_bpb", "val_loss", "reward")  # per-step keys worth a panel, when recorded
TASK_ORDER = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")  # upstream's order
_FOLDER = re.compile(r"^(base|mid|sft|rl)_d(\d+)$")
SPEEDRUN_FILE = "speedrun.json"


@dataclass
class StageRun:
    """What one stage left on disk; empty dicts/lists where a file is absent."""

    stage: str
    folder: Path
    summary: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)  # base_eval.json or chat_eval.json

    def plans(self) -> dict[str, dict]:
        """{"train": plan, "eval": plan}: training and evaluation may run on different GPUs."""
        found = {"train": self.summary.get("plan"), "eval": self.evaluation.get("plan")}
        return {k: v for k, v in found.items() if isinstance(v, dict)}

    def wall_time_s(self) -> float | None:
        """Training plus evaluation; None when neither recorded one."""
        times = [d.get("wall_time_s") for d in (self.summary, self.evaluation)]
        times = [t for t in times if _number(t) is not None]
        return sum(times) if times else None

    def gpu_hours(self) -> float | None:
        """Wall time times the GPUs used (an optional "world_size" key; 1 when absent)."""
        parts = [(d.get("wall_time_s"), d.get("world_size") or 1) for d in (self.summary, self.evaluation)]
        parts = [(t, n) for t, n in parts if _number(t) is not None and _number(n) is not None]
        return sum(t * n for t, n in parts) / 3600 if parts else None


@dataclass
class Pipeline:
    """One runs root at one depth: the stages found, those missing (stage -> why), and notes."""

    root: Path
    label: str
    depth: int | None
    stages: dict[str, StageRun]
    missing: dict[str, str]
    notes: list[str]
    host: dict[str, str]
    created: str
    speedrun: dict = field(default_factory=dict)  # speedrun.json: {"budget_s", "stages": {stage: {"planned_s", "seconds"}}}


def collect(root: str | Path, label: str | None = None, depth: int | None = None) -> Pipeline:
    """Read a runs root. Without `depth`, the most recently written depth is reported (a root can
    hold a tiny test pipeline next to the real one); the others are named in the notes."""
    root = Path(root)
    found = _stage_folders(root)
    notes: list[str] = []
    if not root.is_dir():
        notes.append(f"runs root {root} does not exist")
    if depth is None and found:
        depth = max(found, key=lambda d: max(f.stat().st_mtime for f in found[d].values()))
        if len(found) > 1:
            notes.append(f"depths {sorted(found)} found; reporting d{depth} (pass --depth for another)")
    folders = found.get(depth, {})
    stages = {name: _load_stage(name, folders[name], notes) for name in STAGES if name in folders}
    missing = {name: f"no {name}_d{depth if depth is not None else '<depth>'} folder in {root}"
               for name in STAGES if name not in folders}
    return Pipeline(root, label or default_label(root), depth, stages, missing, notes, host_info(), _now(),
                    _read_json(root / SPEEDRUN_FILE, notes))


def _stage_folders(root: Path) -> dict[int, dict[str, Path]]:
    """{depth: {stage: folder}} for the `<stage>_d<depth>` folders under root."""
    found: dict[int, dict[str, Path]] = {}
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        match = _FOLDER.match(path.name)
        if match and path.is_dir():
            found.setdefault(int(match.group(2)), {})[match.group(1)] = path
    return found


def _load_stage(stage: str, folder: Path, notes: list[str]) -> StageRun:
    run = StageRun(stage, folder, _read_json(folder / "summary.json", notes),
                   _read_records(folder / "metrics.jsonl", notes), _read_json(folder / EVAL_FILE[stage], notes))
    if not run.summary:
        notes.append(f"{stage}: no summary.json in {folder} (still running, or it stopped early)")
    return run


def _read_json(path: Path, notes: list[str]) -> dict:
    """A stage's JSON file, or {} when absent or unreadable (a half-written file must not stop the report)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        notes.append(f"could not read {path}: {e}")
        return {}
    return data if isinstance(data, dict) else {}


def _read_records(path: Path, notes: list[str]) -> list[dict]:
    """Like runlog.read_metrics, but skips lines it cannot parse: a running stage may be mid-write."""
    if not path.exists():
        return []
    records, bad = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            record, bad = None, bad + 1
        if isinstance(record, dict) and _number(record.get("step")) is not None:
            records.append(record)
    if bad:
        notes.append(f"{path}: skipped {bad} unreadable line(s)")
    return records


def host_info() -> dict[str, str]:
    """The machine building the report (the plans tell what trained; this tells what read it back)."""
    import torch

    return {
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "CUDA (torch build)": torch.version.cuda or "none",
        "CPUs": str(os.cpu_count()),
        "Platform": platform.platform(),
    }


def default_label(root: Path) -> str:
    """/a/bf16/runs -> "bf16": a runs root is usually called runs, so its parent names it."""
    root = Path(root).resolve()
    return (root.parent.name if root.name == "runs" else root.name) or "runs"


def _now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


# -----------------------------------------------------------------------------
# Numbers: what a pipeline's headline metrics are, and how they are printed
def _number(value) -> float | None:
    """Numbers only: None, text and booleans from a hand-edited or older JSON file print as '-'."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def fmt(value, kind: str = "float") -> str:
    """How every number in the report is printed; `kind` names the unit."""
    x = _number(value)
    if x is None:
        return "-"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    formats = {
        "float": lambda: f"{x:.4f}",
        "int": lambda: f"{x:,.0f}",
        "rate": lambda: f"{x:,.0f}",
        "pct": lambda: f"{100 * x:.1f}%",
        "gib": lambda: f"{x:.2f} GiB",
        "params": lambda: f"{x / 1e6:.1f}M",
        "scale": lambda: f"{x:g}",
        "duration": lambda: _duration(x),
        "hours": lambda: f"{x:.2f}",
        "usd": lambda: f"${x:,.2f}",
    }
    return formats[kind]()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class Row:
    """One metric across stages: `key` names it in MLflow and comparisons, `title` in tables."""

    key: str
    title: str
    kind: str
    values: dict[str, float | None]  # stage -> value


# (summary key, column title, kind): the per-stage training table
TRAINING_COLUMNS = (
    ("steps", "Steps", "int"), ("params", "Params", "params"), ("final_loss", "Final loss", "float"),
    ("val_bpb", "Val bpb", "float"), ("val_loss", "Val loss", "float"), ("tok_per_s", "Tok/s", "rate"),
    ("mfu", "MFU", "pct"), ("peak_memory_gib", "Peak mem", "gib"), ("skipped_steps", "Skipped fp16 steps", "int"),
    ("loss_scale", "Loss scale", "scale"), ("wall_time_s", "Wall time", "duration"),
)
# the training numbers that also go into the summary and comparison tables
TRAINING_ROWS = (
    ("val_bpb", "Val bpb", "float"), ("val_loss", "Val loss", "float"), ("final_loss", "Final train loss", "float"),
    ("tok_per_s", "Tok/s", "rate"), ("mfu", "MFU", "pct"), ("skipped_steps", "Skipped fp16 steps", "int"),
)
_NOT_EXTRA = {key for key, _, _ in TRAINING_COLUMNS} | {"stage", "plan", "world_size"}
_RL_HEADLINE = re.compile(r"reward|pass_at|pass@")


def eval_rows(p: Pipeline) -> list[Row]:
    """CORE (base), each chat task's accuracy, ChatCORE: upstream's summary rows, where present."""
    chat = {s: run.evaluation for s, run in p.stages.items() if s != "base"}
    rows = [Row("core", "CORE", "float", {s: run.evaluation.get("core") for s, run in p.stages.items() if s == "base"})]
    for task in task_names(chat.values()):
        rows.append(Row(task, task, "float", {s: _task(ev, task).get("accuracy") for s, ev in chat.items()}))
    rows.append(Row("chatcore", "ChatCORE", "float", {s: ev.get("chatcore") for s, ev in chat.items()}))
    return [r for r in rows if any(_number(v) is not None for v in r.values.values())]


def training_rows(p: Pipeline) -> list[Row]:
    """Validation and throughput numbers, RL's reward/pass@k, and each stage's wall time."""
    rows = [Row(key, title, kind, {s: run.summary.get(key) for s, run in p.stages.items()})
            for key, title, kind in TRAINING_ROWS]
    rl_keys = sorted({k for run in p.stages.values() for k in run.summary if _RL_HEADLINE.search(k)})
    rows += [Row(k, k, "float", {s: run.summary.get(k) for s, run in p.stages.items()}) for k in rl_keys]
    rows.append(Row("wall_time_s", "Wall time (train + eval)", "duration",
                    {s: run.wall_time_s() for s, run in p.stages.items()}))
    return [r for r in rows if any(_number(v) is not None for v in r.values.values())]


def summary_rows(p: Pipeline) -> list[Row]:
    return eval_rows(p) + training_rows(p)


def task_names(evaluations) -> list[str]:
    """The union of task names, upstream's tasks first in upstream's order, then the rest sorted."""
    names = {name for ev in evaluations for name in (ev.get("tasks") or {})}
    rank = {_canon(t): i for i, t in enumerate(TASK_ORDER)}
    return sorted(names, key=lambda n: (rank.get(_canon(n), len(rank)), n))


def _canon(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _task(evaluation: dict, name: str) -> dict:
    task = (evaluation.get("tasks") or {}).get(name)
    return task if isinstance(task, dict) else {}


def totals(p: Pipeline, gpu_hourly_cost: float | None) -> dict:
    """Wall time and GPU-hours over all stages, the cost, and which stages recorded no time."""
    times = {s: run.wall_time_s() for s, run in p.stages.items()}
    timed = [t for t in times.values() if t is not None]
    hours = [h for h in (run.gpu_hours() for run in p.stages.values()) if h is not None]
    gpu_hours = sum(hours) if hours else None
    return {
        "wall_time_s": sum(timed) if timed else None,
        "gpu_hours": gpu_hours,
        "cost_usd": gpu_hours * gpu_hourly_cost if gpu_hours is not None and gpu_hourly_cost is not None else None,
        "untimed": [s for s, t in times.items() if t is None],
    }


def cost_line(t: dict, gpu_hourly_cost: float | None) -> str:
    if gpu_hourly_cost is None:
        return "Cost: not given (pass --gpu-hourly-cost USD per GPU-hour)"
    if t["cost_usd"] is None:
        return "Cost: unknown (no stage recorded its wall time)"
    return f"Cost: {fmt(t['cost_usd'], 'usd')} ({fmt(t['gpu_hours'], 'hours')} GPU-hours x ${gpu_hourly_cost:g}/GPU-hour)"


def plan_brief(plan: dict | None) -> str:
    """One line per plan for comparison tables: GPU, capability, dtype, scaler, emulation."""
    if not plan:
        return "-"
    cap = f" (sm {plan['capability']})" if plan.get("capability") else ""
    scaler = " + GradScaler" if plan.get("grad_scaler") else ""
    emulating = f", emulating {plan['emulating']}" if plan.get("emulating") else ""
    return f"{plan.get('name', '?')}{cap} {plan.get('dtype', '?')}{scaler}{emulating}"


# -----------------------------------------------------------------------------
# Markdown
def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _image(title: str, name: str | None) -> list[str]:
    return [f"![{title}]({name})", ""] if name else []


def _on_off(value) -> str:
    return "-" if value is None else "on" if value else "off"


def render_card(p: Pipeline, gpu_hourly_cost: float | None = None, images: dict[str, str] | None = None) -> str:
    """The whole card as markdown; `images` maps "loss_<stage>"/"eval" to PNG paths relative to it."""
    images = images or {}
    sections = [_header(p), _hardware(p), _training(p, images), _evaluation(p, images),
                _summary(p, gpu_hourly_cost), _time_budget(p.speedrun), _notes(p)]
    return "\n".join(line for section in sections for line in section).rstrip() + "\n"


def _header(p: Pipeline) -> list[str]:
    status = [f"{s} ok" if s in p.stages else f"{s} missing" for s in STAGES]
    return [
        f"# nanochat report card: {p.label}", "",
        f"Generated {p.created} from `{p.root}`" + (f" (depth {p.depth})" if p.depth is not None else ""), "",
        "Stages: " + ", ".join(status), "",
        *[f"- {s}: missing ({why})" for s, why in p.missing.items()], "",
    ]


def _hardware(p: Pipeline) -> list[str]:
    rows, reasons = [], []
    for stage, run in p.stages.items():
        for part, plan in run.plans().items():
            name = stage if part == "train" else f"{stage} eval"
            rows.append([name, plan.get("name", "-"), plan.get("capability") or "-", plan.get("dtype", "-"),
                         _on_off(plan.get("grad_scaler")), _on_off(plan.get("compile")),
                         plan.get("attention", "-"), plan.get("emulating") or "-"])
            if plan.get("reason"):
                reasons.append(f"- {name}: {plan['reason']}")
    header = ["Stage", "GPU", "Capability", "dtype", "GradScaler", "compile", "Attention", "Emulating"]
    plans = [md_table(header, rows), "", *reasons] if rows else ["No precision plan recorded."]
    host = [f"- {k}: {v}" for k, v in p.host.items()]
    return ["## Hardware and software", "", "Precision plan of each stage:", "", *plans, "",
            "Host that built this report:", "", *host, ""]


def _training(p: Pipeline, images: dict[str, str]) -> list[str]:
    if not p.stages:
        return ["## Training", "", "No stages found.", ""]
    rows = [[s, *(fmt(run.summary.get(k), kind) for k, _, kind in TRAINING_COLUMNS)] for s, run in p.stages.items()]
    lines = ["## Training", "", md_table(["Stage", *(t for _, t, _ in TRAINING_COLUMNS)], rows), ""]
    extras = [f"- {s} also recorded: " + ", ".join(f"{k} {fmt(v)}" for k, v in extra.items())
              for s, extra in ((s, _extra_numbers(run.summary)) for s, run in p.stages.items()) if extra]
    lines += [*extras, ""] if extras else []
    for s in p.stages:
        lines += _image(f"{s} loss", images.get(f"loss_{s}"))
    return lines


def _extra_numbers(summary: dict) -> dict[str, float]:
    """Numbers a stage recorded beyond the table's columns (RL rewards, data wait, ...): shown, not lost."""
    return {k: v for k, v in summary.items() if k not in _NOT_EXTRA and _number(v) is not None}


def _evaluation(p: Pipeline, images: dict[str, str]) -> list[str]:
    lines = ["## Evaluation", ""]
    base = p.stages.get("base")
    if base and base.evaluation:
        tasks = [[t, fmt(_task(base.evaluation, t).get("accuracy")), fmt(_task(base.evaluation, t).get("centered")),
                  fmt(_task(base.evaluation, t).get("n"), "int")] for t in task_names([base.evaluation])]
        lines += ["### CORE (base)", "", md_table(["Task", "Accuracy", "Centered", "N"], tasks), "",
                  f"CORE: {fmt(base.evaluation.get('core'))}", ""]
    for s, run in p.stages.items():
        if s == "base" or not run.evaluation:
            continue
        tasks = [[t, fmt(_task(run.evaluation, t).get("accuracy")), fmt(_task(run.evaluation, t).get("n"), "int")]
                 for t in task_names([run.evaluation])]
        lines += [f"### Chat evaluation ({s})", "", md_table(["Task", "Accuracy", "N"], tasks), "",
                  f"ChatCORE: {fmt(run.evaluation.get('chatcore'))}", ""]
    not_evaluated = [s for s, run in p.stages.items() if not run.evaluation]
    if not_evaluated:
        lines += [f"Not evaluated: {', '.join(not_evaluated)}.", ""]
    return lines + _image("evaluation", images.get("eval"))


def _summary(p: Pipeline, gpu_hourly_cost: float | None) -> list[str]:
    stages = list(p.stages)
    rows = [[r.title, *(fmt(r.values.get(s), r.kind) for s in stages)] for r in summary_rows(p)]
    t = totals(p, gpu_hourly_cost)
    untimed = f" ({', '.join(t['untimed'])} recorded no wall time)" if t["untimed"] else ""
    table = [md_table(["Metric", *(s.upper() for s in stages)], rows), ""] if rows else ["No metrics recorded.", ""]
    return ["## Summary", "", *table, f"Total wall time: {fmt(t['wall_time_s'], 'duration')}{untimed}", "",
            cost_line(t, gpu_hourly_cost), ""]


def _signed(seconds: float) -> str:
    return ("-" if round(seconds) < 0 else "+") + _duration(abs(seconds))


def _time_budget(speedrun: dict) -> list[str]:
    """A speedrun's planned against actual seconds, per stage and in all, and the overrun if any. The card
    is written by the last stage, so that stage's own time is not in it (its plan is)."""
    budget, stages = _number(speedrun.get("budget_s")), speedrun.get("stages")
    if budget is None or not isinstance(stages, dict):
        return []
    rows, spent = [], 0.0
    for stage, entry in stages.items():
        planned, actual = _number(entry.get("planned_s")), _number(entry.get("seconds"))
        spent += actual or 0.0
        over = _signed(actual - planned) if actual is not None and planned is not None else "-"
        rows.append([stage, fmt(planned, "duration"), fmt(actual, "duration") if actual is not None else "running", over])
    unfinished = [stage for stage, entry in stages.items() if _number(entry.get("seconds")) is None]
    pending = f" ({', '.join(unfinished)} still running as this card was written)" if unfinished else ""
    verdict = (f"over the budget by {_duration(spent - budget)} ({(spent - budget) / budget:.0%})" if spent > budget
               else f"within the budget, {_duration(budget - spent)} left")
    rows.append(["total", fmt(budget, "duration"), fmt(spent, "duration"), _signed(spent - budget)])
    return ["## Time budget", "", md_table(["Stage", "Planned", "Actual", "Over"], rows), "",
            f"Speedrun: {_duration(spent)} of {_duration(budget)}{pending}: {verdict}.", ""]


def _notes(p: Pipeline) -> list[str]:
    return ["## Notes", "", *[f"- {n}" for n in p.notes], ""] if p.notes else []


# -----------------------------------------------------------------------------
# Plots and files
def curve_keys(records: list[dict]) -> list[str]:
    return [k for k in CURVE_KEYS if any(_number(r.get(k)) is not None for r in records)]


def write_card_plots(p: Pipeline, out_dir: Path) -> dict[str, str]:
    """loss_<stage>.png per stage with a metrics log, eval.png when anything was evaluated."""
    images = {}
    for s, run in p.stages.items():
        if keys := curve_keys(run.metrics):
            images[f"loss_{s}"] = plot_curves({s: run.metrics}, out_dir / f"loss_{s}.png", keys).name
    groups = {r.title: {s: v for s, v in r.values.items() if _number(v) is not None} for r in eval_rows(p)}
    if groups:
        images["eval"] = plot_bars(groups, out_dir / "eval.png", "accuracy / score").name
    return images


def write_card(p: Pipeline, out_dir: str | Path, gpu_hourly_cost: float | None = None) -> list[Path]:
    """report.md and its PNGs in out_dir; returns the files written, report.md first."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = write_card_plots(p, out_dir)
    md = out_dir / "report.md"
    md.write_text(render_card(p, gpu_hourly_cost, images))
    return [md, *(out_dir / name for name in images.values())]


def comparison_rows(pipelines: Sequence[Pipeline], stage: str) -> list[Row]:
    """One stage's metrics (rows) across pipelines (values keyed by label), rows in first-seen order."""
    rows: dict[str, Row] = {}  # a metric no pipeline recorded for this stage gets no row
    for p in pipelines:
        for r in summary_rows(p):
            if _number(r.values.get(stage)) is not None:
                rows.setdefault(r.key, Row(r.key, r.title, r.kind, {})).values[p.label] = r.values[stage]
    return list(rows.values())


def render_comparison(pipelines: Sequence[Pipeline], gpu_hourly_cost: float | None,
                      images: dict[str, str], cards: dict[str, str]) -> str:
    """Metric rows x label columns per stage, the loss curves overlaid, totals side by side."""
    labels = [p.label for p in pipelines]
    lines = [f"# nanochat pipeline comparison: {' vs '.join(labels)}", "", f"Generated {pipelines[0].created}", "",
             "Cards: " + ", ".join(f"[{label}]({path})" for label, path in cards.items()), "",
             md_table(["", *labels], [["Runs root", *(f"`{p.root}`" for p in pipelines)]]), ""]
    for stage in STAGES:
        if not any(stage in p.stages for p in pipelines):
            continue
        plan_row = ["Plan", *(plan_brief(p.stages[stage].plans().get("train")) if stage in p.stages else "missing"
                              for p in pipelines)]
        rows = [[r.title, *(fmt(r.values.get(p.label), r.kind) if stage in p.stages else "missing"
                            for p in pipelines)] for r in comparison_rows(pipelines, stage)]
        lines += [f"## {stage}", "", md_table(["Metric", *labels], [plan_row, *rows]), "",
                  *_image(f"{stage} loss", images.get(f"loss_{stage}"))]
    t = [totals(p, gpu_hourly_cost) for p in pipelines]
    rows = [["Wall time", *(fmt(x["wall_time_s"], "duration") for x in t)],
            ["GPU-hours", *(fmt(x["gpu_hours"], "hours") for x in t)],
            ["Cost", *(fmt(x["cost_usd"], "usd") if gpu_hourly_cost is not None else "not given" for x in t)]]
    return "\n".join([*lines, "## Totals", "", md_table(["", *labels], rows), ""])


def write_comparison(pipelines: Sequence[Pipeline], out_dir: str | Path,
                     gpu_hourly_cost: float | None = None) -> list[Path]:
    """A card per pipeline in out_dir/<label>/, the comparison as out_dir/report.md; returns all files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, cards, images = [], {}, {}
    for p in pipelines:
        folder = _safe(p.label)
        files += write_card(p, out_dir / folder, gpu_hourly_cost)
        cards[p.label] = f"{folder}/report.md"
    for stage in STAGES:
        runs = {p.label: p.stages[stage].metrics for p in pipelines if stage in p.stages and p.stages[stage].metrics}
        if keys := curve_keys([r for records in runs.values() for r in records]):
            images[f"loss_{stage}"] = plot_curves(runs, out_dir / f"compare_{stage}_loss.png", keys).name
    md = out_dir / "report.md"
    md.write_text(render_comparison(pipelines, gpu_hourly_cost, images, cards))
    return [md, *(out_dir / name for name in images.values()), *files]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "run"


# -----------------------------------------------------------------------------
# MLflow
def headline_metrics(pipelines: Sequence[Pipeline], gpu_hourly_cost: float | None) -> dict[str, float]:
    """"<stage>.<metric>" and "total.<...>" for one pipeline; prefixed "<label>." when comparing."""
    metrics = {}
    for p in pipelines:
        prefix = f"{p.label}." if len(pipelines) > 1 else ""
        for r in summary_rows(p):
            for stage, value in r.values.items():
                if _number(value) is not None:
                    metrics[_metric_name(f"{prefix}{stage}.{r.key}")] = float(value)
        t = totals(p, gpu_hourly_cost)
        for key in ("wall_time_s", "gpu_hours", "cost_usd"):
            if t[key] is not None:
                metrics[_metric_name(f"{prefix}total.{key}")] = float(t[key])
    return metrics


def _metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)  # the characters MLflow accepts in a metric key


def log_to_mlflow(pipelines: Sequence[Pipeline], files: Sequence[Path], out_dir: Path, uri: str,
                  experiment: str = "nanochat", gpu_hourly_cost: float | None = None) -> str:
    """A run named "report": the markdown and PNGs as artifacts (folders kept), headline numbers as
    metrics at step 0. Returns the run id."""
    from nanochat.tracking import Tracker  # imports mlflow: only when the report goes to MLflow

    params = {"runs": {p.label: str(p.root) for p in pipelines}, "depth": {p.label: p.depth for p in pipelines},
              "gpu_hourly_cost": gpu_hourly_cost}
    tracker = Tracker.create(uri, experiment, "report", params)
    try:
        for path in files:
            folder = path.parent.relative_to(out_dir).as_posix()
            tracker.log_artifact(path, None if folder == "." else folder)
        tracker.log({"step": 0, **headline_metrics(pipelines, gpu_hourly_cost)})
    except Exception:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return tracker.run_id


# -----------------------------------------------------------------------------
# CLI
def parse_runs_dir(spec: str) -> tuple[str | None, Path]:
    """"LABEL=DIR" or "DIR" (the label is then derived from the path)."""
    label, sep, path = spec.partition("=")
    if sep and label and "/" not in label and os.sep not in label:
        return label, Path(path).expanduser()
    return None, Path(spec).expanduser()


@dataclass
class ReportConfig:
    runs_dir: list[str] = option([], "a runs root (repeat with labels to compare); default $NANOCHAT_BASE_DIR/runs",
                                 metavar="[LABEL=]DIR")
    out: str = option("", "where report.md and the PNGs go; empty = <first runs root>/report")
    depth: int | None = option(None, "which <stage>_d<depth> folders; None = the latest written")
    gpu_hourly_cost: float | None = option(None, "USD per GPU-hour, for the cost line")
    mlflow_uri: str = option("", "MLflow tracking URI; empty = sqlite:///<first runs root>/mlflow.db")
    mlflow: bool = option(True, "log the report to MLflow (--no-mlflow: write the files only)")
    mlflow_experiment: str = option("nanochat", "MLflow experiment of the report run")


def main(argv: list[str] | None = None) -> Path:
    args = parse_config(ReportConfig, argv, description=__doc__.splitlines()[0])
    if args.mlflow_uri and not args.mlflow:
        raise SystemExit("report: --mlflow-uri and --no-mlflow exclude each other")
    from nanochat.common import base_dir  # imports torch: only the CLI needs it

    specs = [parse_runs_dir(s) for s in args.runs_dir] or [(None, base_dir() / "runs")]
    pipelines = [collect(root, label, args.depth) for label, root in specs]
    _unique_labels(pipelines)
    out_dir = Path(args.out) if args.out else specs[0][1] / "report"
    if len(pipelines) == 1:
        files = write_card(pipelines[0], out_dir, args.gpu_hourly_cost)
    else:
        files = write_comparison(pipelines, out_dir, args.gpu_hourly_cost)
    print(f"report: {files[0]}")
    if args.mlflow:
        from nanochat.tracking import default_uri

        uri = args.mlflow_uri or default_uri(specs[0][1])
        run_id = log_to_mlflow(pipelines, files, Path(out_dir), uri, args.mlflow_experiment, args.gpu_hourly_cost)
        print(f"MLflow run {run_id} in {uri}")
    return files[0]


def _unique_labels(pipelines: Sequence[Pipeline]) -> None:
    """Two roots that derive the same label (e.g. two .../runs of same-named parents) get -2, -3."""
    seen: dict[str, int] = {}
    for p in pipelines:
        seen[p.label] = seen.get(p.label, 0) + 1
        if seen[p.label] > 1:
            p.label = f"{p.label}-{seen[p.label]}"


if __name__ == "__main__":
    main()

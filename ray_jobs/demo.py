"""The tiny end-to-end demo through the Ray layer, on CPU: shards from the embedded corpus -> BPE
tokenizer -> a local Ray cluster -> Ray Data streaming the shards into a TorchTrainer -> MLflow
tracking -> evaluation and samples -> a short SFT on Ray -> one chat answer. A few minutes on a laptop.

    python -m ray_jobs.demo                    # writes under $NANOCHAT_BASE_DIR/demo
    python -m ray_jobs.demo --num-workers 2    # two data-parallel workers (gloo)

(`python -m nanochat.scripts.demo` is the same demo without Ray.)
"""

from __future__ import annotations

from dataclasses import dataclass

from nanochat.config import option, parse_config
from nanochat.scripts import demo
from ray_jobs import train


@dataclass
class RayDemoConfig(demo.DemoConfig):
    num_workers: int = option(1, "data-parallel training workers (gloo)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_config(RayDemoConfig, argv, description=__doc__.splitlines()[0])
    out, data, tok = demo.prepare(args)
    storage = out / "ray_results"
    summary = demo.stage("base training on Ray", "ray_jobs.train", train.main, [
        *demo.train_args(args, data, tok), "--num-workers", str(args.num_workers),
        "--storage-path", str(storage), "--name", "demo",
        "--total-batch-size", str(1024 * args.num_workers),
    ])
    evaluation = demo.evaluate(data, tok, storage / "demo")
    sft = demo.stage("chat fine-tuning (SFT) on Ray", "ray_jobs.train", train.main, [
        "--stage", "sft", *demo.sft_args(args, tok, storage / "demo", out / "sft"), "--num-workers", str(args.num_workers),
        "--storage-path", str(storage), "--name", "demo_sft",
    ])
    answer = demo.chat(tok, storage / "demo_sft")
    print(f"\ndemo finished: val bpb {evaluation['val_bpb']:.3f}, final train loss {summary['final_loss']:.3f}, "
          f"SFT val loss {sft['val_loss']:.3f}\n{demo.DEMO_QUESTION!r} -> {answer!r}\n"
          f"files in {out}; the runs in MLflow: mlflow ui --backend-store-uri {summary['mlflow_uri']}")
    return {"train": summary, "eval": evaluation, "sft": sft, "answer": answer}


if __name__ == "__main__":
    main()

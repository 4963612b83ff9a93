"""Train a site's own disc classifier with the paper's recipe, fold by fold, and export the chosen
weights for the agent.

    python model/tools/labelme_to_yolo.py EXPORT... --out DATASET --folds 5
    YOLO_OFFLINE=1 python model/tools/train.py DATASET model/site-yolov8n-seg.safetensors

The paper's settings are the defaults: YOLOv8-seg at 512 px, 150 epochs, batch 16, initial
learning rate 0.001, horizontal flip. Its optimiser is not stated: AdamW here, set explicitly,
since ultralytics' "auto" optimiser would ignore the learning rate. Each fold of the dataset
(folds grouped by patient by the converter) trains a model from the same start and is validated
on its held-out patients; the fold with the best mask mAP50 is exported, float16, with the recipe,
the dataset's SHA-256 and size, and every fold's metrics in the safetensors metadata, so that the
weights say how they were made. `idaics evaluate` then scores them on series no fold has seen.

Requirements: model/tools/requirements.txt (ultralytics and torch; CPU works, CUDA when present).
"""
import argparse
import csv
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# Metrics kept per fold, as ultralytics names them.
FOLD_METRICS = [
    "metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)",
    "metrics/precision(M)", "metrics/recall(M)", "metrics/mAP50(M)", "metrics/mAP50-95(M)",
]


def dataset_digest(root: str):
    """SHA-256 over every image and label file of the dataset (names and bytes, sorted), and the
    number of images: the weights' metadata names exactly what they were trained on."""
    digest = hashlib.sha256()
    images = 0
    for sub in ("images", "labels"):
        folder = os.path.join(root, sub)
        for name in sorted(os.listdir(folder)):
            digest.update(f"{sub}/{name}\0".encode())
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(f.read())
            images += sub == "images"
    return digest.hexdigest(), images


def folds_of(root: str):
    with open(os.path.join(root, "cases.csv"), newline="") as f:
        return sorted({int(row["fold"]) for row in csv.DictReader(f)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="the output of labelme_to_yolo.py")
    parser.add_argument("output", help="safetensors file to write")
    parser.add_argument("--model", default="yolov8n-seg.yaml",
                        help="a YOLOv8-seg yaml (from scratch) or .pt (fine-tuned); offline: a yaml or a local .pt")
    parser.add_argument("--imgsz", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr0", type=float, default=0.001)
    parser.add_argument("--fliplr", type=float, default=0.5)
    parser.add_argument("--optimizer", default="AdamW")
    parser.add_argument("--folds", type=int, nargs="*", help="folds to train (default: all)")
    parser.add_argument("--device", default=None, help="cpu, 0, 0,1 ... (default: CUDA when present)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--project", default=None, help="where runs go (default: DATASET/runs)")
    args = parser.parse_args()

    import torch
    from ultralytics import YOLO

    from export_safetensors import export

    root = os.path.abspath(args.dataset)
    device = args.device or ("0" if torch.cuda.is_available() else "cpu")
    folds = args.folds if args.folds else folds_of(root)
    project = os.path.abspath(args.project or os.path.join(root, "runs"))
    recipe = {
        "model": args.model, "imgsz": args.imgsz, "epochs": args.epochs, "batch": args.batch, "lr0": args.lr0,
        "optimizer": args.optimizer, "fliplr": args.fliplr, "seed": args.seed,
    }
    results = {}
    for fold in folds:
        model = YOLO(args.model)
        metrics = model.train(
            data=os.path.join(root, f"fold_{fold}.yaml"), imgsz=args.imgsz, epochs=args.epochs, batch=args.batch,
            lr0=args.lr0, optimizer=args.optimizer, fliplr=args.fliplr, flipud=0.0, device=device,
            workers=args.workers, seed=args.seed, deterministic=True, project=project, name=f"fold_{fold}",
            exist_ok=True, plots=False, verbose=False, amp=device != "cpu",
        )
        kept = {k: round(float(v), 4) for k, v in (getattr(metrics, "results_dict", {}) or {}).items() if k in FOLD_METRICS}
        best = os.path.join(project, f"fold_{fold}", "weights", "best.pt")
        results[fold] = {"metrics": kept, "checkpoint": best}
        print(f"fold {fold}: {json.dumps(kept)}")
    chosen = max(results, key=lambda k: results[k]["metrics"].get("metrics/mAP50(M)", 0.0))
    digest, images = dataset_digest(root)
    extra = {
        "recipe": json.dumps(recipe, sort_keys=True),
        "dataset_sha256": digest,
        "dataset_images": str(images),
        "fold_metrics": json.dumps({str(k): v["metrics"] for k, v in results.items()}, sort_keys=True),
        "chosen_fold": str(chosen),
    }
    export(results[chosen]["checkpoint"], args.output, f16=True, imgsz=args.imgsz, extra=extra)
    print(f"chose fold {chosen}; {args.output}")


if __name__ == "__main__":
    main()

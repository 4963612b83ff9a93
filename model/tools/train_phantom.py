"""Train the phantom test model: YOLOv8n-seg on the agent's own slices of synthetic spines.

The images come from `examples/phantom_dataset.rs` (the agent's localisation and slicing of
phantom CT series, with label maps from the phantoms' ground truth). This script turns each label
map into one YOLO polygon per disc, labelled with the disc's condition, trains from scratch
offline, and exports float16 safetensors for the agent. The result is a test model: it has seen
only phantoms, and exists so that the pipeline's detections, masks and SEG come from a real
network. It is not a clinical model.

    cargo run --release --example phantom_dataset -- WORK/train 80 1000
    cargo run --release --example phantom_dataset -- WORK/val 12 5000
    YOLO_OFFLINE=1 python model/tools/train_phantom.py WORK model/phantom-yolov8n-seg.safetensors
"""
import argparse
import json
import os
import subprocess
import sys

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from train_shapes import write_data_yaml  # noqa: E402

# Class order of the weights; the agent maps names to its classes (findings::canonical_class).
CLASSES = ["normal", "schmorl", "bulge", "protrusion"]
# Fragments smaller than this (pixels of the 512x512 slice) are partial-volume slivers of a
# neighbouring disc at the edge of an axial image, not something to detect.
MIN_AREA = 40


def polygons(label_map: np.ndarray, classes: dict) -> list:
    """(class index, polygon normalised to [0, 1]) for each disc in a label map."""
    h, w = label_map.shape
    out = []
    for value, condition in classes.items():
        mask = (label_map == int(value)).astype(np.uint8)
        if mask.sum() < MIN_AREA:
            continue
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contour = max(contours, key=cv2.contourArea)
        if cv2.contourArea(contour) < MIN_AREA or len(contour) < 3:
            continue
        points = contour.reshape(-1, 2).astype(np.float64) / np.array([w, h])
        out.append((CLASSES.index(condition), np.clip(points, 0, 1)))
    return out


def convert(source: str, root: str, split: str) -> int:
    with open(os.path.join(source, "manifest.json")) as f:
        manifest = json.load(f)
    os.makedirs(f"{root}/images/{split}", exist_ok=True)
    os.makedirs(f"{root}/labels/{split}", exist_ok=True)
    instances = 0
    for entry in manifest["images"]:
        stem = os.path.splitext(entry["image"])[0]
        image = os.path.abspath(os.path.join(source, entry["image"]))
        link = f"{root}/images/{split}/{stem}.png"
        if not os.path.exists(link):
            os.symlink(image, link)
        label_map = cv2.imread(os.path.join(source, entry["labels"]), cv2.IMREAD_UNCHANGED)
        with open(f"{root}/labels/{split}/{stem}.txt", "w") as f:
            for class_index, poly in polygons(label_map, entry["classes"]):
                f.write(f"{class_index} " + " ".join(f"{v:.5f}" for v in poly.reshape(-1)) + "\n")
                instances += 1
    return instances


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", help="holds train/ and val/ from phantom_dataset")
    parser.add_argument("output", help="safetensors file to write")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--imgsz", type=int, default=320)
    args = parser.parse_args()
    work = os.path.abspath(args.workdir)
    root = os.path.join(work, "yolo")
    for split in ("train", "val"):
        print(split, convert(os.path.join(work, split), root, split), "instances")
    write_data_yaml(root, CLASSES)
    from ultralytics import YOLO

    model = YOLO("yolov8n-seg.yaml")
    # The agent's slices have fixed orientation and millimetres per pixel: no flips, little scaling.
    model.train(
        data=f"{root}/data.yaml", epochs=args.epochs, imgsz=args.imgsz, batch=16, workers=2, device="cpu",
        project=work, name="run", exist_ok=True, pretrained=False, amp=False, plots=False, seed=0,
        deterministic=True, verbose=False, fliplr=0.0, scale=0.15, translate=0.1, mosaic=1.0,
        close_mosaic=5, hsv_h=0.0, hsv_s=0.0, hsv_v=0.2,
    )
    best = os.path.join(work, "run", "weights", "best.pt")
    subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "export_safetensors.py"), best, args.output, "--f16",
         "--imgsz", str(args.imgsz)],
        check=True,
    )


if __name__ == "__main__":
    main()

"""Train a small YOLOv8n-seg on synthetic shapes: the test model for detector fidelity tests.

Four classes of filled shapes (disc, square, triangle, cross) on noisy gray backgrounds stand in
for the paper's four disc classes; the point is a network with real, confident detections and
masks, so that candle's full predict path (letterbox, NMS, masks, scaling back) can be compared
with ultralytics' on images of several sizes. Offline: YOLO_OFFLINE=1, no pretrained weights.

    python model/tools/train_shapes.py WORKDIR [--epochs 40]
"""
import argparse
import os

import cv2
import numpy as np

CLASSES = ["disc", "square", "triangle", "cross"]


def shape_polygon(kind: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    if kind == 0:
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == 1:
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.8
    elif kind == 2:
        t = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) - np.pi / 2
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    else:
        a, b = 1.0, 0.35
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (pts @ rot.T) * r + np.array([cx, cy])


def make_image(rng: np.random.Generator, h: int, w: int):
    img = np.full((h, w, 3), rng.integers(30, 90), np.uint8)
    img = np.clip(img.astype(np.int16) + rng.normal(0, 12, (h, w, 1)).astype(np.int16), 0, 255).astype(np.uint8)
    labels = []
    placed = []
    for _ in range(rng.integers(1, 5)):
        r = rng.uniform(0.08, 0.2) * min(h, w)
        for _attempt in range(20):
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            if all((cx - px) ** 2 + (cy - py) ** 2 > (r + pr) ** 2 for px, py, pr in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        kind = int(rng.integers(0, 4))
        poly = shape_polygon(kind, cx, cy, r, rng.uniform(0, np.pi))
        shade = int(rng.integers(150, 250))
        cv2.fillPoly(img, [np.round(poly).astype(np.int32)], (shade, shade, shade))
        norm = poly / np.array([w, h])
        labels.append((kind, np.clip(norm, 0, 1)))
    return img, labels


def write_split(root: str, split: str, n: int, rng: np.random.Generator) -> None:
    os.makedirs(f"{root}/images/{split}", exist_ok=True)
    os.makedirs(f"{root}/labels/{split}", exist_ok=True)
    for i in range(n):
        h, w = int(rng.integers(256, 400)), int(rng.integers(256, 400))
        img, labels = make_image(rng, h, w)
        cv2.imwrite(f"{root}/images/{split}/{i:04d}.png", img)
        with open(f"{root}/labels/{split}/{i:04d}.txt", "w") as f:
            for kind, poly in labels:
                f.write(f"{kind} " + " ".join(f"{v:.5f}" for v in poly.reshape(-1)) + "\n")


def write_data_yaml(root: str, classes: list) -> None:
    """The ultralytics dataset file for images/{train,val} and labels/{train,val} under root."""
    with open(f"{root}/data.yaml", "w") as f:
        f.write(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n")
        for i, name in enumerate(classes):
            f.write(f"  {i}: {name}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--imgsz", type=int, default=320)
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    root = os.path.abspath(os.path.join(args.workdir, "shapes"))
    write_split(root, "train", 300, rng)
    write_split(root, "val", 40, rng)
    write_data_yaml(root, CLASSES)
    from ultralytics import YOLO

    model = YOLO("yolov8n-seg.yaml")
    model.train(
        data=f"{root}/data.yaml", epochs=args.epochs, imgsz=args.imgsz, batch=16, workers=2, device="cpu",
        project=os.path.abspath(args.workdir), name="run", exist_ok=True, pretrained=False, amp=False,
        plots=False, seed=0, deterministic=True, verbose=False,
    )


if __name__ == "__main__":
    main()

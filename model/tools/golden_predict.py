"""Golden detections of the shapes test model, for tests/detector_predict.rs.

Exports the trained checkpoint to float16 safetensors (what the repository keeps), loads those
rounded weights back into ultralytics so both sides run the very same numbers, writes test images
of several sizes, and records ultralytics' predictions: class, confidence, box in original pixels
and mask area in original pixels (masks scaled back with ultralytics' own scale_masks).

    YOLO_OFFLINE=1 python model/tools/golden_predict.py RUN/weights/best.pt tests/fixtures/shapes
"""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import torch
from safetensors.torch import load_file
from ultralytics import YOLO
from ultralytics.utils import ops

sys.path.insert(0, os.path.dirname(__file__))
import train_shapes  # noqa: E402

IMGSZ = 320
CONF = 0.25
IOU = 0.7
SIZES = [(320, 320), (400, 260), (210, 333), (512, 384)]  # (width, height)


def main(checkpoint: str, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, "shapes-yolov8n-seg.safetensors")
    subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "export_safetensors.py"), checkpoint, weights, "--f16", "--imgsz", str(IMGSZ)],
        check=True,
    )
    yolo = YOLO(checkpoint)
    rounded = {k: v.float() for k, v in load_file(weights).items()}
    missing, unexpected = yolo.model.load_state_dict(rounded, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    yolo.model.float()
    rng = np.random.default_rng(2024)
    golden = {"imgsz": IMGSZ, "conf": CONF, "iou": IOU, "images": []}
    for i, (w, h) in enumerate(SIZES):
        img, _ = train_shapes.make_image(rng, h, w)
        name = f"shapes_{i}_{w}x{h}.png"
        cv2.imwrite(os.path.join(out_dir, name), img)
        result = yolo.predict(os.path.join(out_dir, name), imgsz=IMGSZ, conf=CONF, iou=IOU, device="cpu", verbose=False)[0]
        detections = []
        if result.masks is not None:
            masks = ops.scale_masks(result.masks.data[None].float(), result.orig_shape)[0] > 0.5
            for box, mask in zip(result.boxes, masks):
                detections.append({
                    "class_id": int(box.cls.item()),
                    "confidence": float(box.conf.item()),
                    "box": [float(v) for v in box.xyxy[0].tolist()],
                    "mask_area": int(mask.sum().item()),
                })
        golden["images"].append({"file": name, "width": w, "height": h, "detections": detections})
        print(name, len(detections), [(d["class_id"], round(d["confidence"], 3)) for d in detections])
    with open(os.path.join(out_dir, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(sys.argv[1], sys.argv[2])

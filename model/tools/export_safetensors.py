"""Export an ultralytics YOLOv8-seg checkpoint (.pt) to safetensors for the IDAICS agent.

Tensor names stay ultralytics' own (model.0.conv.weight, ..., model.22.proto.cv3.conv.weight):
the agent loads them without renaming and folds batch norm itself. The metadata carries what the
agent cannot read from the shapes: class names (JSON list, by class index), input size, batch-norm
epsilon, the model scale and the ultralytics version.

    python model/tools/export_safetensors.py best.pt model/idaics-yolov8n-seg.safetensors [--f16]
"""
import argparse
import json

import torch
import ultralytics
from safetensors.torch import save_file
from ultralytics import YOLO


def export(checkpoint: str, output: str, f16: bool = False, imgsz=None, extra=None) -> dict:
    """Writes the checkpoint's tensors and metadata (plus `extra`, string values) to `output`;
    returns the metadata."""
    yolo = YOLO(checkpoint)
    model = yolo.model.float().eval()
    if yolo.task != "segment":
        raise SystemExit(f"{checkpoint} is a {yolo.task} model, not segment")
    dtype = torch.float16 if f16 else torch.float32
    tensors = {
        name: t.detach().to(dtype).contiguous()
        for name, t in model.state_dict().items()
        if not name.endswith("num_batches_tracked")
    }
    names = model.names
    class_names = [names[i] for i in range(len(names))] if isinstance(names, dict) else list(names)
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    if len(eps) != 1:
        raise SystemExit(f"mixed batch-norm epsilons {eps}")
    train_args = getattr(model, "args", {}) or {}
    imgsz = imgsz or (train_args.get("imgsz") if isinstance(train_args, dict) else None) or 640
    if isinstance(imgsz, (list, tuple)):
        imgsz = imgsz[0]
    metadata = {
        "format": "idaics-yolov8-seg",
        "task": "segment",
        "names": json.dumps(class_names),
        "imgsz": str(int(imgsz)),
        "bn_eps": repr(float(eps.pop())),
        "scale": str(model.yaml.get("scale", "")),
        "ultralytics_version": ultralytics.__version__,
    }
    metadata.update(extra or {})
    save_file(tensors, output, metadata=metadata)
    print(f"{output}: {len(tensors)} tensors, classes {class_names}, imgsz {imgsz}")
    return metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("output")
    parser.add_argument("--f16", action="store_true", help="store weights as float16 (half the size)")
    parser.add_argument("--imgsz", type=int, default=None, help="input size (default: the training size)")
    args = parser.parse_args()
    export(args.checkpoint, args.output, args.f16, args.imgsz)


if __name__ == "__main__":
    main()

"""Golden raw outputs of randomly initialised YOLOv8-seg networks, for tests/detector_golden.rs.

Builds yolov8{n,s}-seg with 4 classes from the ultralytics yaml, sets every parameter and batch-norm
buffer to the deterministic values of detrand.py (the Rust test regenerates the same ones), runs the
raw forward pass on a deterministic 512x512 input and writes, per model, the tensor manifest (names
and shapes, so the Rust side can check it loads exactly ultralytics' names) and samples of both head
outputs. Run: YOLO_OFFLINE=1 python model/tools/golden_random.py tests/fixtures/golden
"""
import json
import os
import sys

import numpy as np
import torch
from ultralytics.nn.tasks import SegmentationModel

sys.path.insert(0, os.path.dirname(__file__))
import detrand  # noqa: E402

Y_STRIDE = 53
PROTO_STRIDE = 211
IMAGE_SEED = 20251
SIZE = 512


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    torch.set_grad_enabled(False)
    x = torch.from_numpy(detrand.image(IMAGE_SEED, (1, 3, SIZE, SIZE)))
    for scale in ["n", "s"]:
        # Same class count as the paper's network: normal, Schmorl's node, bulge, protrusion.
        model = SegmentationModel(f"yolov8{scale}-seg.yaml", nc=4, verbose=False)
        model.eval()
        state = model.state_dict()
        manifest = []
        new_state = {}
        for name, t in state.items():
            if name.endswith("num_batches_tracked"):
                new_state[name] = t
                continue
            manifest.append({"name": name, "shape": list(t.shape)})
            if name.endswith("dfl.conv.weight"):
                new_state[name] = t  # fixed 0..15 projection, never trained
            else:
                new_state[name] = torch.from_numpy(detrand.tensor_for(name, list(t.shape)))
        model.load_state_dict(new_state)
        eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
        assert len(eps) == 1, eps
        # ultralytics 8.4 in eval mode: ((predictions, prototypes), raw per-branch outputs)
        (y, proto), _raw = model(x)
        y = y.numpy().astype(np.float64)
        proto = proto.numpy().astype(np.float64)
        golden = {
            "model": f"yolov8{scale}-seg",
            "num_classes": 4,
            "input_size": SIZE,
            "image_seed": IMAGE_SEED,
            "bn_eps": float(eps.pop()),
            "tensors": manifest,
            "y_shape": list(y.shape),
            "y_stride": Y_STRIDE,
            "y_samples": [float(v) for v in y.reshape(-1)[::Y_STRIDE]],
            "y_abs_sum": float(np.abs(y).sum()),
            "proto_shape": list(proto.shape),
            "proto_stride": PROTO_STRIDE,
            "proto_samples": [float(v) for v in proto.reshape(-1)[::PROTO_STRIDE]],
            "proto_abs_sum": float(np.abs(proto).sum()),
        }
        path = os.path.join(out_dir, f"yolov8{scale}-seg-random.json")
        with open(path, "w") as f:
            json.dump(golden, f)
        print(path, y.shape, proto.shape, "y|.|", golden["y_abs_sum"])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/golden")

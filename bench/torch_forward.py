"""PyTorch side of bench/detector.sh: YOLOv8-seg forward time on the same weights and input size.

Set up as ultralytics' predictor runs it on CPU: fused Conv+BN, eval, channels-last on x86, the
given thread count. Prints one JSON line. Optional fifth and sixth arguments: the batch size
(default 1) and the device (default cpu; cuda:0 for scripts/gpu-check.sh).
"""
import json
import sys
import time

import torch
from safetensors.torch import load_file
from ultralytics.nn.tasks import SegmentationModel


def main(weights: str, size: int, threads: int, runs: int, batch: int = 1, device: str = "cpu") -> None:
    torch.set_num_threads(threads)
    state = load_file(weights)
    stem = state["model.0.conv.weight"].shape[0]
    scale = {16: "n", 32: "s", 48: "m", 64: "l", 80: "x"}[stem]
    nc = state["model.22.cv3.0.2.weight"].shape[0]
    model = SegmentationModel(f"yolov8{scale}-seg.yaml", nc=nc, verbose=False)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    model = model.fuse(verbose=False).eval().to(device=device, memory_format=torch.channels_last)
    x = torch.rand(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - t)
    times.sort()
    print(json.dumps({"peer": f"pytorch {torch.__version__}", "device": device, "batch": batch, "median_ms": 1000 * times[len(times) // 2], "min_ms": 1000 * times[0]}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
         int(sys.argv[5]) if len(sys.argv) > 5 else 1, sys.argv[6] if len(sys.argv) > 6 else "cpu")

"""EfficientAD latency: the chapter's detector beside a peer implementation, anomalib's.

    python benchmarks/efficientad_latency.py book/runs/bench/efficientad_latency_cpu.json
    python benchmarks/efficientad_latency.py out.json --device cuda --half --compile   # a GPU

Every variant maps the same batch of 256x256 images to the anomaly map at 256x256 and the
image score, with the same weights, the same teacher standardisation and the same map
quantiles (set from a few random images: latency does not depend on their values):

- ``reference``: the chapter's scoring path, ``anomaly_maps(*raw_maps(model, x), q, 256)``
  (it also returns the two maps alone, as the chapter's figures need them);
- ``fast``: the chapter's ``FastEfficientAD`` (standardisation and normalisations folded,
  one upsampling, channels-last), under ``torch.inference_mode``;
- ``fast+compile`` (``--compile``): the same, compiled by ``torch.compile`` (inductor; on a CPU
  it needs a C++ compiler), compiled before the timed calls;
- ``fast+cudagraph`` (GPU only): the fast model replayed from a captured CUDA graph;
- ``anomalib``: anomalib's ``EfficientAdModel`` (the peer; an optional dependency,
  ``pip install anomalib``), in eval mode under ``torch.inference_mode``, loaded with the same
  weights. Its maps are checked against ours before timing, inside a 20 px border: anomalib
  pads the raw maps with 0 before normalising them, the paper's code (and this chapter) pads
  the normalised map, so the two differ near the edges only.

Timing: ``--warmup`` calls, then ``--repeats`` timed calls (``--repeats-16`` at batch 16), each
synchronised on a GPU; the median and the 10th/90th percentiles in ms per call. The threads
(``--threads``, default: all cores) and the precision are the same for every variant. The JSON
also holds where the time goes at batch 1 (teacher, student, autoencoder, the rest) and the
largest map difference of each variant from the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from nbutils.config import describe_device
from nbutils.methods.efficientad import (
    EfficientAD,
    FastEfficientAD,
    anomaly_maps,
    imagenet_normalize,
    map_quantiles,
    pdn,
    raw_maps,
    teacher_normalization,
)

IMAGE_SIZE = 256
BORDER = 20  # px: the 4 padded map positions (16 px) and the reach of the upsampling


def build_model(size: str, device: torch.device, seed: int = 0) -> EfficientAD:
    """An EfficientAD with random weights, its teacher standardised and quantiles set on random
    images (the numbers a trained model would have differ; the work does not)."""
    torch.manual_seed(seed)
    model = EfficientAD(pdn(size), size, IMAGE_SIZE).to(device).eval()
    x = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    mean, std = teacher_normalization(model.teacher, x)
    model.teacher_mean.copy_(mean)
    model.teacher_std.copy_(std)
    for name, value in map_quantiles(*raw_maps(model, x)).items():
        getattr(model, name).fill_(value)
    return model


def anomalib_model(model: EfficientAD, size: str):
    """anomalib's ``EfficientAdModel`` holding ``model``'s weights, or None without anomalib."""
    try:
        from anomalib.models.image.efficient_ad.torch_model import (
            EfficientAdModel,
            EfficientAdModelSize,
        )
    except ImportError:
        return None
    peer = EfficientAdModel(model.out_channels, EfficientAdModelSize.S if size == "small"
                            else EfficientAdModelSize.M, padding=False, pad_maps=True)

    def convs(module):
        return [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]

    with torch.no_grad():
        pairs = [(model.teacher, peer.teacher), (model.student, peer.student),
                 (model.autoencoder, peer.ae)]
        for ours, theirs in pairs:
            a, b = convs(ours), convs(theirs)
            assert len(a) == len(b), (len(a), len(b))
            for ca, cb in zip(a, b, strict=True):
                cb.weight.copy_(ca.weight)
                cb.bias.copy_(ca.bias)
        peer.mean_std["mean"].copy_(model.teacher_mean)
        peer.mean_std["std"].copy_(model.teacher_std)
        for ours, theirs in (("q_st_start", "qa_st"), ("q_st_end", "qb_st"),
                             ("q_ae_start", "qa_ae"), ("q_ae_end", "qb_ae")):
            peer.quantiles[theirs].copy_(getattr(model, ours))
    return peer.to(model.teacher_mean.device).eval()


def variants(model: EfficientAD, size: str, example: torch.Tensor, half: bool,
             compile_graph: bool = False) -> dict:
    """name -> callable(images) -> combined map (B, 256, 256)."""
    dtype = torch.float16 if half else torch.float32
    q = {k: float(getattr(model, k)) for k in ("q_st_start", "q_st_end", "q_ae_start", "q_ae_end")}
    out = {"reference": lambda x: anomaly_maps(*raw_maps(model, x, batch_size=len(x)), q,
                                               IMAGE_SIZE)["combined"]}
    fast = FastEfficientAD(model).to(dtype)
    out["fast"] = lambda x: fast(x)[0]
    if compile_graph:
        try:  # inductor: fused kernels for the elementwise tail (needs a C++ compiler on a CPU)
            compiled = torch.compile(fast)
            with torch.inference_mode():
                compiled(example.to(dtype))  # compiles here, outside the timed calls
            out["fast+compile"] = lambda x: compiled(x)[0]
        except Exception as err:  # no compiler, or a backend it does not support: say so, go on
            print(f"fast+compile skipped: {type(err).__name__}: {err}", file=sys.stderr)
    if example.is_cuda:
        out["fast+cudagraph"] = cuda_graph(fast, example.to(dtype))
    peer = anomalib_model(model, size)
    if peer is not None:
        peer = peer.to(dtype)
        out["anomalib"] = lambda x: peer(x).anomaly_map[:, 0]
    return out


def cuda_graph(net, example):
    """``net`` replayed from a CUDA graph captured for inputs shaped like ``example``."""
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            net(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        static_out = net(static_in)[0]

    def run(x):
        static_in.copy_(x)
        graph.replay()
        return static_out
    return run


def time_calls(fn, x, warmup: int, repeats: int) -> list[float]:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            fn(x)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def where_the_time_goes(model: EfficientAD, x: torch.Tensor, repeats: int) -> dict:
    """Median ms of each part of the reference path at this batch."""
    xn = imagenet_normalize(x)
    t, s, a = model.teacher(xn), model.student(xn), model.autoencoder(xn)
    c = model.out_channels
    q = {k: float(getattr(model, k)) for k in ("q_st_start", "q_st_end", "q_ae_start", "q_ae_end")}
    parts = {"teacher": lambda _: model.teacher(xn), "student": lambda _: model.student(xn),
             "autoencoder": lambda _: model.autoencoder(xn),
             "maps (distances, normalisation, upsampling)": lambda _: anomaly_maps(
                 ((t - s[:, :c]) ** 2).mean(1), ((a - s[:, c:]) ** 2).mean(1), q, IMAGE_SIZE)}
    return {k: statistics.median(time_calls(fn, x, 2, repeats)) for k, fn in parts.items()}


def summary(times: list[float]) -> dict:
    qs = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {"median_ms": statistics.median(times), "p10_ms": qs[0], "p90_ms": qs[-1],
            "n": len(times)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="JSON file to write")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="0: every core")
    parser.add_argument("--sizes", nargs="+", default=["small", "medium"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls at batch 1")
    parser.add_argument("--repeats-16", type=int, default=5, help="timed calls at larger batches")
    parser.add_argument("--half", action="store_true", help="float16 (GPU)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the fast path compiled by torch.compile (slow to compile)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.half and device.type != "cuda":
        parser.error("--half is for GPUs")
    try:
        import anomalib
        peer_version = anomalib.__version__
    except ImportError:
        peer_version = None
        print("anomalib is not installed (pip install anomalib): the peer is left out",
              file=sys.stderr)
    result = {"benchmark": "efficientad_latency", "device": describe_device(device),
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "anomalib": peer_version, "python": platform.python_version(),
              "precision": "float16" if args.half else "float32", "image_size": IMAGE_SIZE,
              "warmup": args.warmup, "rows": [], "parts_ms": {}, "max_map_difference": {}}
    for size in args.sizes:
        model = build_model(size, device)
        x1 = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
        if args.half:
            model = model.half()
        for batch in args.batches:
            x = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device,
                           generator=torch.Generator(device).manual_seed(batch))
            if args.half:
                x = x.half()
            fns = variants(model, size, x, args.half, args.compile)
            with torch.inference_mode():
                ref = fns["reference"](x).float()
                for name, fn in fns.items():
                    # anomalib pads the raw maps (before normalising, so its border is not 0 as
                    # in the paper's code and ours): compare inside the padded band
                    inner = slice(BORDER, -BORDER) if name == "anomalib" else slice(None)
                    diff = float((fn(x).float() - ref)[..., inner, inner].abs().max())
                    result["max_map_difference"][f"{size}/{batch}/{name}"] = diff
                    print(f"{size} batch {batch} {name}: map differs from reference by {diff:.2e}")
                    tol = (1e-2 if args.half else 1e-4) * max(1.0, float(ref.abs().max()))
                    if diff > tol:  # timing a different computation would mean nothing
                        raise SystemExit(f"{name} does not compute the reference's map "
                                         f"({size}, batch {batch}): differs by {diff:.3g} > {tol:.3g}")
            repeats = args.repeats if batch == 1 else args.repeats_16
            for name, fn in fns.items():
                row = {"model": size, "batch": batch, "variant": name,
                       **summary(time_calls(fn, x, args.warmup, repeats))}
                row["per_image_ms"] = row["median_ms"] / batch
                result["rows"].append(row)
                print(f"{size} batch {batch} {name}: {row['median_ms']:.1f} ms per call "
                      f"({row['per_image_ms']:.2f} ms per image)", flush=True)
        with torch.inference_mode():
            result["parts_ms"][size] = where_the_time_goes(model, x1, max(3, args.repeats // 2))
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["command"] = "python benchmarks/efficientad_latency.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    try:
        result["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        result["git_commit"] = None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

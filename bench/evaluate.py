"""Bench for `ddil evaluate` on the CPU.

1. Feature throughput (images/s) of each extractor at its real size with random weights (the
   cost does not depend on the values): DINOv2 ViT-L/14 (timm), OpenCLIP (default ViT-g-14),
   LPIPS AlexNet, and Inception (clean-fid's TorchScript file if --inception is given, else
   torchvision's InceptionV3 as a same-size stand-in).
2. PR/DC wall time and peak memory at each --prdc-sizes N (N real x N fake, --dim features), ours
   (chunked torch) beside the `prdc` package (full N x N in sklearn), each in a fresh process so
   the peak RSS is its own (reported above the process's baseline after imports).

    python bench/evaluate.py --images 8 --prdc-sizes 5000,10000          # a couple of minutes
    python bench/evaluate.py --prdc-sizes 10000,30000 --skip-features    # the issue's sizes
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import numpy as np


def _rss_mb() -> float:
    """Current resident set size (Linux /proc), in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRSS:
    """Samples the RSS every 5 ms in a thread: the peak above the value at start."""

    def __enter__(self):
        import threading

        self.base = self.peak = _rss_mb()
        self._stop = threading.Event()

        def watch():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, _rss_mb())
        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def above_base_mb(self) -> float:
        return self.peak - self.base


def _prdc_worker(which: str, n: int, dim: int, k: int, queue) -> None:
    import torch  # noqa: F401  (import cost belongs to the baseline)

    from ddil_cli.evaluate.prdc import compute_prdc

    rng = np.random.default_rng(0)
    real = rng.standard_normal((n, dim)).astype(np.float32)
    fake = (rng.standard_normal((n, dim)) + 0.1).astype(np.float32)
    import contextlib
    import io

    import prdc
    start = time.perf_counter()
    with PeakRSS() as mem:
        if which == "prdc package":
            with contextlib.redirect_stdout(io.StringIO()):
                out = prdc.compute_prdc(real, fake, nearest_k=k)
            out = {key: float(v) for key, v in out.items()}
        else:
            out = compute_prdc(real, fake, k=k).as_dict()
    queue.put({"seconds": time.perf_counter() - start, "peak_mb": mem.above_base_mb, **out})


def bench_prdc(sizes: list[int], dim: int, k: int, skip_package_above: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for n in sizes:
        for which in ("ours (chunked torch, float64)", "prdc package"):
            if which == "prdc package" and n > skip_package_above:
                rows.append({"what": which, "n": n, "seconds": None, "peak_mb": None})
                continue
            queue = ctx.Queue()
            proc = ctx.Process(target=_prdc_worker, args=(which, n, dim, k, queue))
            proc.start()
            result = queue.get()
            proc.join()
            rows.append({"what": which, "n": n, **result})
            print(rows[-1], flush=True)
    return rows


def bench_features(num_images: int, res: int, inception: str | None, clip_arch: str) -> list[dict]:
    import torch

    from ddil_cli.evaluate import features as F

    images = np.random.default_rng(0).integers(0, 256, (num_images, res, res, 3), dtype=np.uint8)
    rows = []

    def timed(name, fn, batch):
        fn(batch[:1])  # warm-up
        start = time.perf_counter()
        fn(batch)
        seconds = time.perf_counter() - start
        rows.append({"extractor": name, "images": len(batch), "images_per_s": len(batch) / seconds})
        print(rows[-1], flush=True)

    if inception:
        ext = F.build_feature_extractor("inception", F.ExtractorOptions(inception=inception))
        timed("inception (clean-fid TorchScript)", ext.features, images)
    else:
        import torchvision
        from cleanfid.resize import build_resizer

        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
        resize = build_resizer("clean")

        @torch.no_grad()
        def stand_in(batch):
            x = torch.from_numpy(np.stack([resize(i) for i in batch])).permute(0, 3, 1, 2) / 128 - 1
            return net(x)
        timed("inception (torchvision stand-in, same size)", stand_in, images)

    import timm

    dino = timm.create_model(F.DINOV2_TIMM_NAME, pretrained=False, num_classes=0, img_size=F.DINOV2_RES).eval()
    timed("dinov2 ViT-L/14 (timm)", torch.no_grad()(lambda b: dino(F.dinov2_preprocess(b))), images)
    del dino

    import open_clip
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(clip_arch)
    model.eval()
    timed(f"openclip {clip_arch} image", torch.no_grad()(
        lambda b: model.encode_image(torch.stack([preprocess(Image.fromarray(i)) for i in b]))), images)
    del model

    import lpips
    net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    timed("lpips alex (pairs/s)", torch.no_grad()(
        lambda b: net(torch.from_numpy(b).permute(0, 3, 1, 2) / 127.5 - 1,
                      torch.from_numpy(b[::-1].copy()).permute(0, 3, 1, 2) / 127.5 - 1)), images)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--inception", default=None)
    parser.add_argument("--clip-arch", default="ViT-g-14")
    parser.add_argument("--prdc-sizes", default="5000,10000")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--skip-package-above", type=int, default=10000,
                        help="skip the prdc package above this N (30k: ~5 min, ~11 GB)")
    parser.add_argument("--skip-features", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)

    feats = [] if args.skip_features else bench_features(args.images, args.res, args.inception, args.clip_arch)
    prdc_rows = bench_prdc([int(s) for s in args.prdc_sizes.split(",") if s], args.dim, args.k,
                           args.skip_package_above)

    print(f"\n| extractor | images/s (CPU, {args.res}px input, batch {args.images}) |\n|---|---|")
    for r in feats:
        print(f"| {r['extractor']} | {r['images_per_s']:.2f} |")
    print(f"\n| PR/DC, N real = N fake, {args.dim}-d, k={args.k} | N | seconds | peak MB above baseline | "
          "precision | recall | density | coverage |\n|---|---|---|---|---|---|---|---|")
    for r in prdc_rows:
        if r["seconds"] is None:
            print(f"| {r['what']} | {r['n']} | skipped | | | | | |")
        else:
            print(f"| {r['what']} | {r['n']} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | {r['precision']:.4f} | "
                  f"{r['recall']:.4f} | {r['density']:.4f} | {r['coverage']:.4f} |")


if __name__ == "__main__":
    main()

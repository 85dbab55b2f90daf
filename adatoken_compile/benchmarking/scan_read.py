"""Time reading a ScanNet export folder: a scan of ``--frames`` frames at ScanNet's sizes (colour
1296x968 JPEG, depth 640x480 uint16 PNG), ``--select`` of them selected as LLaVA-3D selects them.
Only the selected frames are decoded; the pose files of every frame are read (frames with an inf
pose are left out before the selection)::

    taskset -c 0 python -m adatoken_compile.benchmarking.scan_read --frames 300 --select 20
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from adatoken_compile.benchmark3d.dataset import make_scene
from adatoken_compile.runtime import scannet
from adatoken_compile.runtime.sources import open_scene, select_frames

COLOR_HW, DEPTH_HW = (968, 1296), (480, 640)


def write_scan(folder: str, frames: int, seed: int = 2_000_000) -> None:
    """A ScanNet-sized export folder: the procedural scene's views, upsampled, cycled over the frames."""
    scene, _ = make_scene(seed)
    for d in ("color", "depth", "pose", "intrinsic"):
        os.makedirs(os.path.join(folder, d))
    K = scene.intrinsics[0].copy()
    K[:2] *= DEPTH_HW[1] / scene.images.shape[2]
    np.savetxt(os.path.join(folder, "intrinsic", "intrinsic_depth.txt"), K)
    colors = [Image.fromarray(im).resize(COLOR_HW[::-1], Image.BICUBIC) for im in scene.images]
    depths = [Image.fromarray(np.round(d * 1000).astype(np.uint16)).resize(DEPTH_HW[::-1], Image.NEAREST)
              for d in scene.depths]
    for i in range(frames):
        v = i % scene.num_views
        colors[v].save(os.path.join(folder, "color", f"{i}.jpg"), quality=95)
        depths[v].save(os.path.join(folder, "depth", f"{i}.png"))
        np.savetxt(os.path.join(folder, "pose", f"{i}.txt"), scene.poses[v], fmt="%f")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m adatoken_compile.benchmarking.scan_read")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--select", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="scan-read-") as tmp:
        folder = os.path.join(tmp, "scene0000_00")
        write_scan(folder, a.frames)
        picks = select_frames(a.frames, a.select)
        times, listing, decode = [], [], []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            scene = open_scene(folder, num_frames=a.select)
            times.append(time.perf_counter() - t0)
            # the parts: the listing with every pose file, and decoding the selected frames
            t0 = time.perf_counter()
            stems = scannet.frame_stems(os.path.join(folder, "color"))
            poses = [scannet.read_matrix(os.path.join(folder, "pose", s + ".txt")) for s, _ in stems]
            listing.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i in picks:
                scannet.decode_color(os.path.join(folder, "color", f"{i}.jpg"))
                scannet.decode_depth(os.path.join(folder, "depth", f"{i}.png"))
            decode.append(time.perf_counter() - t0)
        assert scene.num_views == a.select and len(poses) == a.frames
    med = lambda x: float(np.median(x))  # noqa: E731
    print(f"{a.frames}-frame ScanNet folder, {a.select} frames selected ({a.repeats} repeats, median): "
          f"open_scene {med(times):.3f} s (listing + {a.frames} pose files {med(listing):.3f} s, decoding "
          f"{a.select} colour {COLOR_HW[1]}x{COLOR_HW[0]} JPEG + depth {DEPTH_HW[1]}x{DEPTH_HW[0]} PNG "
          f"{med(decode):.3f} s); scene {scene.images.shape} colour, {scene.depths.shape} depth")


if __name__ == "__main__":
    main()

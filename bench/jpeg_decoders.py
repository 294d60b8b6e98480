"""Decoding speed of the JPEG decoders a training pipeline could use, on the same photos.

    python bench/jpeg_decoders.py [--small] [--images N] [--batch B] [--site DIR]

Decodes N synthetic 640x480 JPEGs (~106 KB, like GSV-Cities images) in batches of B into
uint8 images and prints images/s per decoder:
- torchvision, CPU (libjpeg-turbo), one thread: what one DataLoader worker does;
- torchvision, CUDA (nvJPEG batch decode): what vprlib's decode="gpu"/"mixed" paths use;
- nvImageCodec, one row per backend: HW_GPU_ONLY (the JPEG engines of A100/H100/H200 GPUs),
  GPU_ONLY, HYBRID_CPU_GPU, CPU_ONLY (one thread).
Each decoder is timed twice: alone, and beside a busy device (back-to-back matrix products
on another stream in a background thread, as a training step keeps the GPU busy), which
also gives how much of the busy work's speed the decoding takes away. Each decoder's first
batch is compared with torchvision's CPU decode (mean |diff| in grey levels). Rows that
cannot run here say why.

The question for issue 8: the training input pipeline decodes beside the step, and there
the decode was 2-3x slower than alone. torchvision's nvJPEG batch decode already uses the
hardware JPEG engines for baseline JPEGs on A100/H100/H200 (nvjpegCreateEx with
NVJPEG_BACKEND_HARDWARE), but it runs on its own normal-priority stream and waits for it on
the host (cudaStreamSynchronize) before returning. Does a decoder that does not wait keep
its speed beside the step, and what does each cost the step?

nvImageCodec is not a vprlib dependency. For this script: pip wheels nvidia-nvimgcodec-cu13
and nvidia-nvjpeg (CUDA 13; -cu12 wheels for CUDA 12), installed with
`pip install --target DIR` and passed as --site DIR (kept out of PYTHONPATH: the wheel's
`nvidia/__init__.py` would shadow the `nvidia.*` packages of the CUDA runtime).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.io import decode_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import jpeg_pool  # noqa: E402

BACKENDS = ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU", "CPU_ONLY")


def import_nvimgcodec(site: str | None):
    """nvidia.nvimgcodec from `site` (or the environment), with libnvjpeg preloaded from the
    same folder so that its GPU decoders find it; (module, None) or (None, why not)."""
    if site:
        sys.path.insert(0, site)
        for lib in glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvjpeg.so*")):
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    try:
        from nvidia import nvimgcodec
    except ImportError as e:
        return None, f"not installed ({e})"
    return nvimgcodec, None


def torchvision_cpu(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    return [decode_jpeg(data) for data in batch]


def torchvision_cuda(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    return decode_jpeg(batch, device="cuda")


def nvimgcodec_decoder(nvimgcodec, backend: str):
    """A batch -> [3,H,W] uint8 tensors function for one nvImageCodec backend."""
    kind = getattr(nvimgcodec.BackendKind, backend)
    on_cpu = backend == "CPU_ONLY"
    decoder = nvimgcodec.Decoder(
        device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY if on_cpu else -1,
        max_num_cpu_threads=1 if on_cpu else 0,
        backends=[nvimgcodec.Backend(kind)],
    )
    params = nvimgcodec.DecodeParams(sample_format=nvimgcodec.SampleFormat.P_RGB)

    def decode(batch: list[bytes]) -> list[torch.Tensor]:
        streams = [nvimgcodec.CodeStream(data) for data in batch]
        # on torch's current stream (as vprlib's decode would run on the prefetch stream)
        stream = 0 if on_cpu else torch.cuda.current_stream().cuda_stream
        images = decoder.decode(streams, params=params, cuda_stream=stream)
        if any(image is None for image in images):
            missing = sum(image is None for image in images)
            raise RuntimeError(f"{missing} of {len(images)} images not decoded by {backend}")
        if on_cpu:
            return [torch.from_numpy(np.asarray(im.cpu())) for im in images]
        return [torch.from_dlpack(im) for im in images]

    return decode


def measure(decode, batches: list, cuda: bool) -> float:
    """Images/s over all batches after one untimed warm-up batch."""
    decode(batches[0])
    if cuda:
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    for batch in batches:
        decode(batch)
        count += len(batch)
    if cuda:
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


class BusyDevice:
    """Keeps a device busy as a training step does, from a background thread: back-to-back
    matrix products (bf16 on CUDA, on a stream of their own, at most two queued); `rate` is
    how many finished per second while the context was open."""

    def __init__(self, device: torch.device, size: int):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(size, size, generator=g).to(device, dtype)
        self.b = torch.randn(size, size, generator=g).to(device, dtype) / size**0.5
        self.device = device
        self.stop = threading.Event()
        self.done = 0
        self.seconds = 0.0

    def work(self) -> None:
        cuda = self.device.type == "cuda"
        if not cuda:
            torch.set_num_threads(1)  # one core, as the decoders get (this thread's OpenMP)
        stream = torch.cuda.Stream(self.device) if cuda else None
        context = torch.cuda.stream(stream) if cuda else contextlib.nullcontext()
        pending: list = []
        start = time.perf_counter()
        with context:
            while not self.stop.is_set():
                torch.mm(self.a, self.b)
                if cuda:
                    pending.append(torch.cuda.Event())
                    pending[-1].record(stream)
                    if len(pending) > 2:
                        pending.pop(0).synchronize()
                self.done += 1
            if cuda:
                stream.synchronize()
        self.seconds = time.perf_counter() - start

    def __enter__(self) -> BusyDevice:
        self.thread = threading.Thread(target=self.work, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds else float("nan")


def busy_rate(device: torch.device, size: int, seconds: float) -> float:
    """Products/s of BusyDevice alone (the 100 % of the 'busy kept' column)."""
    with BusyDevice(device, size) as busy:
        time.sleep(seconds)
    return busy.rate


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="quick smoke run")
    parser.add_argument("--images", type=int, default=1600)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--site", default=None, help="folder with nvidia-nvimgcodec installed")
    args = parser.parse_args(argv)
    images, batch_size = (16, 8) if args.small else (args.images, args.batch)
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    pool = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpeg_pool(min(images, 64))]
    data = [pool[i % len(pool)] for i in range(images)]
    batches = [data[i : i + batch_size] for i in range(0, images, batch_size)]
    byte_batches = [[bytes(t.numpy()) for t in batch] for batch in batches]
    reference = torchvision_cpu(batches[0])
    nvimgcodec, why_not = import_nvimgcodec(args.site)

    rows = [("torchvision cpu (1 thread)", torchvision_cpu, False, False)]
    rows.append(("torchvision cuda (nvJPEG)", torchvision_cuda if cuda else "no CUDA", False, True))
    for backend in BACKENDS:
        if nvimgcodec is None:
            decoder = why_not
        elif backend != "CPU_ONLY" and not cuda:
            decoder = "no CUDA"
        else:
            try:  # a backend that cannot start must not cost the other rows
                decoder = nvimgcodec_decoder(nvimgcodec, backend)
            except Exception as e:  # noqa: BLE001 - any failure of the optional library
                decoder = f"cannot start: {type(e).__name__}: {str(e)[:80]}"
        rows.append((f"nvimgcodec {backend}", decoder, True, backend != "CPU_ONLY"))

    device = torch.device("cuda" if cuda else "cpu")
    size = 256 if args.small or not cuda else 8192
    busy_alone = busy_rate(device, size, 0.3 if args.small else 2.0)
    print(f"{images} JPEGs 640x480 (~106 KB), batches of {batch_size}; cuda {cuda}")
    print(
        f"busy work: {size}x{size} matrix products on {device.type}, "
        f"{busy_alone:.0f}/s alone; 'beside' = decoding while it runs, 'busy kept' = its "
        "speed then, of that alone"
    )
    print(
        f"{'decoder':32} {'images/s':>9} {'vs cpu':>7} {'mean|diff|':>10} "
        f"{'beside':>9} {'busy kept':>9}"
    )
    cpu_rate = None
    for name, decoder, as_bytes, on_cuda in rows:
        if isinstance(decoder, str):
            print(f"{name:32} {'-':>9} {'-':>7} {'-':>10} {'-':>9} {'-':>9}  {decoder}")
            continue
        inputs = byte_batches if as_bytes else batches
        try:
            rate = measure(decoder, inputs, on_cuda)
            first = decoder(inputs[0])
            with BusyDevice(device, size) as busy:
                beside = measure(decoder, inputs, on_cuda)
        except RuntimeError as e:  # a backend this GPU or driver does not offer
            print(
                f"{name:32} {'-':>9} {'-':>7} {'-':>10} {'-':>9} {'-':>9}  failed: {str(e)[:120]}"
            )
            continue
        diff = sum(
            (a.cpu().int() - b.int()).abs().float().mean().item()
            for a, b in zip(first, reference, strict=True)
        ) / len(first)
        cpu_rate = cpu_rate or rate
        kept = busy.rate / busy_alone
        print(
            f"{name:32} {rate:9.0f} {rate / cpu_rate:6.1f}x {diff:10.2f} {beside:9.0f} {kept:8.0%}"
        )


if __name__ == "__main__":
    main()

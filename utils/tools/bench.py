"""Throughput benchmark, three ways on the same model and batch size, measured side by side:

(a) e2e:     the toolkit's own attack-training path (`engine.train_epoch` over the poisoned uint8
             dataset on the device, batched crop/flip/normalise included);
(b) compute: the bare training step on random float tensors already in memory (the ceiling);
(c) pil:     a conventional pipeline, per-sample PIL images + torchvision transforms + DataLoader
             workers, feeding the same training step.

The rounds are interleaved (a, b, c, a, b, c, ...) and the median of each is reported, so slow
drift of the machine affects all three alike. The last line printed is one JSON object.
Run: `bash sh/bench.sh` (options: `python -m utils.bench --help`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from models import build_model
from utils import engine
from utils.compat import import_torchvision
from utils.data.datasets import dataset_info, load_dataset
from utils.config import ArgumentParser
from utils.errors import run_cli
from utils.attacks.poison import choose_poison_indices, poison_train_set
from utils.attacks.registry import get_attack, make_trigger


class PILDataset(torch.utils.data.Dataset):
    """What torchvision-style backdoor code does: one PIL image per sample, transforms per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        from PIL import Image
        self.Image = Image
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i]
        pil = self.Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
        return self.transform(pil), int(self.labels[i])


def main(argv=None) -> dict:
    p = ArgumentParser(prog="python -m utils.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--dataset_path", default="data")
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--images", type=int, default=3840, help="images per round and pipeline")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"))
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers for (c)")
    args = p.parse_args(argv)

    engine.configure_threads()
    device = engine.resolve_device(args.device)
    amp = engine.amp_dtype(args.amp, device)
    info = dataset_info(args.dataset)
    data = load_dataset(args.dataset, args.dataset_path, train=True)
    n = min(args.images, len(data))
    images, labels = data.images[:n], data.labels[:n]
    spec = get_attack("badnet")
    params = spec.build({"patch": "square", "patch_size": 3}, info)
    idx = choose_poison_indices(labels, 0.1, 0, 0)
    poisoned = poison_train_set(images, labels, idx, make_trigger(spec, params, True), 0, "all2one", info.num_classes)
    dev_images, dev_labels = poisoned.images.to(device), poisoned.labels.to(device)
    pipeline = engine.Pipeline.for_dataset(info, device)

    torch.manual_seed(0)
    model = engine.place_model(build_model(args.model, info.num_classes, info.channels, info.image_size), pipeline, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gen = engine.make_generator(0, device, "bench")
    bs = args.batch_size

    def step(x, y):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_e2e():
        sync()
        t = time.perf_counter()
        engine.train_epoch(model, dev_images, dev_labels, pipeline, opt, bs, gen, amp=amp, progress=False)
        sync()
        return n / (time.perf_counter() - t)

    rand_x = torch.randn(bs, info.channels, info.image_size, info.image_size, device=device)
    if pipeline.channels_last:
        rand_x = rand_x.contiguous(memory_format=torch.channels_last)
    rand_y = torch.randint(0, info.num_classes, (bs,), device=device)
    steps = -(-n // bs)

    def run_compute():
        model.train()
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            step(rand_x, rand_y)
        sync()
        return steps * bs / (time.perf_counter() - t)

    tv = import_torchvision()
    T = tv.transforms
    flips = [T.RandomHorizontalFlip()] if info.flip else []
    transform = T.Compose([T.RandomCrop(info.image_size, padding=4), *flips, T.ToTensor(),
                           T.Normalize(info.mean, info.std)])
    pil_set = PILDataset(poisoned.images.numpy(), poisoned.labels.numpy(), transform)
    loader = torch.utils.data.DataLoader(pil_set, batch_size=bs, shuffle=True, num_workers=args.workers,
                                         persistent_workers=args.workers > 0, pin_memory=device.type == "cuda")

    def run_pil():
        model.train()
        sync()
        t = time.perf_counter()
        seen = 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if pipeline.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            step(x, y)
            seen += len(y)
        sync()
        return seen / (time.perf_counter() - t)

    print(f"bench: {args.model} on {args.dataset}, batch {bs}, {n} images per round, {args.rounds} rounds, "
          f"device {device}, amp {amp}, {torch.get_num_threads()} threads, {args.workers} DataLoader workers", flush=True)
    runs = {"e2e": [], "compute": [], "pil": []}
    for fn in (run_e2e, run_compute, run_pil):  # warm-up: allocator, kernels, worker start
        fn()
    for r in range(args.rounds):
        for name, fn in (("e2e", run_e2e), ("compute", run_compute), ("pil", run_pil)):
            runs[name].append(fn())
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.0f} img/s" for k, v in runs.items()), flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"(a) end-to-end toolkit pipeline : {med['e2e']:8.0f} img/s")
    print(f"(b) bare model step (ceiling)   : {med['compute']:8.0f} img/s")
    print(f"(c) PIL + DataLoader pipeline   : {med['pil']:8.0f} img/s")
    print(f"e2e / compute = {med['e2e'] / med['compute']:.3f}   e2e / pil = {med['e2e'] / med['pil']:.2f}")
    result = {"e2e_img_s": round(med["e2e"], 1), "compute_img_s": round(med["compute"], 1),
              "pil_img_s": round(med["pil"], 1), "e2e_over_compute": round(med["e2e"] / med["compute"], 3),
              "e2e_over_pil": round(med["e2e"] / med["pil"], 3), "model": args.model, "dataset": args.dataset,
              "batch_size": bs, "device": str(device), "amp": str(amp)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main)

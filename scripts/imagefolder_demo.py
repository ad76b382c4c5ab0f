"""Stand-ins for what a user brings to profiles/imagefolder.yaml: a folder of images and a fine-tuned teacher.

    python scripts/imagefolder_demo.py --out datasets/my_images --per-class 100 --test-per-class 30 \
        --teacher weights/resnet18.pth

1. Writes an ImageFolder (`OUT/train/<class>/*.png`, `OUT/test/<class>/*.png`) of Fashion-MNIST images (Debian's
   copy, scripts/setup.sh) as RGB PNGs: PER_CLASS training and TEST_PER_CLASS test images of each of the 10
   classes, the first of each class in the dataset's order.
2. Fine-tunes a torchvision ResNet-18 on that folder with plain torchvision code, the way a user's own training
   script would (ImageNet normalisation, random-resized crops and flips at `--size` pixels, SGD), and saves its
   state dict to TEACHER with the `module.` prefix and `state_dict` wrapper such scripts leave behind.

Nothing of the pipeline is used for 2: the point is a checkpoint made elsewhere, which the pretrain stage then
imports (`teachers.resnet18.weights`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def write_folder(out: Path, per_class: int, test_per_class: int) -> None:
    from PIL import Image

    from pipeline.data import FASHION_MNIST_CLASSES, DataConfig, load_split

    for split, n in (("train", per_class), ("test", test_per_class)):
        data = load_split(DataConfig(name="fashion_mnist"), split)
        labels = data.labels.numpy()
        for k, name in enumerate(FASHION_MNIST_CLASSES):
            folder = out / split / name.replace("/", "-").replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(labels == k)[:n]:
                grey = data.images[i, 0].numpy()
                Image.fromarray(np.stack([grey] * 3, axis=-1)).save(folder / f"{i:05d}.png")


def finetune(folder: Path, out: Path, size: int, epochs: int, seed: int) -> float:
    """A user's own fine-tuning script: torchvision's datasets, transforms and model; returns test accuracy."""
    import torchvision
    from torchvision import transforms as T

    torch.manual_seed(seed)
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train = torchvision.datasets.ImageFolder(folder / "train", T.Compose([
        T.RandomResizedCrop(size, scale=(0.35, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
    test = torchvision.datasets.ImageFolder(folder / "test", T.Compose([T.Resize((size, size)), T.ToTensor(), norm]))
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    model = torchvision.models.resnet18(num_classes=len(train.classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=epochs * len(loader))
    for epoch in range(epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in torch.utils.data.DataLoader(test, 256))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epochs, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, out)
    return correct / len(test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="datasets/my_images", help="the ImageFolder to write")
    ap.add_argument("--per-class", type=int, default=100, help="training images per class")
    ap.add_argument("--test-per-class", type=int, default=30, help="test images per class")
    ap.add_argument("--teacher", default="weights/resnet18.pth", help="where the fine-tuned state dict goes")
    ap.add_argument("--size", type=int, default=64, help="the teacher's input size while fine-tuning (pixels)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    write_folder(Path(args.out), args.per_class, args.test_per_class)
    print(f"{args.out}: {10 * args.per_class} training and {10 * args.test_per_class} test images "
          f"({time.perf_counter() - t0:.0f}s)")
    t0 = time.perf_counter()
    acc = finetune(Path(args.out), Path(args.teacher), args.size, args.epochs, args.seed)
    print(f"{args.teacher}: torchvision ResNet-18 fine-tuned at {args.size} px, test accuracy {acc:.4f} "
          f"({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()

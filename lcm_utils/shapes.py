"""The demo's world: coloured shapes on coloured backgrounds, their captions, and a pixel judge for them.

Everything here is deterministic numpy/PIL: sample `i` of a split is drawn from the seed (split, i), so the
training shards, the held-out prompts and the held-out real images are the same on every machine. The judge
(`classify`) reads colour and shape back from pixels; `benchmarks/quality.py` uses it for prompt adherence
and `image_features` (with `evaluation.frechet_distance`) for an FID-style distance, so no learned network is
involved.
"""

import argparse
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 210, 40), "white": (240, 240, 240), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
SPLIT_SEEDS = {"train": 0, "heldout": 1, "reference": 2}
SIZE_RANGE = (5, 10)  # half extent in pixels at 32x32: shapes span 10-20 pixels


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    cx: int
    cy: int
    r: int  # half extent

    @property
    def caption(self):
        return f"a {self.color} {self.shape} on a {self.background} background"


def scene(split, index, size=IMAGE_SIZE):
    """Sample `index` of `split`: a uniformly random shape, colour, different background colour, size, place."""
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    names = list(PALETTE)
    color = names[rng.integers(len(names))]
    background = [n for n in names if n != color][rng.integers(len(names) - 1)]
    scale = size / IMAGE_SIZE
    r = int(round(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1) * scale))
    cx, cy = (int(v) for v in rng.integers(r + 1, size - r - 1, size=2))
    return Scene(SHAPES[rng.integers(len(SHAPES))], color, background, cx, cy, r)


def render(s, size=IMAGE_SIZE):
    """Scene -> RGB PIL image (hard edges, so the judge reads real images exactly)."""
    img = Image.new("RGB", (size, size), PALETTE[s.background])
    draw = ImageDraw.Draw(img)
    box = [s.cx - s.r, s.cy - s.r, s.cx + s.r - 1, s.cy + s.r - 1]
    fill = PALETTE[s.color]
    if s.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif s.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # upright triangle filling half its box
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
    return img


def samples(split, count, start=0, size=IMAGE_SIZE):
    """(image, caption) pairs start..start+count-1 of a split."""
    for i in range(start, start + count):
        s = scene(split, i, size)
        yield render(s, size), s.caption


def write_shards(out_dir, split="train", count=8000, per_shard=1000, size=IMAGE_SIZE):
    """Write `split` as webdataset shards `<split>-00000.tar...` (.png + .txt); returns the brace pattern."""
    from .tiny import write_shard

    os.makedirs(out_dir, exist_ok=True)
    num_shards = -(-count // per_shard)
    for shard in range(num_shards):
        first = shard * per_shard
        pairs = samples(split, min(per_shard, count - first), first, size)
        write_shard(os.path.join(out_dir, f"{split}-{shard:05d}.tar"),
                    ((f"{first + j:07d}", img, caption) for j, (img, caption) in enumerate(pairs)), "PNG")
    return os.path.join(out_dir, f"{split}-{{00000..{num_shards - 1:05d}}}.tar")


# ---------------------------------------------------------------------------------------------------------
# The judge: colour and shape from pixels.

_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32)  # [C, 3]
_NAMES = list(PALETTE)
FILL_SQUARE, FILL_TRIANGLE = 0.89, 0.64  # box fill: square 1.0, circle pi/4 = 0.785, triangle 0.5


def palette_labels(image):
    """[H, W, 3] uint8 -> [H, W] index of the nearest palette colour."""
    d = ((np.asarray(image, dtype=np.float32)[..., None, :] - _PALETTE_RGB) ** 2).sum(-1)
    return d.argmin(-1)


def _largest_component(mask):
    """Largest 4-connected component of a boolean mask (iterative flood fill; images are small)."""
    seen = np.zeros_like(mask)
    best = np.zeros_like(mask)
    best_size = 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, comp = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(comp) > best_size:
            best_size = len(comp)
            best = np.zeros_like(mask)
            ys, xs = zip(*comp)
            best[list(ys), list(xs)] = True
    return best


def classify(image):
    """[H, W, 3] uint8 -> (colour, shape, background); colour/shape None when no foreground object is found.

    Background = the most common palette colour on the border; object = the largest connected region of other
    colours; colour = its most common palette colour; shape from how much of its bounding box it fills."""
    labels = palette_labels(image)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = np.bincount(border, minlength=len(_NAMES)).argmax()
    obj = _largest_component(labels != background)
    area = int(obj.sum())
    if area < 4:
        return None, None, _NAMES[background]
    color = np.bincount(labels[obj], minlength=len(_NAMES)).argmax()
    ys, xs = np.nonzero(obj)
    fill = area / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill >= FILL_SQUARE else "circle" if fill >= FILL_TRIANGLE else "triangle"
    return _NAMES[color], shape, _NAMES[background]


def parse_caption(caption):
    """'a red circle on a blue background' -> ('red', 'circle', 'blue')."""
    words = caption.split()
    return words[1], words[2], words[5]


def adherence(images, captions):
    """Fractions of images whose judged colour, shape, both, and background match their captions."""
    hits = np.zeros(4)
    for image, caption in zip(images, captions):
        color, shape, background = parse_caption(caption)
        got = classify(np.asarray(image))
        c, s = got[0] == color, got[1] == shape
        hits += (c, s, c and s, got[2] == background)
    return dict(zip(("color", "shape", "both", "background"), (hits / max(len(captions), 1)).tolist()))


# ---------------------------------------------------------------------------------------------------------
# A fixed feature map and the Frechet distance between Gaussians fitted to features (FID's formula).

def image_features(images):
    """N images [H, W, 3] uint8 -> [N, 80] features: 4x4 mean colours (48), 8-bin channel histograms (24),
    8-bin histogram of gradient magnitude (8). Fixed and untrained, so the distance means the same everywhere."""
    feats = []
    for image in images:
        x = np.asarray(image, dtype=np.float32) / 255.0
        h, w, _ = x.shape
        pooled = x.reshape(4, h // 4, 4, w // 4, 3).mean((1, 3)).ravel()
        hists = np.concatenate([np.histogram(x[..., c], bins=8, range=(0, 1))[0] for c in range(3)]) / (h * w)
        gray = x.mean(-1)
        grad = np.hypot(np.diff(gray, axis=0)[:, :-1], np.diff(gray, axis=1)[:-1])
        ghist = np.histogram(grad, bins=8, range=(0, 1))[0] / grad.size
        feats.append(np.concatenate([pooled, hists, ghist]))
    return np.stack(feats).astype(np.float64)


def main():
    parser = argparse.ArgumentParser(description="Write the shapes dataset as webdataset shards (deterministic).")
    parser.add_argument("out_dir")
    parser.add_argument("--num_train", type=int, default=8000)
    parser.add_argument("--per_shard", type=int, default=1000)
    args = parser.parse_args()
    print(write_shards(args.out_dir, "train", args.num_train, args.per_shard))


if __name__ == "__main__":
    main()

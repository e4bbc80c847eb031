"""Write a synthetic Visual Genome ``region_descriptions.json`` + ``image_data.json`` of the real schema, to measure
``ferret data build`` at scale (the real region file holds 5.4M regions in ~700 MB).

    OMP_NUM_THREADS=1 python scripts/make_vg_regions.py --out /tmp/vg_big --regions 2000000
    OMP_NUM_THREADS=1 /usr/bin/time -v python -m ferret.data.build --out /tmp/grit_big --vg-dir /tmp/vg_big \\
        --vg-images /tmp/vg_big/images --tasks vg_regions --skip-image-check --no-progress

Schema, as in the official file: a list with one entry per image, ``{"regions": [{"region_id", "width",
"height", "image_id", "phrase", "y", "x"}, ...], "id": image_id}``; image_data entries ``{"width", "url",
"height", "image_id", "coco_id", "flickr_id"}``. Regions per image follow VG's spread (about 50 on average),
phrases are drawn from a small grammar, boxes lie inside the image; written streaming, seeded.
"""

from __future__ import annotations

import argparse
import json
import os
import random

COLOURS = ["white", "black", "red", "green", "blue", "brown", "grey", "yellow", "large", "small", "wooden", "tall"]
THINGS = ["man", "woman", "dog", "cat", "tree", "car", "window", "building", "shirt", "sign", "table", "plate",
          "street", "cloud", "grass", "chair", "bus", "light pole", "fence", "hat"]
PLACES = ["on the table", "in the sky", "on the street", "near the wall", "behind the car", "in the window",
          "on the grass", "next to the man", "under the tree", "by the door"]


def phrase(rng: random.Random) -> str:
    form = rng.random()
    if form < 0.4:
        return f"{rng.choice(COLOURS)} {rng.choice(THINGS)} {rng.choice(PLACES)}"
    if form < 0.7:
        return f"the {rng.choice(THINGS)} is {rng.choice(COLOURS)}"
    return f"a {rng.choice(COLOURS)} {rng.choice(THINGS)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--regions", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(args.seed)
    images = []
    written = 0
    region_id = 1
    with open(os.path.join(args.out, "region_descriptions.json"), "w") as f:
        f.write("[")
        image_id = 0
        while written < args.regions:
            image_id += 1
            width, height = rng.choice([(800, 600), (500, 333), (1024, 768), (640, 480), (600, 800)])
            count = min(args.regions - written, max(1, int(rng.gauss(50, 20))))
            regions = []
            for _ in range(count):
                w, h = rng.randint(1, width // 2), rng.randint(1, height // 2)
                regions.append({"region_id": region_id, "width": w, "height": h, "image_id": image_id,
                                "phrase": phrase(rng), "y": rng.randint(0, height - h), "x": rng.randint(0, width - w)})
                region_id += 1
            f.write(("" if image_id == 1 else ", ") + json.dumps({"regions": regions, "id": image_id}))
            written += count
            folder = "VG_100K" if image_id % 2 else "VG_100K_2"
            images.append({"width": width, "url": f"https://cs.stanford.edu/people/rak248/{folder}/{image_id}.jpg",
                           "height": height, "image_id": image_id, "coco_id": None, "flickr_id": None})
        f.write("]")
    with open(os.path.join(args.out, "image_data.json"), "w") as f:
        json.dump(images, f)
    size = os.path.getsize(os.path.join(args.out, "region_descriptions.json"))
    print(f"{written} regions over {len(images)} images, region_descriptions.json {size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()

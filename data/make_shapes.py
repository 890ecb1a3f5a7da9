"""Regenerate the bundled image set (deterministic): ``python data/make_shapes.py``.

shapes/images/      56x56 PNGs: one coloured shape (square, circle or triangle) on white, at a random place and size
shapes/colours.jsonl "What colour is the square?" -> the colour, LLaMA-Factory's sharegpt layout with an ``images``
                    list: what the vision-language demo tunes on and scores (held-out images, exact colour)
shapes/captions.json "Describe the picture." -> "a red circle", LLaVA's JSON layout (``image`` and
                    ``conversations`` with ``<image>``): the first phase of the LLaVA recipe (projector on captions)
"""

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent / "shapes"
SIZE = 56
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("square", "circle", "triangle")
QUESTIONS = ("What colour is the square?", "Which colour is the square?", "What is the colour of the square?")
COLOUR_ROWS, CAPTION_ROWS = 240, 120


def draw(shape: str, colour: str, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    side = rng.randint(16, 30)
    x, y = rng.randint(2, SIZE - side - 2), rng.randint(2, SIZE - side - 2)
    pen = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "square":
        pen.rectangle([x, y, x + side, y + side], fill=fill)
    elif shape == "circle":
        pen.ellipse([x, y, x + side, y + side], fill=fill)
    else:
        pen.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    return image


def main(out: Path = HERE) -> None:
    rng = random.Random(0)
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    colours = []
    for index in range(COLOUR_ROWS):
        colour = list(COLOURS)[index % len(COLOURS)]
        name = f"images/square-{index:03d}.png"
        draw("square", colour, rng).save(out / name, optimize=True)
        colours.append({"conversations": [{"from": "human", "value": "<image>" + rng.choice(QUESTIONS)},
                                          {"from": "gpt", "value": colour}], "images": [name]})
    captions = []
    for index in range(CAPTION_ROWS):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        name = f"images/caption-{index:03d}.png"
        draw(shape, colour, rng).save(out / name, optimize=True)
        captions.append({"id": f"caption-{index:03d}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture."},
            {"from": "gpt", "value": f"a {colour} {shape}"}]})
    (out / "colours.jsonl").write_text("".join(json.dumps(row) + "\n" for row in colours), encoding="utf-8")
    (out / "captions.json").write_text(json.dumps(captions, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

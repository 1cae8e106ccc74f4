"""Captions for Fashion-MNIST: the text side of the ``fmnist-t2i`` built-in.

Every training image gets a caption drawn from varied templates, several nouns per class and an attribute word
measured on the image itself (its brightness within its class: "dark", "light"; most images get none), so the text
path carries real variation, not ten fixed strings. The evaluation captions use templates and nouns kept apart from
training, so text alignment measures whether the model understood the class word, not whether it memorised ten
sentences.
"""

from __future__ import annotations

import torch
from torch import Tensor

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

TRAIN_NOUNS: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "top", "tee", "short-sleeved t-shirt"),
    ("pair of trousers", "pair of pants", "pair of jeans"),
    ("pullover", "sweater", "jumper", "knitted pullover"),
    ("dress", "summer dress", "long dress"),
    ("coat", "jacket", "winter coat"),
    ("sandal", "summer sandal", "strappy sandal"),
    ("shirt", "button-up shirt", "collared shirt"),
    ("sneaker", "running shoe", "trainer"),
    ("bag", "handbag", "purse", "tote bag"),
    ("ankle boot", "boot", "short boot"),
)
EVAL_NOUNS: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "tee shirt"),
    ("pair of trousers", "pair of slacks"),
    ("pullover", "woolly sweater"),
    ("dress", "frock"),
    ("coat", "overcoat"),
    ("sandal", "flip-flop sandal"),
    ("shirt", "dress shirt"),
    ("sneaker", "sports shoe"),
    ("bag", "shoulder bag"),
    ("ankle boot", "leather ankle boot"),
)

TRAIN_TEMPLATES = (
    "{a} {noun}",
    "a photo of {a} {noun}",
    "{a} {noun} on a black background",
    "a product picture of {a} {noun}",
    "a small grayscale image of {a} {noun}",
    "{a} {noun} seen from the front",
    "a catalogue image showing {a} {noun}",
    "here is {a} {noun}",
)
EVAL_TEMPLATES = (
    "a picture showing {a} {noun}",
    "an online shop thumbnail of {a} {noun}",
    "{a} {noun}, centered",
)

ATTRIBUTES = ("dark", "", "light")
"""Brightness tertile of an image within its class -> the attribute word its caption carries (middle: none)."""


def _article(words: str) -> str:
    return "an" if words[0] in "aeiou" else "a"


def caption(template: str, noun: str, attribute: str = "") -> str:
    if noun.startswith("pair of ") and attribute:
        words = f"pair of {attribute} {noun[len('pair of '):]}"
    else:
        words = f"{attribute} {noun}".strip()
    return template.format(a=_article(words), noun=words)


def training_captions() -> list[tuple[str, int]]:
    """Every training caption with its class: templates × nouns × attributes."""
    out = []
    for cls, nouns in enumerate(TRAIN_NOUNS):
        for noun in nouns:
            for template in TRAIN_TEMPLATES:
                for attribute in ATTRIBUTES:
                    out.append((caption(template, noun, attribute), cls))
    return out


def evaluation_captions() -> list[tuple[str, int]]:
    """Held-apart captions (templates and nouns not used in training), with the class each names."""
    out = []
    for cls, nouns in enumerate(EVAL_NOUNS):
        for noun in nouns:
            for template in EVAL_TEMPLATES:
                out.append((caption(template, noun), cls))
    return out


def class_named(text: str) -> int | None:
    """The Fashion-MNIST class a prompt names (its longest matching noun), or None when it names none."""
    words = f" {' '.join(text.lower().replace(',', ' ').split())} "
    best: tuple[int, int] | None = None
    for cls, nouns in enumerate(zip(TRAIN_NOUNS, EVAL_NOUNS, strict=True)):
        for noun in {*nouns[0], *nouns[1], CLASS_NAMES[cls].lower()}:
            for variant in (noun, noun.replace("pair of ", "")):
                if f" {variant} " in words or f" {variant}s " in words:
                    if best is None or len(variant) > best[0]:
                        best = (len(variant), cls)
    return None if best is None else best[1]


def brightness_attributes(images: Tensor, labels: Tensor) -> Tensor:
    """Per image, the index into :data:`ATTRIBUTES`: the brightness tertile of its mean pixel within its class."""
    mean = images.float().flatten(1).mean(1)
    out = torch.ones_like(labels)
    for cls in labels.unique():
        rows = labels == cls
        lo, hi = torch.quantile(mean[rows], torch.tensor([1 / 3, 2 / 3]))
        out[rows & (mean < lo)] = 0
        out[rows & (mean > hi)] = 2
    return out


def caption_index(labels: Tensor, attributes: Tensor, generator: torch.Generator) -> Tensor:
    """A random training caption per image that names its class and its attribute: indices into
    :func:`training_captions` (whose order is class, noun, template, attribute)."""
    per_noun = len(TRAIN_TEMPLATES) * len(ATTRIBUTES)
    starts, counts = [], []
    start = 0
    for nouns in TRAIN_NOUNS:
        starts.append(start)
        counts.append(len(nouns))
        start += len(nouns) * per_noun
    starts_t, counts_t = torch.tensor(starts), torch.tensor(counts)
    n = labels.shape[0]
    noun = (torch.rand(n, generator=generator) * counts_t[labels]).long()
    template = torch.randint(len(TRAIN_TEMPLATES), (n,), generator=generator)
    return starts_t[labels] + noun * per_noun + template * len(ATTRIBUTES) + attributes


__all__ = [
    "CLASS_NAMES", "training_captions", "evaluation_captions", "brightness_attributes", "caption_index", "caption",
    "class_named",
]

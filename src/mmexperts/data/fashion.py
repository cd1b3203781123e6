"""Real-image tasks on Fashion-MNIST: garment yes/no questions (fusion) and garment caption retrieval.

Fashion-MNIST (Xiao et al., 2017; MIT) is read from its four IDX files, as Debian's ``dataset-fashion-mnist``
installs them (``/usr/share/datasets/fashion-mnist``) or from any folder holding them.

Rows keep the garment class (``garment``) and the image's index in its Fashion-MNIST split (``image_id``).

* ``fashion:entailment`` asks a paraphrased yes/no question about a garment attribute (worn on the feet, has sleeves,
  meant for cold weather, ...). Every attribute is true for some classes and false for others, and the
  (class, attribute, answer) triples are sampled so that the answer is "yes" half the time given the class and given
  the attribute: the image alone or the question alone scores ~50 %; the answer needs both.
* ``fashion:retrieval`` gives each image several captions from its class, its attributes and properties measured on
  its pixels (how dark, how wide), for caption <-> image retrieval. Images of one class and look share captions, so
  Recall@1 has a ceiling below 100 %.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from ..errors import DataError

DEFAULT_FOLDER = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CLASS_PHRASES = ("a T-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt",
                 "a sneaker", "a bag", "an ankle boot")
TASKS = ("entailment", "retrieval")
ANSWERS = ("no", "yes")

# attribute: (classes it holds for, paraphrased questions)
ATTRIBUTES: dict[str, tuple[frozenset[int], tuple[str, ...]]] = {
    "footwear": (frozenset({5, 7, 9}), ("Is this worn on the feet?", "Would you put this on your feet?",
                                        "Is this a kind of shoe?")),
    "upper_body": (frozenset({0, 2, 3, 4, 6}), ("Does this cover the upper body?", "Is this worn on the torso?",
                                                "Would this cover your chest?")),
    "legs": (frozenset({1, 3}), ("Does this cover the legs?", "Is this worn over the legs?",
                                 "Would this hide your knees?")),
    "sleeves": (frozenset({0, 2, 4, 6}), ("Does this have sleeves?", "Are there sleeves on this?",
                                          "Does this garment come with sleeves?")),
    "cold_weather": (frozenset({2, 4, 9}), ("Is this meant for cold weather?", "Would this keep you warm in winter?",
                                            "Is this made for the cold?")),
    "carried": (frozenset({8}), ("Is this carried rather than worn?", "Do you carry this in your hand?",
                                 "Is this for carrying things?")),
    "open_toes": (frozenset({5}), ("Does this leave the toes uncovered?", "Are the toes open in this?",
                                   "Can you see the toes when wearing this?")),
    "one_piece": (frozenset({3}), ("Is this a single piece covering body and legs?",
                                   "Is this one garment from shoulders to legs?", "Is this a one-piece outfit?")),
    "sport": (frozenset({7}), ("Is this a sports shoe?", "Would you wear this for running?",
                               "Is this athletic footwear?")),
    "bottom_only": (frozenset({1}), ("Is this worn only below the waist?", "Is this bottom wear?",
                                     "Does this start at the waist?")),
}
ATTRIBUTE_NAMES = tuple(ATTRIBUTES)
ATTRIBUTE_PHRASES = {"footwear": "worn on the feet", "upper_body": "covering the upper body",
                     "legs": "covering the legs", "sleeves": "with sleeves", "cold_weather": "for cold weather",
                     "carried": "carried in the hand", "open_toes": "with open toes",
                     "one_piece": "in one piece", "sport": "for sport", "bottom_only": "worn below the waist"}
SHADES = ("very dark", "dark", "light", "very light")
WIDTHS = ("narrow", "medium-width", "wide")
TEXTURES = ("plain", "patterned")


def holds(label: int, attribute: str) -> bool:
    """Whether ``attribute`` is true for garment class ``label``."""
    return label in ATTRIBUTES[attribute][0]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as an unsigned 8-bit array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex() or 'missing'}); expected "
                        "Fashion-MNIST's original files. Re-install them (apt-get install dataset-fashion-mnist).")
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} holds {data.size} values but its header promises {shape}: the file is truncated. "
                        "Re-install it (apt-get install --reinstall dataset-fashion-mnist).")
    return data.reshape(shape)


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) and labels (N,) of the ``train`` or ``test`` split."""
    arrays = []
    for stem in FILES[split]:
        path = next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)
        if path is None:
            raise DataError(f"{folder} has no {stem}(.gz): Fashion-MNIST is not there. Install it with `apt-get "
                            "install dataset-fashion-mnist` (into /usr/share/datasets/fashion-mnist) or pass "
                            "data_dir=<folder with the four IDX files>.")
        arrays.append(read_idx(path))
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} images but {len(labels)} labels in the {split} split.")
    return images, labels


def balanced_pair_weights(iterations: int = 2000) -> np.ndarray:
    """Sampling weights over (class, attribute, answer) such that the answer is "yes" half of the time given the
    class and given the attribute, and every attribute is asked equally often (iterative proportional fitting over
    the pairs whose answer is true; classes are then drawn in proportion to their share of the weights)."""
    truth = np.array([[holds(c, a) for a in ATTRIBUTE_NAMES] for c in range(len(CLASSES))])
    weights = np.stack([~truth, truth], axis=-1).astype(float)  # [c, a, answer]: only true answers are possible
    for _ in range(iterations):
        by_class = weights.sum(axis=1, keepdims=True)  # [c, 1, answer]
        weights *= by_class.sum(axis=-1, keepdims=True) / (2 * by_class)
        weights *= (1.0 / (2 * len(ATTRIBUTE_NAMES))) / weights.sum(axis=0, keepdims=True)
    return weights / weights.sum()


def _entailment_rows(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, size: int,
                     rng: np.random.Generator) -> dict[str, list]:
    """``size`` rows from a pool of candidate images: each row draws a class from the weights' class margin, an
    unused image of that class from the pool, then an attribute and answer from the class's weights."""
    weights = balanced_pair_weights()
    pools = {c: list(rng.permutation(indices[labels[indices] == c])) for c in range(len(CLASSES))}
    classes = rng.choice(len(CLASSES), size=size, p=weights.sum(axis=(1, 2)))
    answers = np.empty(size, dtype=int)
    for garment in range(len(CLASSES)):  # exactly half "yes" within each class (the odd one out at random)
        rows_of = np.flatnonzero(classes == garment)
        alternating = (np.arange(len(rows_of)) + rng.integers(2)) % 2
        answers[rows_of] = rng.permutation(alternating)
    rows = {"image": [], "text": [], "label": [], "attribute": [], "garment": [], "image_id": []}
    for garment, answer in zip(classes, answers):
        pool = pools[int(garment)]
        index = pool.pop() if pool else rng.choice(indices[labels[indices] == garment])
        given = weights[garment, :, answer]
        attribute = ATTRIBUTE_NAMES[rng.choice(len(given), p=given / given.sum())]
        questions = ATTRIBUTES[attribute][1]
        rows["image"].append(Image.fromarray(images[index]))
        rows["text"].append(questions[rng.integers(len(questions))])
        rows["label"].append(int(answer))
        rows["attribute"].append(attribute)
        rows["garment"].append(int(garment))
        rows["image_id"].append(int(index))
    return rows


def measure_look(images: np.ndarray) -> np.ndarray:
    """Per image (N, 3): mean brightness of the garment's pixels, the fraction of columns it spans, and the spread
    of its pixel values (texture)."""
    on = images > 20
    count = np.maximum(on.sum(axis=(1, 2)), 1)
    shade = (images * on).sum(axis=(1, 2)) / count
    spread = np.sqrt(((images.astype(float) - shade[:, None, None]) ** 2 * on).sum(axis=(1, 2)) / count)
    return np.stack([shade, on.any(axis=1).mean(axis=1), spread], axis=1)


def look_edges(images: np.ndarray) -> list[np.ndarray]:
    """Quantile thresholds that split each look measure into the words of SHADES, WIDTHS and TEXTURES."""
    looks = measure_look(images)
    return [np.quantile(looks[:, i], np.arange(1, len(words)) / len(words))
            for i, words in enumerate((SHADES, WIDTHS, TEXTURES))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def garment_captions(garment: int, shade: str, width: str, texture: str) -> list[str]:
    """Captions of one image: its class, its class's attributes and its measured look."""
    noun = CLASS_PHRASES[garment]
    rest = noun.split(" ", 1)[1]
    attributes = [ATTRIBUTE_PHRASES[a] for a in ATTRIBUTE_NAMES if holds(garment, a)]
    return [f"a photo of {_with_article(f'{texture} {shade} {rest}')}", _with_article(f"{shade} {width} {rest}"),
            f"{_with_article(f'{width} {texture} {rest}')} {attributes[0]}",
            f"something {attributes[-1]}, {shade}, {width} and {texture}",
            f"{noun} {' and '.join(attributes[:2])}, {texture} and {shade}"]


def _retrieval_rows(images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                    edges: list[np.ndarray]) -> dict[str, list]:
    looks = measure_look(images[indices])
    words = [[vocabulary[int(np.searchsorted(edges[i], value))] for i, (vocabulary, value) in
              enumerate(zip((SHADES, WIDTHS, TEXTURES), look))] for look in looks]
    rows = {"image": [], "captions": [], "image_id": [], "garment": []}
    for position, index in enumerate(indices):
        rows["image"].append(Image.fromarray(images[index]))
        rows["captions"].append(garment_captions(int(labels[index]), *words[position]))
        rows["image_id"].append(int(index))
        rows["garment"].append(int(labels[index]))
    return rows


def build_fashion_splits(task: str, train_size: int = 2000, eval_size: int = 500, seed: int = 0,
                         data_dir: str | Path | None = None) -> datasets.DatasetDict:
    """``train`` from Fashion-MNIST's training images; ``validation`` and ``test`` (``eval_size`` rows each) from
    disjoint halves of its test images; images are drawn at random with ``seed``."""
    if task not in TASKS:
        raise ValueError(f"Unknown Fashion-MNIST task {task!r}; valid choices: "
                         + ", ".join(f"fashion:{t}" for t in TASKS) + ".")
    folder = Path(data_dir) if data_dir is not None else DEFAULT_FOLDER
    train_images, train_labels = read_split(folder, "train")
    test_images, test_labels = read_split(folder, "test")
    half = len(test_images) // 2
    for name, value, available in (("train_size", train_size, len(train_images)), ("eval_size", eval_size, half)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= available:
            raise ValueError(f"{name} must be an integer in 1..{available} for Fashion-MNIST, got {value!r}.")
    rng = np.random.default_rng(seed)
    test_order = rng.permutation(len(test_images))  # validation and test draw from disjoint halves
    pools = {"train": (train_images, train_labels, np.arange(len(train_images)), train_size),
             "validation": (test_images, test_labels, np.sort(test_order[:half]), eval_size),
             "test": (test_images, test_labels, np.sort(test_order[half:]), eval_size)}
    garment = datasets.ClassLabel(names=list(CLASSES))
    if task == "entailment":
        features = datasets.Features({"image": datasets.Image(mode="RGB"), "text": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=list(ANSWERS)),
                                      "attribute": datasets.Value("string"), "garment": garment,
                                      "image_id": datasets.Value("int64")})
        return datasets.DatasetDict({split: datasets.Dataset.from_dict(
            _entailment_rows(*pool, np.random.default_rng([seed, i])), features=features)
            for i, (split, pool) in enumerate(pools.items())})
    chosen = {split: np.sort(rng.choice(indices, size, replace=False))
              for split, (_, _, indices, size) in pools.items()}
    edges = look_edges(train_images[chosen["train"]])  # look thresholds from the training images
    features = datasets.Features({"image": datasets.Image(mode="RGB"),
                                  "captions": datasets.Sequence(datasets.Value("string")),
                                  "image_id": datasets.Value("int64"), "garment": garment})
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(
        _retrieval_rows(images, labels, chosen[split], edges), features=features)
        for split, (images, labels, _, _) in pools.items()})


__all__ = ["ATTRIBUTES", "ATTRIBUTE_NAMES", "CLASSES", "TASKS", "balanced_pair_weights", "build_fashion_splits",
           "garment_captions", "holds", "look_edges", "measure_look", "read_idx", "read_split"]

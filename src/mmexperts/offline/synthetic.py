"""Procedurally generated image-text datasets: scenes of coloured shapes on a 3x3 grid, with captions.

Three tasks mirror real multimodal benchmarks at toy scale, so methods can be tested offline in seconds:

* ``entailment`` (SNLI-VE-like): does a caption hold for the image? Built so that neither modality alone beats chance.
* ``multilabel`` (MM-IMDB-like): which attributes does the object(s) of the colour named in the text have?
* ``retrieval`` (COCO-like): several true, distinct captions per image, for caption <-> image retrieval.

Every builder is deterministic given its seed (``numpy.random.Generator`` streams, no global state).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from itertools import permutations

import datasets
import numpy as np
from PIL import Image, ImageDraw

GRID_SIZE = 3
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
ROW_NAMES: tuple[str, ...] = ("top", "middle", "bottom")
COLUMN_NAMES: tuple[str, ...] = ("left", "middle", "right")
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BACKGROUNDS: tuple[str, ...] = ("black", "gray")

ENTAILMENT_LABELS: list[str] = ["contradiction", "entailment"]
MULTILABEL_NAMES: list[str] = ["circle", "square", "triangle", "top", "bottom", "left", "right"]
MULTILABEL_TEMPLATES: tuple[str, ...] = ("the {colour} shapes", "find the {colour} shapes",
                                         "where are the {colour} shapes")
MAX_CAPTIONS_PER_IMAGE = 5
TASKS: tuple[str, ...] = ("entailment", "multilabel", "retrieval")
HYPOTHESIS_TYPES: tuple[str, ...] = ("colour", "shape", "exists", "row", "column", "relation")
DEFAULT_HYPOTHESES: tuple[str, ...] = ("colour",)
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 40),
    "purple": (160, 60, 210),
    "white": (245, 245, 245),
}
_BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (100, 100, 100)}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_TASK_INDEX = {task: i for i, task in enumerate(TASKS)}
_ALL_KINDS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
_CELLS: tuple[tuple[int, int], ...] = tuple((r, c) for r in range(GRID_SIZE) for c in range(GRID_SIZE))
_CAPTION_TEMPLATE_WORDS = "there is are a the shape shapes in row column and of is left right above below"


def _build_vocabulary() -> list[str]:
    """Every word any caption can contain, lower case, in a fixed order (template words first)."""
    words: list[str] = []
    sources = [_CAPTION_TEMPLATE_WORDS, *MULTILABEL_TEMPLATES, *COLOURS, *SHAPES, *RELATIONS, *ROW_NAMES,
               *COLUMN_NAMES, *NUMBER_WORDS]
    for source in sources:
        for word in source.replace("{colour}", " ").split():
            if word not in words:
                words.append(word)
    return words


CAPTION_VOCABULARY: list[str] = _build_vocabulary()

Kind = tuple[str, str]  # (colour, shape); unique within a scene so every caption refers to one object
Caption = tuple  # structured caption: ("colour", c) | ("shape", s) | ("exists", kind) | ("row", kind, r)
#                  | ("column", kind, c)
#                  | ("relation", kind_a, relation, kind_b) | ("count", n) | ("list", kinds)


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene: its colour, shape name and grid cell (row 0 is the top, column 0 the left)."""

    colour: str
    shape: str
    row: int
    col: int

    @property
    def kind(self) -> Kind:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """A background colour and up to nine objects in distinct grid cells, with distinct (colour, shape) kinds."""

    background: str
    objects: tuple[SceneObject, ...]

    def cell_of(self, kind: Kind) -> tuple[int, int] | None:
        """Grid cell of the object of this kind, or None when the scene has none."""
        for obj in self.objects:
            if obj.kind == kind:
                return (obj.row, obj.col)
        return None

    def key(self) -> tuple:
        """Hashable identity of the scene's content, independent of object order."""
        return (self.background, tuple(sorted((o.colour, o.shape, o.row, o.col) for o in self.objects)))


def _rng(seed: int, task: str, split: int = 0) -> np.random.Generator:
    """Independent random stream for one (seed, task, split)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _TASK_INDEX[task], split]))


def _check_size(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_scene_args(image_size: int, max_objects: int) -> None:
    if not isinstance(image_size, (int, np.integer)) or image_size < 12:
        raise ValueError(f"image_size must be an integer >= 12, got {image_size!r}")
    if not isinstance(max_objects, (int, np.integer)) or not 1 <= max_objects <= GRID_SIZE * GRID_SIZE:
        raise ValueError(f"max_objects must be an integer in [1, {GRID_SIZE * GRID_SIZE}], got {max_objects!r}")


# ----------------------------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(kind: Kind) -> str:
    return f"{_article(kind[0])} {kind[0]} {kind[1]}"


def caption_text(caption: Caption) -> str:
    """English sentence for a structured caption, using only words of CAPTION_VOCABULARY."""
    tag = caption[0]
    if tag == "colour":
        return f"there is {_article(caption[1])} {caption[1]} shape"
    if tag == "shape":
        return f"there is {_article(caption[1])} {caption[1]}"
    if tag == "exists":
        return f"there is {_noun(caption[1])}"
    if tag == "row":
        return f"{_noun(caption[1])} is in the {ROW_NAMES[caption[2]]} row"
    if tag == "column":
        return f"{_noun(caption[1])} is in the {COLUMN_NAMES[caption[2]]} column"
    if tag == "relation":
        return f"{_noun(caption[1])} is {caption[2]} {_noun(caption[3])}"
    if tag == "count":
        n = caption[1]
        return f"there is {NUMBER_WORDS[0]} shape" if n == 1 else f"there are {NUMBER_WORDS[n - 1]} shapes"
    if tag == "list":
        return " and ".join(_noun(kind) for kind in caption[1])
    raise ValueError(f"unknown caption type {tag!r}")


def _relation_holds(a: tuple[int, int], relation: str, b: tuple[int, int]) -> bool:
    if relation == "left of":
        return a[1] < b[1]
    if relation == "right of":
        return a[1] > b[1]
    if relation == "above":
        return a[0] < b[0]
    if relation == "below":
        return a[0] > b[0]
    raise ValueError(f"unknown relation {relation!r}")


def caption_holds(caption: Caption, scene: Scene) -> bool:
    """Whether a structured caption is true of a scene."""
    tag = caption[0]
    if tag == "count":
        return len(scene.objects) == caption[1]
    if tag == "list":
        return sorted(caption[1]) == sorted(o.kind for o in scene.objects)
    if tag == "colour":
        return any(o.colour == caption[1] for o in scene.objects)
    if tag == "shape":
        return any(o.shape == caption[1] for o in scene.objects)
    cell = scene.cell_of(caption[1])
    if cell is None:
        return False
    if tag == "exists":
        return True
    if tag == "row":
        return cell[0] == caption[2]
    if tag == "column":
        return cell[1] == caption[2]
    if tag == "relation":
        other = scene.cell_of(caption[3])
        return other is not None and _relation_holds(cell, caption[2], other)
    raise ValueError(f"unknown caption type {tag!r}")


def true_captions(scene: Scene) -> list[Caption]:
    """Every structured caption true of the scene, in a fixed order."""
    objects = sorted(scene.objects, key=lambda o: (o.row, o.col))
    captions: list[Caption] = [("list", tuple(o.kind for o in objects)), ("count", len(objects))]
    for obj in objects:
        captions += [("exists", obj.kind), ("row", obj.kind, obj.row), ("column", obj.kind, obj.col)]
    for a, b in permutations(objects, 2):
        captions += [("relation", a.kind, rel, b.kind) for rel in RELATIONS
                     if _relation_holds((a.row, a.col), rel, (b.row, b.col))]
    return captions


def _random_kind(rng: np.random.Generator, exclude: set[Kind] = frozenset()) -> Kind:
    choices = [k for k in _ALL_KINDS if k not in exclude]
    return choices[rng.integers(len(choices))]


def _change_one_attribute(kind: Kind, rng: np.random.Generator, exclude: set[Kind] = frozenset()) -> Kind:
    """A kind differing from ``kind`` in exactly its colour or exactly its shape (a near-miss object)."""
    options = [(c, kind[1]) for c in COLOURS if c != kind[0]] + [(kind[0], s) for s in SHAPES if s != kind[1]]
    options = [k for k in options if k not in exclude]
    return options[rng.integers(len(options))]


def _random_caption(rng: np.random.Generator, max_objects: int,
                    hypotheses: tuple[str, ...] = ("exists", "row", "column", "relation")) -> Caption:
    """A drawn entailment hypothesis of one of the ``hypotheses`` types (relations twice as often as the others)."""
    tags = [t for t in hypotheses for _ in range(2 if t == "relation" else 1) if t != "relation" or max_objects >= 2]
    tag = tags[rng.integers(len(tags))]
    if tag == "colour":
        return ("colour", COLOURS[rng.integers(len(COLOURS))])
    if tag == "shape":
        return ("shape", SHAPES[rng.integers(len(SHAPES))])
    kind = _random_kind(rng)
    if tag == "exists":
        return ("exists", kind)
    if tag in ("row", "column"):
        return (tag, kind, int(rng.integers(GRID_SIZE)))
    return ("relation", kind, RELATIONS[rng.integers(len(RELATIONS))], _random_kind(rng, {kind}))


def _perturb(caption: Caption, rng: np.random.Generator) -> Caption:
    """A near-miss of ``caption`` (same template, one detail changed) that can be true while it is false."""
    tag = caption[0]
    if tag in ("colour", "shape"):
        names = COLOURS if tag == "colour" else SHAPES
        others = [name for name in names if name != caption[1]]
        return (tag, others[rng.integers(len(others))])
    if tag == "exists":
        return ("exists", _change_one_attribute(caption[1], rng))
    if tag in ("row", "column"):
        if rng.random() < 0.5:
            return (tag, caption[1], int((caption[2] + rng.integers(1, GRID_SIZE)) % GRID_SIZE))
        return (tag, _change_one_attribute(caption[1], rng), caption[2])
    _, a, rel, b = caption
    move = rng.integers(4)
    if move == 0:
        return ("relation", a, _OPPOSITE[rel], b)
    if move == 1:
        return ("relation", b, rel, a)
    if move == 2:
        return ("relation", a, [r for r in RELATIONS if r not in (rel, _OPPOSITE[rel])][rng.integers(2)], b)
    if rng.random() < 0.5:
        return ("relation", _change_one_attribute(a, rng, {b}), rel, b)
    return ("relation", a, rel, _change_one_attribute(b, rng, {a}))


# ------------------------------------------------------------------------------------------------- scenes


def _placements(caption: Caption | None, rng: np.random.Generator) -> list[SceneObject]:
    """Objects (with cells) that make ``caption`` true; empty for no caption."""
    if caption is None:
        return []
    tag = caption[0]
    if tag in ("colour", "shape"):
        kind = (caption[1], SHAPES[rng.integers(len(SHAPES))]) if tag == "colour" else \
            (COLOURS[rng.integers(len(COLOURS))], caption[1])
        return _placements(("exists", kind), rng)
    if tag == "exists":
        r, c = _CELLS[rng.integers(len(_CELLS))]
        return [SceneObject(*caption[1], r, c)]
    if tag == "row":
        return [SceneObject(*caption[1], caption[2], int(rng.integers(GRID_SIZE)))]
    if tag == "column":
        return [SceneObject(*caption[1], int(rng.integers(GRID_SIZE)), caption[2])]
    if tag == "relation":
        _, a, rel, b = caption
        pairs = [(p, q) for p in _CELLS for q in _CELLS if p != q and _relation_holds(p, rel, q)]
        p, q = pairs[rng.integers(len(pairs))]
        return [SceneObject(*a, *p), SceneObject(*b, *q)]
    raise ValueError(f"cannot place caption type {tag!r}")


def sample_scene(rng: np.random.Generator, max_objects: int = 3, min_objects: int = 1,
                 true: Caption | None = None, false: Caption | None = None, max_tries: int = 200) -> Scene:
    """A random scene, optionally conditioned so that caption ``true`` holds and caption ``false`` does not."""
    for _ in range(max_tries):
        objects = _placements(true, rng)
        n = int(rng.integers(max(min_objects, len(objects)), max_objects + 1))
        used_kinds = {o.kind for o in objects}
        used_cells = {(o.row, o.col) for o in objects}
        free = [cell for cell in _CELLS if cell not in used_cells]
        order = rng.permutation(len(free))
        for i in range(n - len(objects)):
            kind = _random_kind(rng, used_kinds)
            used_kinds.add(kind)
            objects.append(SceneObject(*kind, *free[order[i]]))
        scene = Scene(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], tuple(objects))
        if false is None or not caption_holds(false, scene):
            return scene
    raise RuntimeError(f"could not sample a scene where {true!r} holds and {false!r} does not")


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the scene as an RGB image, with small random jitter in position, size and colour."""
    bg = np.clip(np.array(_BACKGROUND_RGB[scene.background]) + rng.integers(-8, 9, 3), 0, 255)
    image = Image.new("RGB", (image_size, image_size), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(image)
    cell = image_size / GRID_SIZE
    for obj in scene.objects:
        radius = cell * rng.uniform(0.3, 0.4)
        cx = (obj.col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (obj.row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        fill = tuple(int(v) for v in np.clip(np.array(_COLOUR_RGB[obj.colour]) + rng.integers(-15, 16, 3), 0, 255))
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=fill)
    return image


def _png(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}


def make_scenes(num_examples: int, seed: int = 0, image_size: int = 32, max_objects: int = 3) -> list[dict]:
    """Random scenes with their rendered images: dicts with ``scene`` (Scene), ``image`` (PIL) and ``captions``."""
    _check_size("num_examples", num_examples)
    _check_scene_args(image_size, max_objects)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), len(TASKS)]))
    out = []
    for _ in range(num_examples):
        scene = sample_scene(rng, max_objects)
        out.append({"scene": scene, "image": render_scene(scene, image_size, rng),
                    "captions": [caption_text(c) for c in true_captions(scene)]})
    return out


# ----------------------------------------------------------------------------------------------- builders


def _check_hypotheses(hypotheses) -> tuple[str, ...]:
    hypotheses = (hypotheses,) if isinstance(hypotheses, str) else tuple(hypotheses)
    bad = [h for h in hypotheses if h not in HYPOTHESIS_TYPES]
    if bad or not hypotheses:
        raise ValueError(f"hypotheses must be a non-empty list of {HYPOTHESIS_TYPES}, got {list(hypotheses)!r}")
    return hypotheses


def _entailment(num_examples: int, rng: np.random.Generator, image_size: int, max_objects: int,
                hypotheses: tuple[str, ...] = DEFAULT_HYPOTHESES) -> datasets.Dataset:
    images, texts, labels = [], [], []
    for _ in range(-(-num_examples // 4)):
        first = _random_caption(rng, max_objects, hypotheses)
        second = _perturb(first, rng)
        x = _png(render_scene(sample_scene(rng, max_objects, true=first, false=second), image_size, rng))
        y = _png(render_scene(sample_scene(rng, max_objects, true=second, false=first), image_size, rng))
        t1, t2 = caption_text(first), caption_text(second)
        for image, text, label in ((x, t1, 1), (y, t1, 0), (y, t2, 1), (x, t2, 0)):
            images.append(image)
            texts.append(text)
            labels.append(label)
    order = rng.permutation(num_examples)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=ENTAILMENT_LABELS)})
    info = datasets.DatasetInfo(features=features, description=(
        "Synthetic visual entailment: does the caption hold for the image? "
        "Each caption text and each image occurs equally often as true and as false."))
    return datasets.Dataset.from_dict(
        {"image": [images[i] for i in order], "text": [texts[i] for i in order],
         "label": [labels[i] for i in order]}, features=features, info=info)


def _multilabel_targets(scene: Scene, colour: str) -> list[float]:
    target = dict.fromkeys(MULTILABEL_NAMES, 0.0)
    for obj in scene.objects:
        if obj.colour != colour:
            continue
        target[obj.shape] = 1.0
        target["top"] = max(target["top"], float(obj.row == 0))
        target["bottom"] = max(target["bottom"], float(obj.row == GRID_SIZE - 1))
        target["left"] = max(target["left"], float(obj.col == 0))
        target["right"] = max(target["right"], float(obj.col == GRID_SIZE - 1))
    return [target[name] for name in MULTILABEL_NAMES]


def _multilabel(num_examples: int, rng: np.random.Generator, image_size: int, max_objects: int,
                ) -> datasets.Dataset:
    images, texts, labels = [], [], []
    for _ in range(num_examples):
        scene = sample_scene(rng, max_objects, min_objects=min(2, max_objects))
        present = sorted({o.colour for o in scene.objects})
        absent = [c for c in COLOURS if c not in present]
        colour = present[rng.integers(len(present))] if rng.random() < 0.8 else absent[rng.integers(len(absent))]
        images.append(_png(render_scene(scene, image_size, rng)))
        texts.append(MULTILABEL_TEMPLATES[rng.integers(len(MULTILABEL_TEMPLATES))].format(colour=colour))
        labels.append(_multilabel_targets(scene, colour))
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "labels": datasets.Sequence(datasets.Value("float32"),
                                                              length=len(MULTILABEL_NAMES))})
    info = datasets.DatasetInfo(features=features, description=(
        "Synthetic multi-label: for the objects of the colour named in the text, labels "
        + ", ".join(MULTILABEL_NAMES) + " (shape present; in top row, bottom row, left column, right column)."))
    return datasets.Dataset.from_dict({"image": images, "text": texts, "labels": labels},
                                      features=features, info=info)


def _retrieval(num_examples: int, rng: np.random.Generator, image_size: int, max_objects: int,
               captions_per_image: int, id_offset: int = 0) -> datasets.Dataset:
    images, captions, ids = [], [], []
    seen: set[tuple] = set()
    for i in range(num_examples):
        for _ in range(1000):
            scene = sample_scene(rng, max_objects)
            if scene.key() not in seen:
                break
        else:
            raise ValueError(f"cannot draw {num_examples} distinct scenes with max_objects={max_objects}")
        seen.add(scene.key())
        candidates = true_captions(scene)
        chosen = [candidates[0]] + [candidates[j] for j in
                                    1 + rng.choice(len(candidates) - 1, captions_per_image - 1, replace=False)]
        images.append(_png(render_scene(scene, image_size, rng)))
        captions.append([caption_text(chosen[j]) for j in rng.permutation(len(chosen))])
        ids.append(id_offset + i)
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string")),
                                  "image_id": datasets.Value("int64")})
    info = datasets.DatasetInfo(features=features, description=(
        "Synthetic caption <-> image retrieval: distinct scenes, each with "
        f"{captions_per_image} distinct true captions."))
    return datasets.Dataset.from_dict({"image": images, "captions": captions, "image_id": ids},
                                      features=features, info=info)


def build_entailment_dataset(num_examples: int, seed: int = 0, image_size: int = 32, max_objects: int = 3,
                             hypotheses: tuple[str, ...] = DEFAULT_HYPOTHESES) -> datasets.Dataset:
    """Visual entailment (SNLI-VE-like): ``image``, ``text`` hypothesis, ``label`` (contradiction/entailment).

    ``hypotheses`` picks the caption types (``HYPOTHESIS_TYPES``): ``colour`` ("there is a red shape", the
    default), ``shape`` ("there is a circle"), ``exists`` ("there is a red circle"), ``row`` / ``column`` ("a red
    circle is in the top row") and ``relation`` ("a red circle is left of a blue square"); the later ones need finer
    spatial reading than tiny frozen encoders give.

    Examples come in groups of four: a random caption A, a near-miss B of it (one colour, shape, row, column or
    relation changed), an image X where A holds and B does not, an image Y where B holds and A does not, giving
    (X, A, 1), (Y, A, 0), (Y, B, 1), (X, B, 0). So each caption text and each image is true exactly as often as
    false (exact when ``num_examples`` is a multiple of 4), and only the pairing decides the label.
    """
    _check_size("num_examples", num_examples)
    _check_scene_args(image_size, max_objects)
    hypotheses = _check_hypotheses(hypotheses)
    return _entailment(num_examples, _rng(seed, "entailment"), image_size, max_objects, hypotheses)


def build_multilabel_dataset(num_examples: int, seed: int = 0, image_size: int = 32,
                             max_objects: int = 3) -> datasets.Dataset:
    """Multi-label (MM-IMDB-like): ``image``, ``text`` naming a colour, ``labels`` (0/1 floats per MULTILABEL_NAMES).

    Label j is 1 when some object of the named colour is a circle/square/triangle (j = 0..2) or lies in the top
    row, bottom row, left column or right column (j = 3..6). Scenes hold at least two objects, so the image alone
    does not say which object is meant, and the colour alone says nothing about its shape or place.
    """
    _check_size("num_examples", num_examples)
    _check_scene_args(image_size, max_objects)
    return _multilabel(num_examples, _rng(seed, "multilabel"), image_size, max_objects)


def build_retrieval_dataset(num_examples: int, seed: int = 0, image_size: int = 32, captions_per_image: int = 2,
                            max_objects: int = 3) -> datasets.Dataset:
    """Caption <-> image retrieval (COCO-like): ``image``, ``captions`` (distinct true captions), ``image_id``.

    Scenes are distinct. The first listed description of every image names all its objects; the others are true
    existence, position, count or relation statements about it, in random order.
    """
    _check_size("num_examples", num_examples)
    _check_scene_args(image_size, max_objects)
    if not isinstance(captions_per_image, (int, np.integer)) or not 1 <= captions_per_image <= MAX_CAPTIONS_PER_IMAGE:
        raise ValueError(f"captions_per_image must be an integer in [1, {MAX_CAPTIONS_PER_IMAGE}], "
                         f"got {captions_per_image!r}")
    return _retrieval(num_examples, _rng(seed, "retrieval"), image_size, max_objects, captions_per_image)


def build_synthetic_splits(task: str, train_size: int, eval_size: int, seed: int = 0, image_size: int = 32,
                           **kwargs) -> datasets.DatasetDict:
    """``train`` and ``validation`` splits of one synthetic task; ``train`` equals the task's builder at ``seed``.

    Extra keyword arguments (``max_objects``; ``hypotheses`` for entailment, ``captions_per_image`` for retrieval)
    go to the builder. Retrieval image ids of the validation split continue after those of the train split.
    """
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; valid choices: {', '.join(TASKS)}")
    _check_size("train_size", train_size)
    _check_size("eval_size", eval_size)
    max_objects = kwargs.pop("max_objects", 3)
    _check_scene_args(image_size, max_objects)
    if task == "retrieval":
        captions_per_image = kwargs.pop("captions_per_image", 2)
    if task == "entailment":
        hypotheses = _check_hypotheses(kwargs.pop("hypotheses", DEFAULT_HYPOTHESES))
    if kwargs:
        raise TypeError(f"unexpected arguments for task {task!r}: {', '.join(sorted(kwargs))}")
    if task == "entailment":
        train = build_entailment_dataset(train_size, seed, image_size, max_objects, hypotheses)
        validation = _entailment(eval_size, _rng(seed, task, 1), image_size, max_objects, hypotheses)
    elif task == "multilabel":
        train = build_multilabel_dataset(train_size, seed, image_size, max_objects)
        validation = _multilabel(eval_size, _rng(seed, task, 1), image_size, max_objects)
    else:
        train = build_retrieval_dataset(train_size, seed, image_size, captions_per_image, max_objects)
        validation = _retrieval(eval_size, _rng(seed, task, 1), image_size, max_objects, captions_per_image,
                                id_offset=train_size)
    return datasets.DatasetDict({"train": train, "validation": validation})


# ---------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(model_max_length: int = 32):
    """BERT-style WordLevel tokenizer over CAPTION_VOCABULARY: lower-cases, splits on whitespace and punctuation,
    wraps texts as ``[CLS] ... [SEP]`` and pads on the right with ``[PAD]`` (id 0).

    Returns a ``transformers.PreTrainedTokenizerFast`` that saves and reloads offline with ``AutoTokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *CAPTION_VOCABULARY])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(),
                                                 normalizers.StripAccents()])
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=model_max_length, padding_side="right",
        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")

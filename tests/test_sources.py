"""Checkpoint sources: sharded and half-precision safetensors, the hub cache, and what is refused."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from edgellama.errors import EdgeLlamaError
from edgellama.export.model import Llama
from edgellama.export.safetensors_io import SafetensorsFile, read_header, save_file
from edgellama.export.sources import load_source
from helpers import (
    copy_tokenizer,
    corrupt_safetensors,
    fake_hub_snapshot,
    hf_logits,
    link_folder,
    random_ids,
    write_pickle_checkpoint,
)

TOL = 1e-3


def reference_tensors(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()
            if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}


def our_logits(folder, ids) -> np.ndarray:
    with torch.inference_mode():
        return Llama.from_source(load_source(folder))(torch.tensor([ids]))[0].numpy()


def test_sharded_checkpoint_with_index(tiny_llama, tmp_path):
    m = tiny_llama("mha")  # untied: lm_head is a tensor of its own, in its own shard
    tensors = reference_tensors(m.hf)
    names = sorted(tensors)
    shards = {"model-00001-of-00003.safetensors": names[: len(names) // 2],
              "model-00002-of-00003.safetensors": names[len(names) // 2: -1],
              "model-00003-of-00003.safetensors": names[-1:]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(m.folder / "config.json", folder)
    copy_tokenizer(m.folder, folder)
    # A stray file that the index does not list must not be read.
    save_file({"model.norm.weight": np.zeros(3, np.float32)}, folder / "stray.safetensors")

    src = load_source(folder)
    assert sorted(src.tensors.names()) == names
    for k in names:
        np.testing.assert_array_equal(src.tensors.get(k), tensors[k])
    ids = random_ids(20, seed=2)
    assert np.abs(our_logits(folder, ids) - hf_logits(m.hf, ids)).max() <= TOL

    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(EdgeLlamaError, match="model-00002-of-00003.safetensors.*missing"):
        load_source(folder)


def test_save_file_is_standard_safetensors(tmp_path):
    """What our writer produces, the reference safetensors library reads back bit for bit."""
    from safetensors.numpy import load_file

    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1.5, -2], np.float16),
              "c": np.array([[7]], np.int64)}
    save_file(arrays, tmp_path / "x.safetensors", metadata={"k": "v"})
    back = load_file(tmp_path / "x.safetensors")
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)
    assert SafetensorsFile(tmp_path / "x.safetensors").metadata == {"k": "v"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(tiny_llama, tmp_path, dtype):
    from safetensors.torch import save_file as torch_save_file

    m = tiny_llama("gqa4")
    state = {k: v.to(dtype).contiguous() for k, v in m.hf.state_dict().items() if k != "lm_head.weight"}
    folder = link_folder(m.folder, tmp_path / "half", copy=("config.json",))
    (folder / "model.safetensors").unlink()
    torch_save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    infos, _, _ = read_header(folder / "model.safetensors")
    assert {i.dtype for i in infos.values()} == {"BF16" if dtype == torch.bfloat16 else "F16"}

    src = load_source(folder)
    for k, v in state.items():  # widened to float32 exactly
        np.testing.assert_array_equal(src.tensors.get(k), v.float().numpy())
    # Against transformers running the same rounded weights.
    ref_model = type(m.hf)(m.hf.config).eval()
    ref_model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    ref_model.tie_weights()
    ids = random_ids(20, seed=3)
    assert np.abs(our_logits(folder, ids) - hf_logits(ref_model, ids)).max() <= TOL


def test_hub_id_resolves_through_the_offline_cache(tiny_llama, tmp_path, monkeypatch):
    from huggingface_hub import constants

    m = tiny_llama("gqa4")
    cache = tmp_path / "hub"
    snap = fake_hub_snapshot(cache, "tiny-org/tiny-llama3", m.folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import time: patch the live values too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    src = load_source("tiny-org/tiny-llama3")
    assert src.description == "hub:tiny-org/tiny-llama3"
    assert src.config == load_source(m.folder).config
    assert src.tokenizer_json is not None
    name = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(src.tensors.get(name), m.hf.state_dict()[name].numpy())
    assert snap.is_dir()

    with pytest.raises(EdgeLlamaError, match="cannot fetch 'tiny-org/absent'"):
        load_source("tiny-org/absent")


def test_hub_export_records_the_hub_id(tiny_llama, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from edgellama.cli import main
    from edgellama.runtime.bundle import read_manifest

    cache = tmp_path / "hub"
    fake_hub_snapshot(cache, "tiny-org/tiny-llama3", tiny_llama("gqa3").folder)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert main(["export", "tiny-org/tiny-llama3", "-o", str(tmp_path / "b"), "--max-context", "64"]) == 0
    assert read_manifest(tmp_path / "b").source == "hub:tiny-org/tiny-llama3"


def test_pickle_checkpoints_are_refused_unopened(tiny_llama, tmp_path):
    marker = tmp_path / "unpickled.marker"
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_llama("gqa4").folder / "config.json", folder)
    bin_path = write_pickle_checkpoint(folder / "pytorch_model.bin", marker)
    for target in (folder, bin_path):
        with pytest.raises(EdgeLlamaError, match="pytorch_model.bin is a pickle checkpoint"):
            load_source(target)
    assert not marker.exists()
    # The payload is live: unpickling it would have created the marker.
    pickle.loads(bin_path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("how, message", [
    ("truncate", "truncated"),
    ("offsets", "offsets"),
    ("shape", "does not match its"),
])
def test_corrupt_safetensors_refused_before_reading(tiny_llama, tmp_path, how, message):
    m = tiny_llama("gqa4")
    folder = link_folder(m.folder, tmp_path / how, copy=("config.json", "model.safetensors"))
    corrupt_safetensors(folder / "model.safetensors", how)
    with pytest.raises(EdgeLlamaError, match=message):
        load_source(folder)


def test_safetensors_header_lies_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": np.zeros((4, 4), np.float32), "b": np.ones(4, np.float32)}, path)

    def rewrite(edit):
        from helpers import rewrite_safetensors_header

        save_file({"a": np.zeros((4, 4), np.float32), "b": np.ones(4, np.float32)}, path)
        rewrite_safetensors_header(path, edit)

    rewrite(lambda h: h["b"].update(data_offsets=[0, 16]))
    with pytest.raises(EdgeLlamaError, match="overlaps"):
        SafetensorsFile(path)
    rewrite(lambda h: h["a"].update(dtype="Q7"))
    with pytest.raises(EdgeLlamaError, match="unsupported dtype"):
        SafetensorsFile(path)
    rewrite(lambda h: h["a"].update(shape=[4, -4]))
    with pytest.raises(EdgeLlamaError, match="invalid shape"):
        SafetensorsFile(path)
    path.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(EdgeLlamaError, match="exceeds file size"):
        SafetensorsFile(path)
    path.write_bytes((8).to_bytes(8, "little") + b"not json")
    with pytest.raises(EdgeLlamaError, match="not JSON"):
        SafetensorsFile(path)


def test_source_dispatch(tiny_llama, tmp_path):
    m = tiny_llama("gqa4")
    assert load_source(m.folder / "config.json").config == load_source(m.folder).config
    with pytest.raises(EdgeLlamaError, match="known alias"):
        load_source("smollm9-unknown")
    with pytest.raises(EdgeLlamaError, match="not found"):
        load_source(tmp_path / "absent")
    (tmp_path / "weights.npz").write_bytes(b"PK\x03\x04")
    with pytest.raises(EdgeLlamaError, match="unrecognised source file"):
        load_source(tmp_path / "weights.npz")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(m.folder / "config.json", empty)
    with pytest.raises(EdgeLlamaError, match="no \\*.safetensors"):
        load_source(empty)


def test_transformers5_chat_template_file_is_read(tiny_llama, tmp_path):
    folder = link_folder(tiny_llama("gqa4").folder, tmp_path / "tpl")
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_source(folder).chat_template == "{{ messages[0]['content'] }}"

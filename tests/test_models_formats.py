"""Weight formats without the foreign libraries: detection, strict adapters (errors name the key),
safetensors metadata, HF folders, the export command, and exporting a non-default head count."""
from __future__ import annotations

import json

import pytest
import torch
from test_models_reference import meta_model, photo_batch, randomized_state

from dinov2.cli import main
from dinov2.models import CheckpointError, DinoVisionTransformer, export_official, load_pretrained, vit_small
from dinov2.models.export import export_weights
from dinov2.models.formats import adapter, detect_format


def tiny_state(registers: int = 0, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    model = meta_model(DinoVisionTransformer, img_size=56, patch_size=14, embed_dim=64, depth=2,
                       num_register_tokens=registers, **kwargs)
    return randomized_state(model, seed=seed)


def features(model, size=56):
    with torch.no_grad():
        out = model.forward_features(photo_batch(size, size, count=2))
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], dim=1)


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("fmt", ["official", "hf", "timm"])
def test_adapters_round_trip_and_detection(fmt, registers):
    state = tiny_state(registers)
    foreign = adapter(fmt).from_official(state)
    assert detect_format(foreign) == fmt
    back, hints = adapter(fmt).to_official(dict(foreign))
    assert set(back) == set(state)
    for key, value in state.items():
        if fmt == "timm" and key in ("cls_token", "pos_embed", "mask_token") and (registers or key == "mask_token"):
            continue  # timm folds the CLS position into cls_token and drops mask_token
        assert torch.equal(back[key], value), key
    if fmt == "hf":
        assert "encoder.layer.1.attention.attention.key.weight" in foreign and "layernorm.bias" in foreign
        assert hints == {"interpolate_offset": 0.0, "interpolate_antialias": bool(registers)}
    if fmt == "timm":
        assert "mask_token" not in foreign and ("reg_token" in foreign) == bool(registers)
        assert foreign["pos_embed"].shape[1] == (16 if registers else 17)


def test_dino2021_and_official_are_not_mistaken_for_timm():
    assert detect_format(tiny_state()) == "official"
    no_ls = tiny_state(init_values=None)
    del no_ls["mask_token"]
    assert detect_format(no_ls) == "official"  # DINO (2021): no mask_token, no LayerScale
    timm_like = tiny_state()
    del timm_like["mask_token"]
    assert detect_format(timm_like) == "timm"


@pytest.mark.parametrize("fmt", ["hf", "timm"])
def test_foreign_errors_name_the_key(fmt):
    good = adapter(fmt).from_official(tiny_state())
    unmapped = {**good, "encoder.layer.0.attention.bogus.weight" if fmt == "hf" else "head.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="do not map.*(bogus|head.weight)"):
        load_pretrained(unmapped)
    missing_key = "encoder.layer.1.mlp.fc2.bias" if fmt == "hf" else "blocks.1.mlp.fc2.bias"
    missing = {k: v for k, v in good.items() if k != missing_key}
    with pytest.raises(CheckpointError, match=rf"missing keys: '{missing_key}'"):
        load_pretrained(missing)
    wrong_key = "encoder.layer.0.norm2.weight" if fmt == "hf" else "blocks.0.norm2.weight"
    wrong = {**good, wrong_key: torch.ones(65)}
    with pytest.raises(CheckpointError, match=rf"shape mismatches: '{wrong_key}: file \(65,\) vs model \(64,\)"):
        load_pretrained(wrong)


def test_hf_split_qkv_must_be_complete_and_consistent():
    good = adapter("hf").from_official(tiny_state())
    no_value = {k: v for k, v in good.items() if k != "encoder.layer.1.attention.attention.value.bias"}
    with pytest.raises(CheckpointError, match="missing 'encoder.layer.1.attention.attention.value.bias'"):
        load_pretrained(no_value)
    bad = {**good, "encoder.layer.0.attention.attention.key.weight": torch.zeros(32, 64)}
    with pytest.raises(CheckpointError, match="encoder.layer.0.attention.attention.query/key/value.weight"):
        load_pretrained(bad)
    # transformers 5 in-memory names (q_proj / k_proj / v_proj / o_proj) read the same.
    renamed = {
        k.replace("attention.attention.query", "attention.q_proj").replace("attention.attention.key", "attention.k_proj")
        .replace("attention.attention.value", "attention.v_proj").replace("attention.output.dense", "attention.o_proj"): v
        for k, v in good.items()
    }
    a, b = load_pretrained(good), load_pretrained(renamed)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("registers", [0, 4])
def test_official_safetensors_records_what_tensors_cannot(tmp_path, registers):
    state = tiny_state(registers, num_heads=4, norm_eps=1e-5)
    model = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4, norm_eps=1e-5,
                                  num_register_tokens=registers, interpolate_offset=0.1)
    model.load_state_dict(state)
    export_weights(model, tmp_path / "w.safetensors", "official")
    loaded = load_pretrained(tmp_path / "w.safetensors")
    assert (loaded.num_heads, loaded.norm.eps, loaded.interpolate_offset) == (4, 1e-5, 0.1)
    assert loaded.interpolate_antialias is False  # recorded, not re-derived from the registers
    assert all(torch.equal(a, b) for a, b in zip(export_official(loaded).values(), state.values()))
    for size in (56, 84):  # native grid and a resized one
        assert torch.equal(features(loaded, size), features(model, size))
    # Overrides still win (e.g. the head count for a file written elsewhere).
    assert load_pretrained(tmp_path / "w.safetensors", num_heads=2).num_heads == 2


def test_hf_folder_written_and_read_back(tmp_path):
    model = load_pretrained(tiny_state(4))
    res = export_weights(model, tmp_path / "hf", "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "dinov2_with_registers" and config["num_register_tokens"] == 4
    assert config["num_attention_heads"] == 1 and res.tensors == len(adapter("hf").from_official(tiny_state(4)))
    again = load_pretrained(tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(export_official(again).values(), export_official(model).values()))
    # config.json and tensors must agree.
    config["num_hidden_layers"] = 3
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="depth: config 3 vs tensors 2"):
        load_pretrained(tmp_path / "hf")
    config["model_type"] = "vit"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type 'vit' is not one of"):
        load_pretrained(tmp_path / "hf")


def test_bad_safetensors_and_hf_folders_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(tmp_path / "junk.safetensors")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "dinov2"}')
    with pytest.raises(CheckpointError, match="has config.json but none of model.safetensors"):
        load_pretrained(tmp_path / "hf")
    assert main(["export", str(tmp_path / "junk.safetensors"), str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dinov2 export: error:") and "\n" not in err and "Traceback" not in err


def test_export_command_all_formats(tmp_path):
    src = tmp_path / "src.pth"
    torch.save(randomized_state(meta_model(vit_small, depth=2, img_size=56), seed=1), src)
    reference = load_pretrained(src)
    for fmt, out in [("official", "o.pth"), ("official", "o.safetensors"), ("timm", "t.pth"),
                     ("timm", "t.safetensors"), ("hf", "hf_out")]:
        assert main(["export", str(src), str(tmp_path / out), "--format", fmt]) == 0
        loaded = load_pretrained(tmp_path / out)
        assert all(torch.equal(a, b) for a, b in zip(export_official(loaded).values(),
                                                     export_official(reference).values())) or fmt == "timm", out
        assert torch.allclose(features(loaded), features(reference), atol=1e-5), out
    assert main(["export", str(src), str(tmp_path / "x.pth"), "--format", "hf"]) == 2  # hf is a folder
    hub = torch.load(tmp_path / "o.pth", weights_only=True)
    assert list(hub) == list(export_official(reference))


# ------------------------------------------------------------------- non-default head count (issue 13)
@pytest.mark.slow
def test_run_with_non_default_heads_exports_exactly_or_refuses(tmp_path, capsys):
    from test_train_distributed import CONFIG, GSIZE, run, tiny_overrides

    from dinov2.train.checkpoint import load_teacher_backbone_state
    from dinov2.train.config import load_train_config
    from dinov2.train.ssl_meta_arch import build_backbone

    out = tmp_path / "run"
    run(out, 2, ["model.num_register_tokens=2"])  # width 64 with 2 heads (the width's default is 1)
    cfg = load_train_config(CONFIG, tiny_overrides(out, 2, ["model.num_register_tokens=2"]))
    teacher = build_backbone(cfg.model, GSIZE, 0.0).eval()
    teacher.load_state_dict(load_teacher_backbone_state(out))
    assert teacher.num_heads == 2
    # The old behaviour (heads from the width) really computes different features.
    assert not torch.allclose(features(load_pretrained(load_teacher_backbone_state(out)), GSIZE),
                              features(teacher, GSIZE), atol=1e-3)
    for size in (GSIZE, 56):  # the training grid and a resized one (the run's resize mode)
        assert torch.equal(features(load_pretrained(out), size), features(teacher, size))

    assert main(["export", str(out), str(tmp_path / "t.pth")]) == 2
    err = capsys.readouterr().err
    assert "2 attention heads" in err and "write a .safetensors file or --format hf" in err
    assert not (tmp_path / "t.pth").exists()
    assert main(["export", str(out), str(tmp_path / "t.pth"), "--format", "timm"]) == 2
    for fmt, name in [("official", "t.safetensors"), ("hf", "t_hf"), ("timm", "timm.safetensors")]:
        assert main(["export", str(out), str(tmp_path / name), "--format", fmt]) == 0
        loaded = load_pretrained(tmp_path / name)
        assert loaded.num_heads == 2
        assert torch.equal(features(loaded, GSIZE), features(teacher, GSIZE)), fmt
    for name in ("t.safetensors", "t_hf", "timm.safetensors"):  # the run's resize rule is recorded too
        assert torch.equal(features(load_pretrained(tmp_path / name), 56), features(teacher, 56)), name
    # A bare .pth written elsewhere loads with an explicit override.
    torch.save(export_official(teacher), tmp_path / "bare.pth")
    assert torch.equal(features(load_pretrained(tmp_path / "bare.pth", num_heads=2,
                                                interpolate_antialias=False, interpolate_offset=0.1), GSIZE),
                       features(teacher, GSIZE))

"""Config loading, atomic writes and robust decoding (shared utilities)."""
import io
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image

from dinov2.data.decode import DecodeError, decode_image
from dinov2.utils.config import ConfigError, load_config
from dinov2.utils.io import atomic_open, atomic_write_json


@dataclass
class Inner:
    lr: float = 0.1
    name: str = "a"


@dataclass
class Outer:
    steps: int = 10
    inner: Inner = field(default_factory=Inner)
    tags: list = field(default_factory=list)

    def validate(self):
        if self.steps <= 0:
            raise ConfigError("steps must be positive")


def test_load_defaults_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\ninner:\n  lr: 0.5\n")
    cfg = load_config(Outer, p, ["inner.name=b", "tags=[1,2]"])
    assert isinstance(cfg, Outer) and isinstance(cfg.inner, Inner)
    assert (cfg.steps, cfg.inner.lr, cfg.inner.name, cfg.tags) == (5, 0.5, "b", [1, 2])


def test_unknown_key_in_file_names_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  lrr: 0.5\n")
    with pytest.raises(ConfigError, match="lrr"):
        load_config(Outer, p)


def test_unknown_override_and_wrong_type_name_key():
    with pytest.raises(ConfigError, match="inner.bogus"):
        load_config(Outer, None, ["inner.bogus=1"])
    with pytest.raises(ConfigError, match="steps"):
        load_config(Outer, None, ["steps=notanint"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Outer, None, ["steps"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, None, ["tags=[{a: /x/{0..3}.tar}]"])
    assert load_config(Outer, None, ["tags=[{a: '/x/{0..3}.tar'}]"]).tags == [{"a": "/x/{0..3}.tar"}]
    with pytest.raises(ConfigError, match="positive"):
        load_config(Outer, None, ["steps=0"])


@dataclass
class WithDict:
    named: dict = field(default_factory=dict)
    embedders: "dict[str, Inner]" = field(default_factory=dict)


def test_new_entries_in_dict_nodes_get_schema_defaults():
    cfg = load_config(WithDict, None, ["embedders.big.name=vit", "named.x=[1,2]"])
    assert cfg.embedders["big"] == Inner(lr=0.1, name="vit")
    assert cfg.named == {"x": [1, 2]}
    with pytest.raises(ConfigError, match="embedders.big.bogus"):
        load_config(WithDict, None, ["embedders.big.bogus=1"])


def test_atomic_open_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_open(target, "wb") as f:
        f.write(b"partial")
        raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decode_odd_modes_and_failures():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    assert decode_image(_encode(rgb.convert("CMYK"), "JPEG")).image.mode == "RGB"
    sixteen = Image.fromarray((np.arange(40 * 60).reshape(40, 60) * 20).astype(np.uint16))
    out = decode_image(_encode(sixteen, "PNG"))
    # 16-bit values are scaled from the full 0..65535 range, not clipped at 255.
    assert out.image.mode == "RGB" and np.asarray(out.image).max() == 47980 * 255 // 65535
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)
    assert np.asarray(decode_image(_encode(rgba, "PNG")).image).min() == 255  # composited on white
    assert decode_image(_encode(rgb.convert("P"), "PNG")).image.mode == "RGB"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: width and height swap
    rotated = decode_image(_encode(rgb, "JPEG", exif=exif.tobytes()))
    assert (rotated.width, rotated.height) == (40, 60)
    jpeg = _encode(rgb, "JPEG")
    for data, reason in [(b"", "empty"), (b"not an image", "not_an_image"), (jpeg[: len(jpeg) // 2], "truncated")]:
        with pytest.raises(DecodeError) as e:
            decode_image(data)
        assert e.value.reason == reason
    with pytest.raises(DecodeError) as e:
        decode_image(jpeg, max_pixels=100)
    assert e.value.reason == "too_large"

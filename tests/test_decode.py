"""Decoding what real folders contain: the real quirks in ../shared/data/quirks plus files made here."""
import csv
import io

import numpy as np
import pytest
from PIL import Image

from framework.data.dataset import ImageError, decode


def _quirks(data_root):
    with open(data_root / "quirks" / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_every_real_quirk_decodes_to_rgb_of_the_right_size(data_root):
    rows = _quirks(data_root)
    assert len(rows) == 10
    for r in rows:
        img = decode(str(data_root / "quirks" / r["path"]))
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, r["path"]
        if r["width"]:
            assert img.shape[1] == int(r["width"]) and img.shape[0] == int(r["height"]), r["path"]


def test_transparency_is_flattened_onto_white(data_root):
    palette = decode(str(data_root / "quirks" / "files" / "with_mask014.png"))  # P mode, ~58% transparent
    rgba_as_jpg = decode(str(data_root / "quirks" / "files" / "with_mask129.jpg"))  # PNG bytes, .jpg name
    for img in (palette, rgba_as_jpg):
        assert (img == 255).all(axis=2).mean() > 0.3  # transparent areas became white, not black


def _save(path, image, fmt, **kw):
    image.save(path, fmt, **kw)
    return str(path)


def test_odd_but_valid_images_decode_upright_and_rgb(tmp_path):
    gray = _save(tmp_path / "g.png", Image.new("L", (10, 6), 128), "PNG")
    assert decode(gray).shape == (6, 10, 3)
    deep = _save(tmp_path / "d.png", Image.fromarray(np.full((5, 7), 65535, np.uint16)), "PNG")
    assert decode(deep).shape == (5, 7, 3) and decode(deep).max() == 255
    cmyk = _save(tmp_path / "c.jpg", Image.new("CMYK", (8, 4), (0, 255, 255, 0)), "JPEG")
    red = decode(cmyk)
    assert red.shape == (4, 8, 3) and red[..., 0].mean() > 200 and red[..., 1].mean() < 60
    # EXIF orientation 6 = rotate 90 degrees clockwise to display: a 20x10 stored image shows as 10x20
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _save(tmp_path / "r.jpg", Image.new("RGB", (20, 10), "blue"), "JPEG", exif=exif)
    assert decode(rotated).shape == (20, 10, 3)
    webp = _save(tmp_path / "w.webp", Image.new("RGB", (9, 9), "green"), "WEBP")
    assert decode(webp).shape == (9, 9, 3)
    spaced = _save(tmp_path / "naïve name (1).png", Image.new("RGB", (3, 3)), "PNG")
    assert decode(spaced).shape == (3, 3, 3)


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"this is not an image at all", "not a readable image"),
])
def test_broken_files_raise_a_clear_image_error(tmp_path, content, reason):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageError) as e:
        decode(str(p))
    assert reason in e.value.reason and e.value.path == str(p)


def test_truncated_jpeg_is_an_image_error(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError):
        decode(str(p))


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    import framework.data.dataset as ds

    p = _save(tmp_path / "big.png", Image.new("RGB", (400, 300)), "PNG")
    monkeypatch.setattr(ds, "MAX_PIXELS", 100_000)
    with pytest.raises(ImageError) as e:
        decode(p)
    assert "limit" in e.value.reason

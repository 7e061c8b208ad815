import numpy as np
import pytest
from PIL import Image

from epsanet.data import load_image, to_rgb


def _save(img, tmp_path, name='x.png', **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_rgb_is_unchanged(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = load_image(_save(Image.fromarray(arr), tmp_path))
    assert out.mode == 'RGB' and out.size == (7, 5)
    assert np.array_equal(np.asarray(out), arr)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    arr = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    out = np.asarray(load_image(_save(Image.fromarray(arr, 'L'), tmp_path)))
    assert out.shape == (4, 5, 3)
    for c in range(3):
        assert np.array_equal(out[..., c], arr)


def test_16bit_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path)
    assert Image.open(path).mode.startswith('I')
    out = np.asarray(load_image(path))[..., 0]
    assert out.tolist() == [[0, 128, 255]]  # PIL's own convert('RGB') would give [0, 255, 255]


def test_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0, 255)   # opaque red
    arr[0, 1] = (0, 0, 0, 0)       # fully transparent black
    arr[1, 0] = (0, 0, 0, 128)     # half transparent black
    out = np.asarray(load_image(_save(Image.fromarray(arr, 'RGBA'), tmp_path)))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert 120 <= out[1, 0, 0] <= 135


def test_palette_with_and_without_transparency(tmp_path):
    img = Image.new('P', (3, 1))
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((0, 0), 1)
    out = np.asarray(load_image(_save(img, tmp_path, 'p.png')))
    assert out[0, 0].tolist() == [10, 200, 30] and out[0, 1].tolist() == [0, 0, 0]
    out = np.asarray(load_image(_save(img, tmp_path, 't.png', transparency=0)))
    assert out[0, 0].tolist() == [10, 200, 30] and out[0, 1].tolist() == [255, 255, 255]


def test_float_and_cmyk_modes():
    f = to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), 'F'))
    assert np.asarray(f)[0, :, 0].tolist() == [0, 128, 255]
    cmyk = to_rgb(Image.new('CMYK', (2, 2), (0, 0, 0, 0)))
    assert cmyk.mode == 'RGB' and np.asarray(cmyk)[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize('content', [b'', b'not an image at all', None])
def test_unreadable_files_raise(tmp_path, content):
    path = tmp_path / 'bad.png'
    if content is None:  # a real PNG cut in half
        _save(Image.new('RGB', (64, 64), (1, 2, 3)), tmp_path, 'bad.png')
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises((OSError, ValueError, SyntaxError)):
        load_image(path)

"""Every image a dataset can hold is read as it is displayed, with the right pixel values, or
refused naming its row: modes, bit depths, transparency, EXIF orientation, broken bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from diffalign.data.preference import load_image
from diffalign.inpainting import image_tensor

PROPERTY = settings(max_examples=30, deadline=None, derandomize=True)


def _bytes(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@PROPERTY
@given(arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9), st.just(3))))
def test_rgb_values_are_read_exactly(pixels: np.ndarray) -> None:
    read = load_image(_bytes(Image.fromarray(pixels)), "row 0")
    assert torch.equal(read, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)


@PROPERTY
@given(arrays(np.uint16, st.tuples(st.integers(1, 9), st.integers(1, 9))))
def test_16_bit_greys_keep_their_range(pixels: np.ndarray) -> None:
    """PIL's convert would clip every value above 255 to white."""
    expected = torch.from_numpy(pixels.astype(np.float32) / 65535)
    read = load_image(_bytes(Image.fromarray(pixels)), "row 0")
    assert torch.allclose(read, expected.expand(3, -1, -1), atol=1e-6)
    assert torch.allclose(
        load_image(_bytes(Image.fromarray(pixels)), "row 0", grey=True)[0], expected, atol=1e-6
    )


@PROPERTY
@given(
    arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 6), st.just(3))),
    arrays(np.uint8, st.tuples(st.just(1))),
)
def test_transparency_is_composited_over_white(rgb: np.ndarray, alpha: np.ndarray) -> None:
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), alpha[0], np.uint8)], axis=2)
    read = load_image(_bytes(Image.fromarray(rgba, "RGBA")), "row 0")
    a = alpha[0] / 255
    expected = torch.from_numpy(rgb).permute(2, 0, 1).double() / 255 * a + (1 - a)
    assert torch.allclose(read.double(), expected, atol=1.5 / 255)  # PIL composites in 8-bit integers


def test_greyscale_palette_cmyk_and_bilevel_images() -> None:
    grey = np.array([[0, 128], [255, 7]], np.uint8)
    assert torch.equal(
        load_image(_bytes(Image.fromarray(grey)), "r"), torch.from_numpy(grey / 255).float().expand(3, -1, -1)
    )
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [9, 9, 9]]], np.uint8)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert torch.equal(load_image(_bytes(palette), "r"), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # no black, full magenta and yellow: red
    assert torch.equal(
        load_image(_bytes(cmyk, "TIFF"), "r"), torch.tensor([1.0, 0, 0])[:, None, None].expand(3, 2, 2)
    )
    bilevel = Image.fromarray(np.array([[True, False]]))
    assert torch.equal(load_image(_bytes(bilevel), "r", grey=True), torch.tensor([[[1.0, 0.0]]]))


def test_a_palette_transparent_colour_is_white() -> None:
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 200, 0, 0])
    read = load_image(_bytes(palette, transparency=0), "r")
    assert torch.equal(read[:, 0, 0], torch.ones(3))
    assert torch.equal(read[:, 0, 1], torch.tensor([200.0, 0, 0]) / 255)


@pytest.mark.parametrize(("orientation", "turn"), [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(orientation: int, turn: int) -> None:
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    exif = Image.Exif()
    exif[0x0112] = orientation
    read = load_image(_bytes(Image.fromarray(pixels), exif=exif), "r")
    upright = np.rot90(pixels, k=turn).copy()  # orientation 6: the camera was turned, turn back clockwise
    assert torch.equal(read, torch.from_numpy(upright).permute(2, 0, 1).float() / 255)


def test_the_python_api_reads_pil_images_as_files_are_read() -> None:
    rgba = Image.fromarray(np.array([[[255, 0, 0, 0], [0, 0, 255, 255]]], np.uint8), "RGBA")
    assert torch.equal(image_tensor(rgba), load_image(_bytes(rgba), "r"))
    assert torch.equal(image_tensor(rgba)[:, 0, 0], torch.ones(3))


@pytest.mark.parametrize(
    "content",
    [b"", b"not an image", _bytes(Image.new("RGB", (8, 8)))[:40], b"\x89PNG\r\n\x1a\n" + b"\0" * 30],
)
def test_broken_bytes_name_the_row(content: bytes) -> None:
    with pytest.raises(ValueError, match=r"row 7 of pairs\.jsonl: cannot decode image \(embedded bytes\)"):
        load_image(content, "row 7 of pairs.jsonl")

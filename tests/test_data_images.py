import os

import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

from data import ImageLoadError, dynamic_preprocess, load_image
from data.images import (IMAGENET_MEAN, IMAGENET_STD, choose_grid, dummy_pixel_values, header_size,
                         images_to_pixel_values, num_tiles, target_ratios, to_tensor)

FIX = os.path.join(os.path.dirname(__file__), "fixtures")

# the official candidate order for max_num 12 (CPython set iteration order within equal products)
OFFICIAL_ORDER_12 = [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1),
                 (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1), (2, 5),
                 (5, 2), (10, 1), (1, 10), (11, 1), (1, 11), (12, 1), (3, 4), (4, 3), (1, 12), (6, 2), (2, 6)]


def test_candidate_order_matches_spec():
    assert target_ratios(1, 12) == OFFICIAL_ORDER_12


# official tiling test vectors, cap 12, thumbnail on; 896x448 and 1920x1080 exercise the area tie-break
@pytest.mark.parametrize("wh,grid,tiles", [
    ((448, 448), (1, 1), 1), ((500, 500), (1, 1), 1), ((640, 640), (2, 2), 5), ((1024, 1024), (3, 3), 10),
    ((800, 600), (4, 3), 13), ((600, 400), (3, 2), 7), ((896, 448), (2, 1), 3), ((1920, 1080), (4, 2), 9),
    ((1080, 1920), (2, 4), 9), ((300, 1000), (1, 3), 4), ((4000, 500), (8, 1), 9)])
def test_grid_choice_spec_vectors(wh, grid, tiles):
    assert choose_grid(*wh, 1, 12) == grid
    assert num_tiles(*wh, 1, 12) == tiles
    img = Image.new("RGB", wh, (10, 20, 30))
    assert len(dynamic_preprocess(img, max_num=12)) == tiles


def test_fixture_grid_and_tie():
    # 700x500 with cap 6: (3,2) per reference.json grid_wh
    assert choose_grid(700, 500, 1, 6) == (3, 2)


def _gradient(w, h):
    """A deterministic RGB test image with structure in every channel."""
    r = Image.linear_gradient("L").resize((w, h), Image.BILINEAR)
    g = Image.linear_gradient("L").rotate(90).resize((w, h), Image.BILINEAR)
    b = Image.radial_gradient("L").resize((w // 3 + 1, h // 3 + 1)).resize((w, h), Image.NEAREST)
    return Image.merge("RGB", (r, g, b))


def test_tiles_are_row_major_crops_with_thumbnail_last():
    img = _gradient(1000, 500)  # grid (2,1)? r = 2 -> (2,1) unless the tie-break picks (4,2): 500k < 0.5*448^2*8
    tiles = dynamic_preprocess(img, max_num=12)
    cols, rows = choose_grid(1000, 500, 1, 12)
    big = img.resize((448 * cols, 448 * rows), Image.BICUBIC)
    assert len(tiles) == cols * rows + 1
    for k in range(cols * rows):
        x, y = (k % cols) * 448, (k // cols) * 448
        assert tiles[k].tobytes() == big.crop((x, y, x + 448, y + 448)).tobytes()
    assert tiles[-1].tobytes() == img.resize((448, 448), Image.BICUBIC).tobytes()
    assert len(dynamic_preprocess(img, max_num=12, use_thumbnail=False)) == cols * rows


@pytest.mark.parametrize("case", ["internlm2", "phi3"])
def test_pixel_values_bit_identical_to_official(case):
    t = load_file(os.path.join(FIX, case, "reference.safetensors"))
    img = load_image(os.path.join(FIX, case, "image.png"))
    pv, counts = images_to_pixel_values([img], max_num=6)
    assert counts == [7] and pv.dtype == torch.float32 and pv.shape == (7, 3, 448, 448)
    assert torch.equal(pv[:, :, ::7, ::7], t["pixel_values_sub"])
    assert torch.allclose(pv.double().sum((1, 2, 3)), t["pixel_values_tile_sum"], rtol=0, atol=1e-9)
    assert torch.allclose(pv.double().abs().sum((1, 2, 3)), t["pixel_values_tile_abs_sum"], rtol=0, atol=1e-9)
    assert torch.allclose(pv.double().mean((2, 3)), t["pixel_values_channel_mean"].double(), rtol=0, atol=1e-7)


def test_normalisation_is_torchvision_float32():
    img = _gradient(448, 448)
    raw = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(448, 448, 3).permute(2, 0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    expected = (raw.float().div(255) - mean) / std  # torchvision ToTensor + Normalize
    assert torch.equal(to_tensor([img])[0], expected)


def _reference(tiles):
    """torchvision ToTensor + Normalize written out: uint8 HWC -> float32 CHW, x / 255, (x - mean) / std."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    hwc = [torch.tensor(list(t.tobytes()), dtype=torch.uint8).view(t.height, t.width, 3) for t in tiles]
    return torch.stack([(x.permute(2, 0, 1).float().div(255) - mean) / std for x in hwc])


def _random_image(w, h, seed):
    """Random RGB image in which every channel holds all 256 values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (h * w, 3), generator=g, dtype=torch.uint8)
    for c in range(3):
        x[torch.randperm(h * w, generator=g)[:256], c] = torch.arange(256, dtype=torch.uint8)
    return Image.frombytes("RGB", (w, h), bytes(x.flatten().tolist()))


@pytest.mark.parametrize("size", [17, 33, 448])
def test_normalisation_bit_exact_for_every_value(size):
    img = _random_image(size, size, size)  # one tile, untouched by the resize: every value reaches the tensor
    pv, counts = images_to_pixel_values([img], max_num=1, image_size=size)
    assert counts == [1] and pv.shape == (1, 3, size, size) and pv.is_contiguous()
    assert torch.equal(pv, _reference([img])) and torch.equal(to_tensor([img], size), pv)
    assert [len(pv[0, c].unique()) for c in range(3)] == [256] * 3


@pytest.mark.parametrize("wh,size,max_num", [((61, 37), 17, 6), ((37, 123), 15, 12), ((1000, 333), 448, 12)])
def test_tile_views_bit_exact_at_odd_sizes(wh, size, max_num):
    img = _random_image(*wh, seed=wh[0])
    tiles = dynamic_preprocess(img, max_num=max_num, image_size=size)
    pv, counts = images_to_pixel_values([img], max_num=max_num, image_size=size)
    assert counts == [len(tiles)] and len(tiles) > 2
    assert torch.equal(pv, _reference(tiles)) and torch.equal(to_tensor(tiles, size), pv)


def test_pixel_values_equal_torchvision_when_installed():
    try:  # a test-only oracle; the Linux wheel on PyPI is CUDA-built and does not load against a CPU torch
        from torchvision import transforms as T
    except Exception as e:
        pytest.skip(f"torchvision not usable: {type(e).__name__}")
    tf = T.Compose([T.Resize((448, 448), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for img in [_random_image(640, 480, 0), _random_image(449, 447, 1), _random_image(300, 1000, 2)]:
        pv, _ = images_to_pixel_values([img], max_num=12)
        assert torch.equal(pv, torch.stack([tf(t) for t in dynamic_preprocess(img, max_num=12)]))
        assert torch.equal(to_tensor([img]), tf(img)[None])  # one tile of another size: torchvision's Resize


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "LA", "I;16"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    src = _gradient(300, 200)
    img = src.convert(mode) if mode != "I;16" else src.convert("L").convert("I;16")
    path = tmp_path / "x.png" if mode != "CMYK" else tmp_path / "x.jpg"
    img.save(path)
    loaded = load_image(str(path))
    assert loaded.mode == "RGB"
    assert loaded.tobytes() == Image.open(path).convert("RGB").tobytes()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_loaded_any_mode_gives_official_pixel_values(tmp_path, mode):
    # an RGB file skips convert('RGB') (no copy); every mode must still give the official tensor
    path = tmp_path / ("x.jpg" if mode in ("RGB", "CMYK") else "x.png")
    _gradient(500, 300).convert(mode).save(path)
    pv, counts = images_to_pixel_values([load_image(str(path))], max_num=4)
    official = dynamic_preprocess(Image.open(path).convert("RGB"), max_num=4)
    assert counts == [len(official)] == [3]  # grid (2, 1) + thumbnail
    assert torch.equal(pv, _reference(official))


def test_dummy_tile_is_official_white_tile():
    pv = dummy_pixel_values()
    assert pv.shape == (1, 3, 448, 448)
    white = (torch.ones(3).div(1) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.equal(pv[0].amax((1, 2)), white) and torch.equal(pv[0].amin((1, 2)), white)


def test_multi_image_budget_split():
    a, b = _gradient(1920, 1080), _gradient(640, 640)
    pv, counts = images_to_pixel_values([a, b], max_num=12)  # cap max(1, 12 // 2) = 6 each
    assert counts == [num_tiles(1920, 1080, 1, 6), num_tiles(640, 640, 1, 6)] == [3, 5]
    assert pv.shape[0] == 8
    assert torch.equal(pv[:3], to_tensor(dynamic_preprocess(a, max_num=6)))
    assert torch.equal(pv[3:], to_tensor(dynamic_preprocess(b, max_num=6)))
    _, counts = images_to_pixel_values([a] * 13, max_num=12)  # cap never below 1
    assert counts == [1] * 13


def test_missing_and_corrupt_images(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.jpg: cannot load image"):
        load_image(str(tmp_path / "nope.jpg"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageLoadError, match="bad.jpg: cannot load image"):
        load_image(str(bad))


def test_header_parser_reads_what_pil_reads(tmp_path):
    """header_size parses JPEG and PNG headers itself: on every variant it must give PIL's size, and take the
    fast path (not PIL's) on the plain ones; what it does not find plain (fill bytes, bad precision, other
    formats, decompression bombs) goes through PIL with PIL's answer or error."""
    from data.images import _jpeg_size, _png_size

    icc = bytes(70000)  # written as two APP2 segments (one holds at most 64 KiB)
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb = _gradient(517, 389)
    plain = {"base.jpg": (rgb, {}), "prog.jpg": (rgb, {"progressive": True, "optimize": True}),
             "sub444.jpg": (rgb, {"subsampling": 0, "quality": 95}), "exif.jpg": (rgb, {"exif": exif}),
             "icc.jpg": (rgb, {"icc_profile": icc}), "gray.jpg": (rgb.convert("L"), {}),
             "cmyk.jpg": (rgb.convert("CMYK"), {}), "rgb.png": (rgb, {}), "rgba.png": (rgb.convert("RGBA"), {}),
             "p.png": (rgb.convert("P"), {}), "i16.png": (rgb.convert("I;16"), {}),
             "tall.jpg": (_gradient(33, 2100), {}), "wide.png": (_gradient(3000, 7), {})}
    for name, (img, kw) in plain.items():
        img.save(tmp_path / name, **kw)
        with open(tmp_path / name, "rb") as f:
            fast = _jpeg_size(f) if f.read(3) == b"\xff\xd8\xff" else _png_size(f)
        assert fast == header_size(str(tmp_path / name)) == Image.open(tmp_path / name).size == img.size, name

    data = (tmp_path / "base.jpg").read_bytes()
    (tmp_path / "fill.jpg").write_bytes(data[:2] + b"\xff\xff\xff" + data[2:])  # fill bytes: PIL's leniency
    rgb.save(tmp_path / "x.gif")
    rgb.save(tmp_path / "x.bmp")
    rgb.save(tmp_path / "x.webp")
    for name in ("fill.jpg", "x.gif", "x.bmp", "x.webp"):
        assert header_size(str(tmp_path / name)) == Image.open(tmp_path / name).size == (517, 389), name
    with open(tmp_path / "fill.jpg", "rb") as f:
        f.read(3)
        assert _jpeg_size(f) is None  # really went through PIL

    sof = data.index(b"\xff\xc0")  # 12-bit precision: PIL refuses it, and so must header_size
    (tmp_path / "p12.jpg").write_bytes(data[:sof + 4] + b"\x0c" + data[sof + 5:])
    with pytest.raises(ImageLoadError, match="p12.jpg: cannot read the image header"):
        header_size(str(tmp_path / "p12.jpg"))
    big = Image.MAX_IMAGE_PIXELS
    try:  # a bomb by PIL's rule is PIL's to refuse, whatever its header says
        Image.MAX_IMAGE_PIXELS = 517 * 389 // 3
        with pytest.raises(ImageLoadError, match="base.jpg: cannot read the image header.*DecompressionBomb"):
            header_size(str(tmp_path / "base.jpg"))
    finally:
        Image.MAX_IMAGE_PIXELS = big


def test_header_size_is_the_size_load_image_tiles(tmp_path):
    """The dataset's length index reads image sizes from file headers: they must be the sizes load_image gives
    the tiling. No EXIF rotation is applied there, as in the official Image.open(p).convert('RGB')."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees for display"
    cases = {"rot.jpg": (_gradient(640, 480), {"exif": exif}), "p.png": (_gradient(300, 900).convert("P"), {}),
             "cmyk.jpg": (_gradient(1000, 200).convert("CMYK"), {}), "l.gif": (_gradient(33, 77).convert("L"), {})}
    for name, (img, kw) in cases.items():
        img.save(tmp_path / name, **kw)
        assert header_size(str(tmp_path / name)) == load_image(str(tmp_path / name)).size == img.size, name
    assert ImageOps.exif_transpose(Image.open(tmp_path / "rot.jpg")).size == (480, 640)  # not what is tiled
    data = (tmp_path / "rot.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[:len(data) // 2])  # header whole, pixels cut
    assert header_size(str(tmp_path / "half.jpg")) == (640, 480)
    with pytest.raises(ImageLoadError, match="half.jpg: cannot load image"):
        load_image(str(tmp_path / "half.jpg"))
    (tmp_path / "head.jpg").write_bytes(data[:100])  # header cut
    for name in ("head.jpg", "nope.jpg"):
        with pytest.raises(ImageLoadError, match=f"{name}: cannot read the image header"):
            header_size(str(tmp_path / name))

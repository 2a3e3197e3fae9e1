"""Images -> tiles -> normalised pixel values, identical to the official pipeline.

dynamic_preprocess is the official function (same candidate order, same tie-break, PIL bicubic,
row-major crops, thumbnail last). The tensor conversion reproduces torchvision's ToTensor + Normalize
bit for bit: a 256-entry table per channel holds its float32 result for every uint8 value.
"""
import io
import random

import torch
from PIL import Image

IMAGE_SIZE = 448
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageLoadError(RuntimeError):
    """An image file is missing or cannot be decoded."""


def target_ratios(min_num, max_num):
    """Candidate grids (cols, rows), sorted by tile count. Within a count the order is CPython's set
    iteration order, exactly as the official code builds it: it decides ties between equally close grids."""
    ratios = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                 if min_num <= i * j <= max_num)
    return sorted(ratios, key=lambda x: x[0] * x[1])


def find_closest_aspect_ratio(aspect_ratio, ratios, width, height, image_size):
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for ratio in ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio  # exact tie: a larger grid wins only for an image big enough to fill half of it
    return best


def choose_grid(width, height, min_num=1, max_num=12, image_size=IMAGE_SIZE):
    ratios = target_ratios(min_num, max_num)
    return find_closest_aspect_ratio(width / height, ratios, width, height, image_size)


def num_tiles(width, height, min_num=1, max_num=12, image_size=IMAGE_SIZE, use_thumbnail=True):
    """Tile count dynamic_preprocess gives for an image of this size (for length estimates)."""
    cols, rows = choose_grid(width, height, min_num, max_num, image_size)
    return cols * rows + (1 if use_thumbnail and cols * rows != 1 else 0)


def resize_to_grid(image, min_num=1, max_num=12, image_size=IMAGE_SIZE, use_thumbnail=True):
    """The PIL half of the tiling: (image resized to cols x rows tiles, cols, rows, thumbnail or None).
    Image.resize's default filter is bicubic for RGB; say so explicitly."""
    width, height = image.size
    cols, rows = choose_grid(width, height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.BICUBIC)
    thumb = None
    if use_thumbnail and cols * rows != 1:
        thumb = image.resize((image_size, image_size), Image.BICUBIC)
    return resized, cols, rows, thumb


def dynamic_preprocess(image, min_num=1, max_num=12, image_size=IMAGE_SIZE, use_thumbnail=True):
    """Split a PIL image into a grid of image_size tiles (row-major), thumbnail last when > 1 tile."""
    resized, cols, rows, thumb = resize_to_grid(image, min_num, max_num, image_size, use_thumbnail)
    tiles = []
    for k in range(cols * rows):
        x, y = (k % cols) * image_size, (k // cols) * image_size
        tiles.append(resized.crop((x, y, x + image_size, y + image_size)))
    return tiles + ([thumb] if thumb is not None else [])


_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32)
# float32 [3, 256]: torchvision's ToTensor + Normalize of every uint8 value, in its float32 operations and
# order (x / 255, then (x - mean) / std), so a lookup gives the same bits in one pass instead of four.
_LUT = (torch.arange(256, dtype=torch.float32).div(255) - _MEAN.view(3, 1)) / _STD.view(3, 1)


def _planes(image):
    """uint8 [3, H, W] channel planes of an RGB PIL image (a tile's rows are then contiguous)."""
    buf = bytearray().join(image.tobytes("raw", band) for band in "RGB")
    return torch.frombuffer(buf, dtype=torch.uint8).view(3, image.height, image.width)


def _normalise(planes, out, index):
    """uint8 [3, S, S] -> out, float32 [3, S, S], through the table. index_select wants int32/int64 indices,
    so each channel is first widened into `index` (int32 [S, S] scratch, reused: it stays in cache)."""
    for c in range(3):
        torch.index_select(_LUT[c], 0, index.copy_(planes[c]).view(-1), out=out[c].view(-1))


def to_tensor(tiles, image_size=IMAGE_SIZE):
    """PIL tiles -> float32 [T, 3, S, S], bit-identical to torchvision Resize(S, bicubic) + ToTensor +
    Normalize(ImageNet)."""
    out = torch.empty(len(tiles), 3, image_size, image_size)
    index = torch.empty(image_size, image_size, dtype=torch.int32)
    for tile, o in zip(tiles, out):
        if tile.mode != "RGB":
            tile = tile.convert("RGB")
        if tile.size != (image_size, image_size):  # torchvision Resize; a 448 tile is left untouched
            tile = tile.resize((image_size, image_size), Image.BICUBIC)
        _normalise(_planes(tile), o, index)
    return out


def load_image(path):
    """PIL RGB image (any mode converted, as the official Image.open(p).convert('RGB'); an RGB image is not
    copied)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{path}: cannot load image ({type(e).__name__}: {e})") from e


def header_size(path):
    """(width, height) read from the image file's header, without decoding it (tens of microseconds): the size
    of load_image's image, which like the official loader applies no EXIF rotation. Raises ImageLoadError."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{path}: cannot read the image header ({type(e).__name__}: {e})") from e


def jpeg_degrade(image, rng=random):
    """Official train-time augmentation (`data_augment: true`): JPEG re-encode at quality 75..100."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=rng.randint(75, 100))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def dummy_pixel_values(image_size=IMAGE_SIZE):
    """The official text-only tile: a white 224x224 image through dynamic_preprocess(max_num=1)."""
    white = Image.new("RGB", (224, 224), (255, 255, 255))
    return to_tensor(dynamic_preprocess(white, 1, 1, image_size, True), image_size)


def grids_to_tensor(grids, image_size=IMAGE_SIZE):
    """resize_to_grid results -> float32 [T, 3, S, S], the values of to_tensor(dynamic_preprocess(...))
    without the crops: the tiles are views of one uint8 tensor per resized image."""
    tiles = []
    for resized, cols, rows, thumb in grids:
        grid = _planes(resized).view(3, rows, image_size, cols, image_size)
        tiles += [grid[:, k // cols, :, k % cols] for k in range(cols * rows)]
        if thumb is not None:
            tiles.append(_planes(thumb))
    out = torch.empty(len(tiles), 3, image_size, image_size)
    index = torch.empty(image_size, image_size, dtype=torch.int32)
    for tile, o in zip(tiles, out):
        _normalise(tile, o, index)
    return out


def images_to_pixel_values(images, max_num=12, min_num=1, image_size=IMAGE_SIZE, use_thumbnail=True):
    """Tiles of one sample's images, in image order. Several images share the budget the official way:
    each gets max(1, max_num // n_images). Returns (pixel_values, tiles_per_image)."""
    cap = max_num if len(images) == 1 else max(1, max_num // len(images))
    grids = [resize_to_grid(image, min_num, cap, image_size, use_thumbnail) for image in images]
    counts = [cols * rows + (thumb is not None) for _, cols, rows, thumb in grids]
    return grids_to_tensor(grids, image_size), counts

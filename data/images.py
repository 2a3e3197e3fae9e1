"""Images -> tiles -> normalised pixel values, identical to the official pipeline.

dynamic_preprocess is the official function (same candidate order, same tie-break, PIL bicubic,
row-major crops, thumbnail last). The tensor conversion runs torchvision's ToTensor + Normalize float32
operations on views of the resized image's channel planes, without the crops and the copies: the same
operations give the same bits. header_size reads an image's size without decoding it, for the dataset's index.
"""
import io
import random
import warnings

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


# torchvision's Normalize takes mean and std as float32 [3, 1, 1] tensors: the same values and broadcast.
_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


def _band(image, band):
    """image.tobytes("raw", band) in one piece. tobytes encodes 64 KiB at a time and then joins the pieces: a
    second pass over the plane, into fresh pages. The same encoder, asked for the whole plane at once, returns
    it as is."""
    size = image.width * image.height
    encoder = Image._getencoder(image.mode, "raw", band)
    try:
        encoder.setimage(image.im, (0, 0, image.width, image.height))
        _, status, data = encoder.encode(size)
    finally:
        encoder.cleanup()
    if status != 1 or len(data) != size:  # 1: done
        raise RuntimeError(f"PIL raw encoder returned {len(data)} of {size} bytes (status {status})")
    return data


def _planes(image):
    """The R, G and B planes of an RGB PIL image, uint8 [H, W] each (a tile's rows are then contiguous), over
    the bytes PIL returns: no copy, and read-only (nothing writes to them). Joining them into one buffer
    cost as much as the three reads."""
    h, w = image.height, image.width
    with warnings.catch_warnings():  # torch warns, once, that a bytes object is not writable
        warnings.simplefilter("ignore", UserWarning)
        return [torch.frombuffer(_band(image, band), dtype=torch.uint8).view(h, w) for band in "RGB"]


def _normalise(planes, out):
    """Three uint8 [S, S] planes -> out, float32 [3, S, S], in torchvision's own float32 operations and order:
    ToTensor's x.to(float32).div(255), then Normalize's (x - mean) / std. The same operations give the same
    bits. One tile at a time, `out` stays in cache between the passes."""
    for plane, o in zip(planes, out):
        o.copy_(plane)  # the cast, into out: no float32 temporary per plane
    out.div_(255).sub_(_MEAN).div_(_STD)


def to_tensor(tiles, image_size=IMAGE_SIZE):
    """PIL tiles -> float32 [T, 3, S, S], bit-identical to torchvision Resize(S, bicubic) + ToTensor +
    Normalize(ImageNet)."""
    out = torch.empty(len(tiles), 3, image_size, image_size)
    for tile, o in zip(tiles, out):
        if tile.mode != "RGB":
            tile = tile.convert("RGB")
        if tile.size != (image_size, image_size):  # torchvision Resize; a 448 tile is left untouched
            tile = tile.resize((image_size, image_size), Image.BICUBIC)
        _normalise(_planes(tile), o)
    return out


# Modes whose values go past 255: convert('RGB') clips them, so a 16-bit grayscale PNG comes out nearly white.
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def load_image(path):
    """PIL RGB image (any mode converted, as the official Image.open(p).convert('RGB'); an RGB image is not
    copied). An image of a wide mode is converted the same way (parity), marked in info["wide_mode"] so that
    training can warn and count it."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "RGB":
                return img
            rgb = img.convert("RGB")
            if img.mode in WIDE_MODES:
                rgb.info["wide_mode"] = img.mode
            return rgb
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{path}: cannot load image ({type(e).__name__}: {e})") from e


def header_size(path):
    """(width, height) read from the image file's header, without decoding it: the size of load_image's image,
    which like the official loader applies no EXIF rotation. JPEG and PNG headers are parsed here (10 us
    against PIL's 31: 13 s of a LLaVA-665k index build); anything else, and any header this parser does not
    find plain, goes through PIL. Raises ImageLoadError."""
    try:
        with open(path, "rb") as f:
            magic = f.read(3)
            size = _jpeg_size(f) if magic == b"\xff\xd8\xff" else _png_size(f) if magic == b"\x89PN" else None
    except OSError as e:
        raise ImageLoadError(f"{path}: cannot read the image header ({type(e).__name__}: {e})") from e
    if size is not None and 0 < size[0] * size[1] <= (Image.MAX_IMAGE_PIXELS or float("inf")):
        return size
    try:  # other formats, odd headers, and images big enough for PIL's decompression-bomb check
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{path}: cannot read the image header ({type(e).__name__}: {e})") from e


_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)


def _jpeg_size(f):
    """After the SOI marker and the next marker's 0xFF: the frame size PIL reports (the last start-of-frame
    before the first scan), or None where the marker sequence is not plain segments (PIL then decides)."""
    size, marker = None, f.read(1)
    while len(marker) == 1:
        m = marker[0]
        if m == 0xDA:  # start of scan: the header is over
            return size
        if not (0xC0 <= m <= 0xFE) or 0xD0 <= m <= 0xD9:  # fill bytes, standalone markers: PIL's leniency
            return None
        head = f.read(2)
        if len(head) < 2 or int.from_bytes(head, "big") < 2:
            return None
        n = int.from_bytes(head, "big") - 2
        if m in _JPEG_FRAMES:
            frame = f.read(n)
            if len(frame) < 6 or frame[0] != 8 or frame[5] not in (1, 3, 4):  # PIL refuses these
                return None
            size = (int.from_bytes(frame[3:5], "big"), int.from_bytes(frame[1:3], "big"))
        else:
            f.seek(n, 1)
        if f.read(1) != b"\xff":
            return None
        marker = f.read(1)
    return None


def _png_size(f):
    """After the signature's first 3 bytes: the IHDR chunk's (width, height), or None if this is no PNG."""
    head = f.read(21)
    if len(head) < 21 or head[:5] != b"G\r\n\x1a\n" or head[9:13] != b"IHDR":
        return None
    return int.from_bytes(head[13:17], "big"), int.from_bytes(head[17:21], "big")


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
    without the crops: the tiles are views of the resized image's three uint8 planes."""
    tiles = []
    for resized, cols, rows, thumb in grids:
        grid = [plane.view(rows, image_size, cols, image_size) for plane in _planes(resized)]
        tiles += [[plane[k // cols, :, k % cols] for plane in grid] for k in range(cols * rows)]
        if thumb is not None:
            tiles.append(_planes(thumb))
    out = torch.empty(len(tiles), 3, image_size, image_size)
    for tile, o in zip(tiles, out):
        _normalise(tile, o)
    return out


def per_image_cap(max_num, n_images):
    """The tile cap of each of a sample's images: several share the budget the official way, each getting
    max(1, max_num // n_images)."""
    return max_num if n_images <= 1 else max(1, max_num // n_images)


def images_to_pixel_values(images, max_num=12, min_num=1, image_size=IMAGE_SIZE, use_thumbnail=True):
    """Tiles of one sample's images, in image order, each image under per_image_cap. Returns (pixel_values,
    tiles_per_image)."""
    cap = per_image_cap(max_num, len(images))
    grids = [resize_to_grid(image, min_num, cap, image_size, use_thumbnail) for image in images]
    counts = [cols * rows + (thumb is not None) for _, cols, rows, thumb in grids]
    return grids_to_tensor(grids, image_size), counts

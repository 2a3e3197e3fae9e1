"""LLaVA-format data -> tokens, labels and tiles exactly as the official InternVL 1.5 pipeline makes them."""
from .collate import collate
from .dataset import (DataError, SampleError, SampleTooLong, Source, SupervisedDataset, build_sample,
                      parse_record, read_meta_file)
from .images import ImageLoadError, dynamic_preprocess, load_image
from .sampler import LengthGroupedSampler
from .templates import DEFAULT_SYSTEM_MESSAGE, IGNORE_INDEX, TEMPLATES, generation_prompt, get_template
from .tokenizer import load_tokenizer

"""Training data: loaders for real image-text and editing data, batching (the synthetic shapes world
is `nextstep.shapes`).

    from nextstep.data import open_dataset, Collator, encode_images
    data = open_dataset("shards/train-{000000..000099}.tar", resolution=256)  # or a folder, or a .jsonl
    loader = DataLoader(data, batch_size=8, num_workers=4, collate_fn=Collator(tokenizer))
    for batch in loader:
        data.mark_consumed(batch)  # the resumable position: data.state_dict()
        ...

See docs/data.md.
"""

from .batching import Collator, encode_images
from .buckets import OFFICIAL_HW_UNITS, buckets, closest_bucket, fit_to_bucket
from .loaders import FolderDataset, JsonlDataset, open_dataset
from .stream import DataError, StreamDataset, is_bookkeeping
from .webdataset import ShardDataset, ShardWriter, expand_braces

__all__ = ["OFFICIAL_HW_UNITS", "Collator", "DataError", "FolderDataset", "JsonlDataset", "ShardDataset",
           "ShardWriter", "StreamDataset", "buckets", "closest_bucket", "encode_images", "expand_braces",
           "fit_to_bucket", "is_bookkeeping", "open_dataset"]

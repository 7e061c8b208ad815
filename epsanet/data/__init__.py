"""Data on disk: ImageFolder reading with clear errors, safe image loading, the digits demo set."""
from .digits import write_digits
from .folder import DataError, ImageFiles, ImageFolder, UnreadableImageError, check_same_classes, find_images, split_dir
from .image import load_image, to_rgb
from .sources import IndexedSamples, create_image_dataset, dataset_classes
from .synthetic import write_image_folder

__all__ = [
    'DataError', 'ImageFiles', 'ImageFolder', 'IndexedSamples', 'UnreadableImageError', 'check_same_classes',
    'create_image_dataset', 'dataset_classes', 'find_images', 'load_image', 'split_dir', 'to_rgb', 'write_digits',
    'write_image_folder',
]

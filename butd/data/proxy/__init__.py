"""The COCO-proxy generator: real COCO captions with synthetic region features derived from each image's captions.

``concepts`` maps caption words to Visual Genome objects and attributes, ``features`` synthesises the region
vectors, ``generator`` writes the Karpathy-style dataset file and the feature store (``tools/make_proxy_dataset.py``).
Numbers measured on it are not COCO results (docs/formats.md).
"""

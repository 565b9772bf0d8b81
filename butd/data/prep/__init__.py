"""Offline preparation: caption preprocessing into a DATA_DIR (``prepro``), the COCO caption sources it reads
(``coco_source``), and import of the public TSV / LXMERT / npz region features into a store (``convert``).

Run once per dataset by ``tools/prepro_captions.py`` and ``tools/convert_features.py``; training and inference read
only what these write, through ``butd.data.captions`` and ``butd.data.store``.
"""

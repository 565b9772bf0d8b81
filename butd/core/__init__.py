"""The floor of butd: basics every other module may import, and which import nothing of butd above them.

- ``butd.core.files``: the one atomic file write (temporary file, fsync, rename) and cleanup of its leftovers.
- ``butd.core.tokens``: the special token ids, the vocabulary, and word helpers.
- ``butd.core.devices``: device and precision resolution (``auto``, ``cpu``, ``cuda[:N]``; ``fp32`` / ``bf16``).
- ``butd.core.threads``: the CPU thread count the tools give torch (``--threads``, ``BUTD_THREADS``, the cores).
- ``butd.core.batch``: the ``Batch`` of padded regions and label rows, and ``collate``.
- ``butd.core.checkpoint``: the checkpoint file format as a typed object.

Besides ``butd.errors``, nothing here imports butd.
"""

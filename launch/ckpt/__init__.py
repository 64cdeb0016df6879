"""``moe ckpt``: reading, converting and describing checkpoints (``launch/ckpt/cli.py``)."""

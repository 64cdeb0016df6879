"""``moe eval``: a checkpoint's loss and perplexity on held-out text, under any layout
(``launch/eval/evaluate.py``)."""

"""The files of a checkpoint folder and the format's version: the names every part of
:mod:`fxcompress.checkpoint` (writer, swap, loader) agrees on."""

from __future__ import annotations

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PROGRESS = "progress.json"
DEFAULT_SHARD_SIZE = "5GB"
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)

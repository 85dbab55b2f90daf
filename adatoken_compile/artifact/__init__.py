"""The artifact format: manifest, hashes and verification. Imports nothing above it (no torch)."""

from .format import (EMBED_FILE, FORMAT, MANIFEST, PREPROCESS_FILE, SCHEDULE_FILE, TOKENIZER_DIR, VERSION, Manifest,
                     file_digest, file_table, sha256_file)
from .verify import RECOMPILE, verify

__all__ = ["EMBED_FILE", "FORMAT", "MANIFEST", "PREPROCESS_FILE", "SCHEDULE_FILE", "TOKENIZER_DIR", "VERSION",
           "Manifest", "RECOMPILE", "file_digest", "file_table", "sha256_file", "verify"]

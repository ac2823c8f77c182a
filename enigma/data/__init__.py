"""Data: the BERT-Chinese tokenizer, corpora prepared by Ray tasks into tokenized parquet
shards, and the order each training rank reads them in each epoch."""

from .tokenizer import load_tokenizer, vocab_hash

__all__ = ["load_tokenizer", "vocab_hash"]

"""Data: the BERT-Chinese tokenizer, corpora, and tokenized parquet shards on Ray Data."""

from .tokenizer import load_tokenizer, vocab_hash

__all__ = ["load_tokenizer", "vocab_hash"]

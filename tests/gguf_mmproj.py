"""Write a tiny random multimodal projector GGUF (an "mmproj") that llama.cpp's mtmd loads, with the `gguf`
package: a CLIP-style vision tower (patch embedding, position embedding, pre-norm ViT blocks) and LLaVA's
MLP projector (`clip.projector_type` "mlp": mm.0 -> GELU -> mm.2), the simplest projector mtmd knows.

Tensor and key names follow llama.cpp's tools/mtmd/clip-impl.h. With `image_size` 32 and `patch_size` 8 an
image becomes (32 / 8)^2 = 16 embeddings of `text_embd` floats (mtmd resizes any image to 32x32 first), which
must equal the text model's embedding width (640 for the packaged Gemma 3 270M).
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SIZE = 32
PATCH_SIZE = 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # embeddings one image yields


def write_mmproj(out_file: Path, text_embd: int, *, width: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Write the projector to `out_file`; `text_embd` is the text model's embedding width."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(str(out_file), "clip")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_audio_encoder", False)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", IMAGE_SIZE)
    writer.add_uint32("clip.vision.patch_size", PATCH_SIZE)
    writer.add_uint32("clip.vision.embedding_length", width)
    writer.add_uint32("clip.vision.feed_forward_length", width * 2)
    writer.add_uint32("clip.vision.projection_dim", text_embd)
    writer.add_uint32("clip.vision.block_count", layers)
    writer.add_uint32("clip.vision.attention.head_count", 2)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    n_patches = IMAGE_TOKENS
    # numpy shapes are ggml's ne reversed: a Linear(in, out) weight is (out, in).
    tensors: dict[str, np.ndarray] = {
        "v.patch_embd.weight": weight(width, 3, PATCH_SIZE, PATCH_SIZE),  # a conv2d kernel
        "v.patch_embd.bias": weight(width),
        "v.class_embd": weight(width),
        "v.position_embd.weight": weight(n_patches + 1, width),
        "v.pre_ln.weight": np.ones(width, np.float32),
        "v.pre_ln.bias": np.zeros(width, np.float32),
        "mm.0.weight": weight(text_embd, width),
        "mm.0.bias": weight(text_embd),
        "mm.2.weight": weight(text_embd, text_embd),
        "mm.2.bias": weight(text_embd),
    }
    for i in range(layers):
        block = f"v.blk.{i}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensors[f"{block}.{name}.weight"] = weight(width, width)
            tensors[f"{block}.{name}.bias"] = weight(width)
        for name in ("ln1", "ln2"):
            tensors[f"{block}.{name}.weight"] = np.ones(width, np.float32)
            tensors[f"{block}.{name}.bias"] = np.zeros(width, np.float32)
        tensors[f"{block}.ffn_up.weight"] = weight(width * 2, width)
        tensors[f"{block}.ffn_up.bias"] = weight(width * 2)
        tensors[f"{block}.ffn_down.weight"] = weight(width, width * 2)
        tensors[f"{block}.ffn_down.bias"] = weight(width)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file

"""Cheap identities of model parts: a config hash, and a sampled hash of the weight files.

A checkpoint records its teacher's, and precomputed shards their encoders', so that a resume on another teacher or
shards encoded with other weights are refused before anything heavy loads. Reading a whole multi-GB file on every
start would cost seconds to minutes; the size plus evenly spaced blocks cost a few MB of reads and still change with
any fine-tune (which moves nearly every weight), or any edit of a small file (hashed whole).
"""

import hashlib
import json
import os

WEIGHT_EXTENSIONS = (".safetensors", ".bin")
WHOLE_FILE_BYTES = 16 << 20  # files up to this size are hashed whole
BLOCKS, BLOCK_BYTES = 64, 64 << 10  # else the size and 64 blocks of 64 KiB spread over the file


def config_fingerprint(config):
    """Short hash of a model config dict, without the keys that name files or library versions."""
    kept = {k: v for k, v in dict(config).items()
            if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_fingerprint(path, digest):
    """Feed one file into `digest`: whole when small, else its size and evenly spaced blocks."""
    size = os.path.getsize(path)
    digest.update(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            digest.update(f.read())
            return
        for i in range(BLOCKS):
            f.seek((size - BLOCK_BYTES) * i // (BLOCKS - 1))
            digest.update(f.read(BLOCK_BYTES))


def weight_files(folder):
    """The weight files from_pretrained reads in a folder: the default (non-variant) ones, safetensors first."""
    names = [n for n in os.listdir(folder) if n.endswith(WEIGHT_EXTENSIONS)]
    plain = [n for n in names if "." not in n.rsplit(".", 1)[0].split("-0")[0]]  # 'x.fp16.safetensors' is a variant
    chosen = plain or names
    safetensors = [n for n in chosen if n.endswith(".safetensors")]
    return sorted(safetensors or chosen)


def weights_fingerprint(path, subfolder=None, revision=None, cache_dir=None):
    """Identity of a model part's weights: a sampled hash of a local folder's weight files, or for a Hub id the
    commit its cached config came from ('hub:<id>@<commit>'); None when neither can be told."""
    folder = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(folder):
        files = weight_files(folder)
        if not files:
            return None
        digest = hashlib.sha256()
        for name in files:
            file_fingerprint(os.path.join(folder, name), digest)
        return digest.hexdigest()[:16]
    if os.path.isdir(path):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        config = "/".join(p for p in (subfolder, "config.json") if p)
        cached = try_to_load_from_cache(path, config, cache_dir=cache_dir, revision=revision)
    except Exception:  # an id the cache cannot take: nothing to compare, not an error
        return None
    if not isinstance(cached, str):
        return None
    # .../snapshots/<commit>/<subfolder>/config.json: a Hub commit pins every file of the repo
    commit = os.path.basename(os.path.dirname(os.path.dirname(cached) if subfolder else cached))
    return f"hub:{path}@{commit}"


def weights_differ(recorded, ours):
    """Whether two weight fingerprints tell of different weights: both known and of the same kind (a local folder's
    hash and a Hub commit cannot be compared, and an unknown one is no evidence either way)."""
    if recorded is None or ours is None or recorded.startswith("hub:") != ours.startswith("hub:"):
        return False
    return recorded != ours

"""Loading the tokenizer, config and pretrained weights, with one clear error each."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Optional

import torch

from .. import hub
from ..errors import UserError
from ..task import BuiltModel


def _hub_kwargs(name: str) -> dict:
    """local_files_only when the Hub cannot be reached: a cached model loads, anything else fails at once."""
    return {"local_files_only": True} if hub.is_hub_id(name) and hub.unreachable() else {}


def load_tokenizer(model_args, name: Optional[str] = None, flag: str = "--model", **kwargs):
    """The fast tokenizer of --tokenizer_name or --model (or of `name`, given with `flag`, e.g. a teacher's)."""
    from transformers import AutoTokenizer

    name = name or model_args.tokenizer_name or model_args.model
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=model_args.revision, cache_dir=model_args.cache_dir,
                                            trust_remote_code=model_args.trust_remote_code, **_hub_kwargs(name),
                                            **kwargs)
    except Exception as err:
        raise UserError(_load_message(name, err, "tokenizer", flag)) from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"the tokenizer of '{name}' has no fast (Rust) version; these scripts need one "
                        "(pass --tokenizer_name of a model that has tokenizer.json).")
    return tok


def _load_message(name: str, err: Exception, what: str, flag: str = "--model") -> str:
    first = " ".join(str(err).split())[:250]
    offline = hub.unreachable() if hub.is_hub_id(name) else None
    if offline is not None:
        return (f"{flag} '{name}' could not be loaded ({what}): the Hugging Face Hub is not reachable ({offline}) "
                "and the model is not in the local cache; pass a local folder saved with save_pretrained "
                f"({flag} PATH).")
    if os.path.isdir(name):
        return f"{flag} '{name}' could not be loaded as a {what}: {first}."
    if os.path.sep in name and not os.path.exists(name) and name.count("/") != 1:
        return f"{flag} '{name}' does not exist (no such folder, and it is not a Hub id)."
    return (f"{flag} '{name}' could not be loaded ({what}): it is not a local folder, and the Hub id could not be "
            f"fetched ({first}). Check the path, or the network and the model id.")


def load_config(model_args, name: Optional[str] = None, flag: str = "--model"):
    from transformers import AutoConfig

    name = name or model_args.model
    try:
        return AutoConfig.from_pretrained(name, revision=model_args.revision if name == model_args.model else "main",
                                          cache_dir=model_args.cache_dir,
                                          trust_remote_code=model_args.trust_remote_code, **_hub_kwargs(name))
    except Exception as err:
        raise UserError(_load_message(name, err, "config", flag)) from None


def load_pretrained(auto_class, model_args, name: Optional[str] = None, flag: str = "--model",
                    **kwargs) -> BuiltModel:
    """from_pretrained with a clear error; returns the model with its newly initialised and unused keys.
    `name` (given with `flag`) loads another model than --model, e.g. a teacher."""
    name = name or model_args.model
    revision = model_args.revision if name == model_args.model else "main"
    attn = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    try:
        model, info = auto_class.from_pretrained(
            name, revision=revision, cache_dir=model_args.cache_dir,
            trust_remote_code=model_args.trust_remote_code, output_loading_info=True,
            # fp32 master weights whatever dtype the checkpoint was stored in (transformers 5 keeps the
            # stored dtype by default, and AdamW on fp16 weights diverges); autocast does mixed precision.
            dtype=torch.float32, **attn, **_hub_kwargs(name), **kwargs)
    except Exception as err:
        raise UserError(_load_message(name, err, "model", flag)) from None
    # The new keys are returned, not logged: only the caller knows whether they stay new (a resumed run loads
    # every weight from its checkpoint; a teacher must have none).
    new = sorted(set(info.get("missing_keys", [])) | {k if isinstance(k, str) else k[0]
                                                     for k in info.get("mismatched_keys", [])})
    return BuiltModel(model, new, sorted(info.get("unexpected_keys", [])))


def check_max_length(max_length: int, model_config, flag: str = "--max_length") -> None:
    if max_length <= 2:
        raise UserError(f"{flag} must be greater than 2 (room for [CLS], [SEP] and a token), got {max_length}.")
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and max_length > limit:
        raise UserError(f"{flag} {max_length} is above the model's limit of {limit} positions; "
                        f"use {flag} {limit} or less.")


def byte_level(tokenizer) -> bool:
    """RoBERTa/GPT-2 style byte-level BPE: pre-split words need add_prefix_space=True."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and '"ByteLevel"' in backend.to_str()


def freeze(model, embeddings: bool, layers: int) -> list[str]:
    """Stop training the embeddings (and the first `layers` encoder layers); returns frozen module names."""
    base = model.base_model
    frozen = []
    if embeddings or layers:
        emb = getattr(base, "embeddings", None) or model.get_input_embeddings()
        emb.requires_grad_(False)
        frozen.append("embeddings")
    if layers:
        name, stack = encoder_layers(model, "--freeze_layers")
        if layers > len(stack):
            raise UserError(f"--freeze_layers {layers} is more than the model's {len(stack)} layers.")
        for i in range(layers):
            stack[i].requires_grad_(False)
            frozen.append(f"{name}.{i}")
    return frozen


def encoder_layers(model, flag: str) -> tuple[str, torch.nn.ModuleList]:
    """(name under the base model, ModuleList) of the encoder's layer stack; `flag` names the option that needs it."""
    base = model.base_model
    stacks = [(name, m) for name, m in base.named_modules()
              if isinstance(m, torch.nn.ModuleList) and name.split(".")[-1] in ("layer", "layers")]
    if not stacks:
        raise UserError(f"{flag}: cannot find the encoder layers of {type(base).__name__}.")
    return stacks[0]


def keep_layers(model, layers: list[int], name: str) -> None:
    """--init_student_layers: keep these encoder layers of `model` (embeddings, head and everything else stay),
    renumbered 0..k-1, with config.num_hidden_layers = k, so save_pretrained writes an ordinary model."""
    where, stack = encoder_layers(model, "--init_student_layers")
    if layers[-1] >= len(stack):
        raise UserError(f"--init_student_layers {','.join(map(str, layers))}: --model '{name}' has {len(stack)} "
                        f"layers (0-{len(stack) - 1}).")
    kept = [stack[i] for i in layers]
    for new, layer in enumerate(kept):
        for module in layer.modules():  # transformers numbers layers for its caches
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    parent, _, attr = where.rpartition(".")
    setattr(model.base_model.get_submodule(parent), attr, torch.nn.ModuleList(kept))
    model.config.num_hidden_layers = len(kept)


def file_sha256(path: str, h) -> None:
    with open(path, "rb") as fh:
        for block in iter(functools.partial(fh.read, 1 << 22), b""):
            h.update(block)


def model_fingerprint(name: str, model_args) -> str:
    """What a model is, for cache keys (a teacher's logits, an augmenting masked LM's variants). A local folder: the
    hash of its config and weight files. A Hub id: its id and snapshot (commit)."""
    h = hashlib.sha256()
    if os.path.isdir(name):
        for f in sorted(os.listdir(name)):
            if f == "config.json" or f.endswith((".safetensors", ".bin")):
                h.update(f.encode())
                file_sha256(os.path.join(name, f), h)
    else:
        from transformers.utils import cached_file

        config = cached_file(name, "config.json", cache_dir=model_args.cache_dir)
        h.update(json.dumps([name, os.path.basename(os.path.dirname(config))]).encode())
        file_sha256(config, h)
    return h.hexdigest()[:16]

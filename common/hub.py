"""Reaching the Hugging Face Hub: one quick probe per process, so a machine without network fails in
seconds with one sentence instead of waiting through the libraries' retries (about half a minute
per file), while models and data sets already in the local cache still load."""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from typing import Optional

from .errors import UserError

_probe: Optional[tuple[bool, str]] = None


def _offline_env() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE",
                                                                                       "TRANSFORMERS_OFFLINE"))


def unreachable(timeout: float = 5.0) -> Optional[str]:
    """Why the Hub cannot be used now (offline mode, DNS, refused connection, ...), or None if it answers."""
    global _probe
    if _offline_env():
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    if _probe is None:
        from huggingface_hub import constants

        try:
            urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
            _probe = (True, "")
        except urllib.error.HTTPError:  # it answered (any status): reachable
            _probe = (True, "")
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            _probe = (False, f"{constants.ENDPOINT} cannot be reached: {reason}")
    return None if _probe[0] else _probe[1]


def is_hub_id(name: str) -> bool:
    """Not an existing local path, and shaped like 'name' or 'org/name'."""
    return not os.path.exists(name) and name.count("/") <= 1 and not name.startswith((".", "/", "~"))


def push_preflight(args) -> str:
    """Before training: a token is there, the Hub answers, the token is valid and the repository exists or can
    be created. Returns the repository id (default: your namespace / the output folder's name)."""
    from huggingface_hub import HfApi, get_token

    token = args.hub_token or get_token()
    if not token:
        raise UserError("--push_to_hub needs a Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass "
                        "--hub_token; checked before training so no run ends in an upload error.")
    offline = unreachable()
    if offline:
        raise UserError(f"--push_to_hub: the Hugging Face Hub is not reachable ({offline}); train without "
                        "--push_to_hub and upload the output folder later, or fix the network first.")
    api = HfApi(token=token)
    try:
        user = api.whoami()["name"]
    except Exception as err:
        raise UserError(f"--push_to_hub: the Hub refused the token ({_first_line(err)}); log in again with "
                        "`hf auth login` or pass a valid --hub_token.") from None
    repo_id = args.hub_model_id or f"{user}/{os.path.basename(os.path.abspath(args.output_dir))}"
    try:
        api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True)
    except Exception as err:
        raise UserError(f"--push_to_hub: cannot create or write to the Hub repository '{repo_id}' "
                        f"({_first_line(err)}); check --hub_model_id and the token's write permission.") from None
    return repo_id


def push(args, repo_id: str) -> str:
    """Upload output_dir (weights, tokenizer, config, model card, results; no checkpoints). Main process."""
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token or None)
    try:
        api.upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="Upload from bert-finetune",
                          ignore_patterns=["checkpoints/**", ".tmp-*"])
    except Exception as err:
        raise UserError(f"--push_to_hub: the upload of '{args.output_dir}' to '{repo_id}' failed "
                        f"({_first_line(err)}); the trained model is saved there, upload it with "
                        f"`hf upload {repo_id} {args.output_dir}`.") from None
    return f"https://huggingface.co/{repo_id}"


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]

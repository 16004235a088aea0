"""Hub names -> local directories, through `huggingface_hub` and its cache.

Two kinds of names: open_clip's `(architecture, tag)` pairs such as `("ViT-B-32", "openai")`, whose
weights live in open_clip-format hub repos (`open_clip_config.json` + `open_clip_model.safetensors`),
and plain repo ids such as `openai/clip-vit-base-patch32` in either open_clip or HF CLIP format.
Downloads go through the Hugging Face cache, so an offline machine works with whatever is cached there,
and fails with one sentence that says how to use a local copy instead.
"""

from __future__ import annotations

from pathlib import Path

from clip_pacl.errors import CheckpointError, MissingDependencyError

HF_HUB_PREFIX = "hf-hub:"
# open_clip's hub repos for OpenAI's released weights (open_clip's `pretrained.py`, tag "openai").
OPENAI_REPOS = {
    "RN50": "timm/resnet50_clip.openai",
    "RN101": "timm/resnet101_clip.openai",
    "RN50x4": "timm/resnet50x4_clip.openai",
    "ViT-B-32": "timm/vit_base_patch32_clip_224.openai",
    "ViT-B-16": "timm/vit_base_patch16_clip_224.openai",
    "ViT-L-14": "timm/vit_large_patch14_clip_224.openai",
    "ViT-L-14-336": "timm/vit_large_patch14_clip_336.openai",
}
# (config file, weight files in order of preference) for the two repo layouts we read.
REPO_LAYOUTS = (
    ("open_clip_config.json", ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")),
    ("config.json", ("model.safetensors", "pytorch_model.bin")),
)


def pretrained_repo(model: str, tag: str) -> str:
    """The hub repo holding `model`'s weights named `tag` (open_clip's naming; other tags need open_clip)."""
    arch = model.removesuffix("-quickgelu")
    if tag == "openai" and arch in OPENAI_REPOS:
        return OPENAI_REPOS[arch]
    try:
        from open_clip.pretrained import get_pretrained_cfg
    except ImportError:
        known = ", ".join(f"{m}+openai" for m in OPENAI_REPOS)
        raise CheckpointError(f"unknown pretrained weights '{model}' + '{tag}' (built in: {known}; "
                              f"install open_clip_torch for its other tags, or pass a hub repo id)") from None
    repo = get_pretrained_cfg(model, tag).get("hf_hub", "")
    if not repo:
        raise CheckpointError(f"open_clip knows no hub weights '{tag}' for '{model}'; "
                              "pass a hub repo id or a local path")
    return repo.rstrip("/")


def snapshot_revision(snapshot: Path) -> str | None:
    """The commit a Hugging Face cache snapshot directory holds (`.../snapshots/<commit>/`), else None."""
    return snapshot.name if snapshot.parent.name == "snapshots" else None


class HubUnreachableError(CheckpointError):
    """A hub name that is not in the cache while offline or with the Hub unreachable (the CLI adds its own hint)."""


PROBE_TIMEOUT_S = 3.0  # one connection attempt before any download, so that no network fails in seconds


def _hub_reachable(endpoint: str) -> bool:
    """One quick request to the Hub's endpoint, no retries (huggingface_hub retries a refused connection for a
    minute), through huggingface_hub's own HTTP session so that its proxy settings apply."""
    try:
        from huggingface_hub.utils import get_session

        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    except Exception:  # any failure to connect: the HTTP library's own error types vary across versions
        return False
    return True


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot holding a config and a weights file of either layout, without touching the network."""
    from huggingface_hub import try_to_load_from_cache

    for config_name, weight_names in REPO_LAYOUTS:
        config_path = try_to_load_from_cache(repo_id, config_name, revision=revision)
        if not isinstance(config_path, str):
            continue
        if any(isinstance(try_to_load_from_cache(repo_id, w, revision=revision), str) for w in weight_names):
            return Path(config_path).parent
    return None


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of `repo_id` with its config and one weights file (downloaded if needed).

    The cache answers first, without the network. Offline (HF_HUB_OFFLINE) or with the Hub unreachable (one quick
    connection attempt) an uncached name fails at once with `HubUnreachableError`."""
    try:
        from huggingface_hub import constants
    except ImportError:
        raise MissingDependencyError("huggingface_hub", "hf", f"downloading '{repo_id}'") from None
    cached = _cached_snapshot(repo_id, revision)
    if cached is not None:
        return cached
    if constants.HF_HUB_OFFLINE or not _hub_reachable(constants.ENDPOINT):
        mode = "offline" if constants.HF_HUB_OFFLINE else f"the Hub at {constants.ENDPOINT} is unreachable"
        raise HubUnreachableError(
            f"could not download '{repo_id}' ({mode} and not in the Hugging Face cache at {constants.HF_HUB_CACHE}); "
            "download it where there is a network and pass the local directory instead")
    return _download(repo_id, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import (  # utils re-exports these in old and new huggingface_hub versions
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline_only = True  # every miss so far was "not in the cache and the Hub is unreachable"
    for config_name, weight_names in REPO_LAYOUTS:
        try:
            config_path = Path(hf_hub_download(repo_id, config_name, revision=revision))
        except LocalEntryNotFoundError:
            continue
        except EntryNotFoundError:
            offline_only = False
            continue
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise CheckpointError(f"no Hugging Face repo '{repo_id}'{f' at {revision}' if revision else ''} "
                                  f"(or it is private/gated); check the name or pass a local path") from None
        except HfHubHTTPError as e:
            raise CheckpointError(f"could not download '{repo_id}': {str(e).splitlines()[0]}") from None
        for weights in weight_names:
            try:
                hf_hub_download(repo_id, weights, revision=revision)
                return config_path.parent
            except EntryNotFoundError:
                continue
        raise CheckpointError(f"hub repo '{repo_id}' has {config_name} but none of {', '.join(weight_names)} "
                              f"(in the cache at {constants.HF_HUB_CACHE} or online)")
    if offline_only:
        raise HubUnreachableError(
            f"could not download '{repo_id}' (the Hub is unreachable and not in the Hugging Face cache at "
            f"{constants.HF_HUB_CACHE}); download it where there is a network and pass the local directory instead")
    raise CheckpointError(f"hub repo '{repo_id}' is neither an open_clip nor a Hugging Face CLIP repo "
                          f"(no {' or '.join(c for c, _ in REPO_LAYOUTS)})")

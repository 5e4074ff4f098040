"""Save, load and share adapters, on disk and on the Hugging Face Hub, the way PEFT users expect.

* :func:`save_pretrained` writes ``eexit_config.json``, ``eexit_adapter.safetensors`` and ``README.md`` (never
  ``adapter_config.json`` / ``adapter_model.safetensors``, which the Hub reads as PEFT's).
* :func:`read_pretrained` reads a local folder, else a Hub repo through ``huggingface_hub``, and validates both
  files and the backbone fingerprint before the model is touched; :func:`eexit.from_pretrained` (next to
  ``attach``, which this module does not import) then attaches and :func:`install_adapter` loads strictly; on
  any error the model is detached again, so it is left as it was.
* :func:`push_to_hub` uploads the three files in one commit; :func:`load_adapter` adds a named adapter.

A PEFT-wrapped backbone (``ee.peft_model``): its PEFT adapter is written next to the exits by peft itself, in
``peft_adapter/`` (``adapter_config.json`` + ``adapter_model.safetensors``), pushed with them, and loaded back
(safetensors only) by :func:`eexit.from_pretrained` onto the plain backbone; the fingerprint covers its weights.

Several adapters (PEFT's layout): ``save_pretrained(ee, d, selected_adapters=[...])`` writes the adapter named
``"default"`` to ``d`` and every other one to ``d/<name>/``; each folder is a complete adapter, loaded with
``subfolder="<name>"``. The file format is documented in ``adapters/README.md``.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ._disk import find_peft_folder, peft_files_match, read_folder, stage_peft, write_folder
from ._fingerprint import backbone_fingerprint, check_fingerprint, check_structure, fingerprint_info, spec_for
from ._format import (
    BACKUP_NAME,
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFiles,
    SavedAdapter,
    build_files,
)
from ._peft import PEFT_FILES, PEFT_FOLDER, split_peft
from .adapters import AdapterRecord, check_adapter_name
from .errors import AdapterError, EexitError

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from .model import EarlyExitModel

__all__ = [
    "BACKUP_NAME",
    "CARD_NAME",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "backbone_fingerprint",
    "check_pretrained",
    "install_adapter",
    "load_adapter",
    "peft_adapter_folder",
    "push_to_hub",
    "read_adapter_files",
    "read_pretrained",
    "save_pretrained",
]

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


# ---------------------------------------------------------------------------------------------- saving
def _named_record(ee: EarlyExitModel, name: str | None) -> tuple[str, AdapterRecord]:
    """The adapter called ``name`` (default: the active one) as ``(name, snapshot)``."""
    name = ee.active_adapter if name is None else name
    if name not in ee.adapter_names:
        raise AdapterError(f"no adapter named {name!r}; this model holds {ee.adapter_names}.")
    return name, ee.adapter_record(name)


def _adapter_files(ee: EarlyExitModel, name: str | None, base_model: str | None, revision: str | None) -> AdapterFiles:
    name, record = _named_record(ee, name)
    backbone = {"base_model": None, "revision": None, **ee.spec.describe(ee.backbone), **fingerprint_info(ee)}
    backbone["family"] = ee.spec.name
    if base_model is not None:
        backbone["base_model"] = base_model
    if revision is not None:
        backbone["revision"] = revision
    return build_files(ee, name, record, backbone)


def save_pretrained(
    ee: EarlyExitModel,
    save_directory: str | os.PathLike[str],
    *,
    adapter_name: str | None = None,
    selected_adapters: Sequence[str] | None = None,
    safe_serialization: bool = True,
    is_main_process: bool = True,
    base_model: str | None = None,
    base_model_revision: str | None = None,
) -> Path:
    """Write an adapter to a folder: ``eexit_config.json``, ``eexit_adapter.safetensors`` and ``README.md``.

    Writes are atomic: an interrupted save leaves the previous adapter loadable. An existing README.md is kept.
    When the backbone is a ``peft.PeftModel`` (``ee.peft_model``), its active PEFT adapter is written too, by
    peft, into ``peft_adapter/`` of every folder written (safetensors and JSON), so that
    :func:`eexit.from_pretrained` can rebuild the adapted backbone from the plain one.

    Args:
        ee: the model holding the adapter.
        save_directory: the folder (created if needed).
        adapter_name: which adapter to write (default: the active one), at the folder's root.
        selected_adapters: write several adapters instead: ``"default"`` at the root, every other one in a
            subfolder named after it (PEFT's layout).
        safe_serialization: must be True; eexit writes safetensors only (kept for PEFT-style call sites).
        is_main_process: under distributed training, pass ``accelerator.is_main_process``; other ranks skip.
        base_model: the Hub id of the backbone, when the backbone does not record it (stored and put in the card).
        base_model_revision: the backbone's revision (commit hash) to record with ``base_model``.

    Returns:
        The folder written.

    Raises:
        AdapterError: bad arguments, or a PeftModel holding several PEFT adapters (the fingerprint covers them all,
            but only the active one would be saved).
    """
    if not safe_serialization:
        raise AdapterError(
            "safe_serialization=False is not supported: eexit adapters are safetensors only, because "
            "pickles can run code when loaded. Drop the argument."
        )
    if adapter_name is not None and selected_adapters is not None:
        raise AdapterError("pass adapter_name (one adapter at the root) or selected_adapters (several), not both.")
    root = Path(save_directory).expanduser()
    if root.exists() and not root.is_dir():
        raise AdapterError(f"{root} is a file; save_pretrained expects a folder path.")
    if not is_main_process:
        return root
    targets: list[tuple[str | None, Path]] = [(adapter_name, root)]
    if selected_adapters is not None:
        if isinstance(selected_adapters, str) or not selected_adapters:
            raise AdapterError(f"selected_adapters must be a non-empty list of names, got {selected_adapters!r}.")
        for name in selected_adapters:
            _check_name(name)  # every adapter but "default" becomes a subfolder of its name
        targets = [(name, root if name == "default" else root / name) for name in selected_adapters]
    peft_model = _savable_peft(ee, [folder for _, folder in targets], root)
    built = [(folder, _adapter_files(ee, name, base_model, base_model_revision)) for name, folder in targets]
    for folder, files in built:
        write_folder(folder, files, peft_model)
    return root


def _savable_peft(ee: EarlyExitModel, folders: list[Path], root: Path) -> Any:
    """``ee.peft_model`` when its adapter can be saved next to the exits (``None`` for a plain backbone)."""
    peft_model = ee.peft_model
    if peft_model is None:
        return None
    if len(peft_model.peft_config) > 1:
        raise AdapterError(
            f"the PeftModel holds several PEFT adapters ({sorted(peft_model.peft_config)}); the exits' fingerprint "
            "covers them all, but one folder holds one. Remove the unused ones with "
            "ee.peft_model.delete_adapter(name) (it works while attached), or merge them."
        )
    if root / PEFT_FOLDER in folders:
        raise AdapterError(
            f"an adapter named {PEFT_FOLDER!r} would be saved where the backbone's PEFT adapter goes; rename it."
        )
    return peft_model


# ---------------------------------------------------------------------------------------------- locating
def _is_hub_error(err: Exception, name: str) -> bool:
    # huggingface_hub moved its errors from `utils` to `errors` over the 0.2x releases; accept either home.
    import huggingface_hub.utils

    try:
        import huggingface_hub.errors as errors
    except ImportError:
        errors = huggingface_hub.utils  # type: ignore[assignment]
    cls = getattr(errors, name, None) or getattr(huggingface_hub.utils, name, None)
    return cls is not None and isinstance(err, cls)


def _hub_error(err: Exception, repo_id: str, revision: str | None) -> AdapterError:
    """Turn a huggingface_hub error into one that says what happened and what to do."""
    at = f" at revision {revision!r}" if revision else ""
    if _is_hub_error(err, "HFValidationError"):
        return AdapterError(f"{repo_id!r} is neither a local folder nor a valid Hub repo id ('org/name'): {err}")
    if _is_hub_error(err, "RevisionNotFoundError"):
        return AdapterError(
            f"the Hub repo {repo_id!r} has no revision {revision!r}; pass an existing branch, tag or commit hash."
        )
    if _is_hub_error(err, "RepositoryNotFoundError"):
        return AdapterError(
            f"no Hub repo {repo_id!r} (no local folder by that name either). Check the id; for a "
            "private or gated repo pass token= or log in with `hf auth login`."
        )
    if _is_hub_error(err, "LocalEntryNotFoundError"):
        return AdapterError(
            f"{repo_id!r} is no local folder, and as a Hub repo{at} it is not in the local Hugging "
            "Face cache while the Hub cannot be reached (offline, HF_HUB_OFFLINE=1 or "
            "local_files_only=True). Check the path, or connect once to download it."
        )
    if _is_hub_error(err, "EntryNotFoundError"):
        return AdapterError(
            f"the Hub repo {repo_id!r}{at} has no {CONFIG_NAME} / {WEIGHTS_NAME}: it is not an eexit "
            "adapter (PEFT adapters have adapter_config.json; load those with peft)."
        )
    return AdapterError(f"could not download the adapter {repo_id!r}{at} from the Hub ({type(err).__name__}: {err}).")


def _download(repo_id: str, subfolder: str | None, revision: str | None, **hub: Any) -> Path:
    from huggingface_hub import hf_hub_download

    from ._version import __version__

    kwargs = {
        "repo_id": repo_id,
        "subfolder": subfolder,
        "library_name": "eexit",
        "library_version": __version__,
        **hub,
    }
    try:
        config = Path(hf_hub_download(filename=CONFIG_NAME, revision=revision, **kwargs))
        # Pin the tensors to the commit the config came from, so a concurrent push cannot mix two adapters.
        commit = _snapshot_commit(config) or revision
        tensors = Path(hf_hub_download(filename=WEIGHTS_NAME, revision=commit, **kwargs))
    except EexitError:
        raise
    except Exception as err:  # any huggingface_hub or network failure, explained
        raise _hub_error(err, repo_id, revision) from err
    if tensors.parent != config.parent:
        raise AdapterError(f"the Hub returned the files of {repo_id!r} from two commits; load it again.")
    return config.parent


def _snapshot_commit(path: Path) -> str | None:
    """The commit of a file in the Hugging Face cache (``.../snapshots/<commit>/...``), if it is one."""
    parts = path.parts
    return next(
        (parts[i + 1] for i in range(len(parts) - 1) if parts[i] == "snapshots" and _COMMIT.match(parts[i + 1])),
        None,
    )


def _download_peft(repo_id: str, subfolder: str | None, folder: Path, revision: str | None, **hub: Any) -> Path:
    """Download the PEFT adapter saved next to an eexit adapter, at the eexit adapter's commit (else ``revision``).

    Every file is asked for (a file already in the cache costs nothing), so a snapshot holding part of an earlier
    download is completed. The eexit config records the PEFT adapter, so a file the repo lacks is an error, and so
    is one that is not in the cache while the Hub cannot be reached (never "no PEFT adapter").
    """
    from huggingface_hub import hf_hub_download

    from ._version import __version__

    commit = _snapshot_commit(folder / CONFIG_NAME) or revision
    sub = f"{subfolder}/{PEFT_FOLDER}" if subfolder else PEFT_FOLDER
    paths = []
    for name in PEFT_FILES:
        try:
            paths.append(
                Path(
                    hf_hub_download(
                        repo_id,
                        filename=name,
                        subfolder=sub,
                        revision=commit,
                        library_name="eexit",
                        library_version=__version__,
                        **hub,
                    )
                )
            )
        except Exception as err:
            # LocalEntryNotFoundError (offline, not cached) subclasses EntryNotFoundError: ask for it first.
            if _is_hub_error(err, "LocalEntryNotFoundError"):
                raise AdapterError(
                    f"the eexit adapter {repo_id!r} was trained on a PEFT-wrapped backbone and needs {sub}/{name}, "
                    "which is not in the local Hugging Face cache while the Hub cannot be reached (offline, "
                    "HF_HUB_OFFLINE=1 or local_files_only=True). Connect once to download it."
                ) from err
            if _is_hub_error(err, "EntryNotFoundError"):
                raise AdapterError(
                    f"the Hub repo {repo_id!r} (commit {commit}) lacks {sub}/{name}, which its eexit config says "
                    "was saved with the exits (the backbone's PEFT adapter); push the adapter again with "
                    "ee.push_to_hub() from the PEFT-wrapped backbone."
                ) from err
            raise _hub_error(err, repo_id, commit) from err
    return paths[0].parent


def peft_adapter_folder(
    saved: SavedAdapter,
    folder: Path,
    path_or_repo_id: str | os.PathLike[str],
    subfolder: str | None,
    revision: str | None = None,
    **hub: Any,
) -> Path | None:
    """The folder of the PEFT adapter saved next to the eexit adapter in ``folder`` (downloaded from the Hub if the
    adapter came from there), or ``None`` when the adapter's backbone had none or a local folder lacks it (the
    fingerprint check then says "plain backbone").

    Raises:
        AdapterError: the adapter came from the Hub and its PEFT files are missing there, or not cached offline.
    """
    if not saved.backbone.get("peft"):
        return None
    if Path(path_or_repo_id).expanduser().is_dir():
        return find_peft_folder(folder, saved)
    downloaded = _download_peft(str(path_or_repo_id), subfolder, folder, revision, **hub)
    recorded = saved.backbone["peft"].get("files")
    if recorded and not peft_files_match(downloaded, recorded):
        raise AdapterError(
            f"the PEFT adapter downloaded from {path_or_repo_id!r} ({downloaded}) does not have the sha256 its eexit "
            "config records; push the adapter again with ee.push_to_hub() from the PEFT-wrapped backbone."
        )
    return downloaded


def _adapter_folder(
    path_or_repo_id: str | os.PathLike[str], subfolder: str | None, revision: str | None, **hub: Any
) -> Path:
    """The folder holding the adapter's files: a local folder if there is one, else a Hub download."""
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        if not (folder / CONFIG_NAME).is_file():
            inside = sorted(p.parent.name for p in local.glob(f"*/{CONFIG_NAME}"))
            hint = f" It holds adapters in subfolders {inside}: pass subfolder=." if inside else ""
            if (folder / "adapter_config.json").is_file():
                hint = " It holds a PEFT adapter (adapter_config.json); load it with peft."
            raise AdapterError(f"no {CONFIG_NAME} in {folder}; this is not an eexit adapter folder.{hint}")
        return folder
    if not isinstance(path_or_repo_id, str) or path_or_repo_id.startswith((".", "/", "~")) or local.is_file():
        raise AdapterError(
            f"{str(path_or_repo_id)!r} is not a folder. Pass the folder save_pretrained wrote, or a "
            "Hub repo id such as 'org/name'."
        )
    return _download(path_or_repo_id, subfolder, revision, **hub)


def read_adapter_files(
    path_or_repo_id: str | os.PathLike[str], *, subfolder: str | None, revision: str | None, **hub: Any
) -> tuple[SavedAdapter, dict[str, Any], Path]:
    """Find, read and fully validate an adapter's config and tensors (touches no model); also returns the local
    folder they are in (a Hub download's snapshot folder), where a PEFT adapter saved with them is looked for."""
    folder = _adapter_folder(path_or_repo_id, subfolder, revision, **hub)
    saved, state = read_folder(folder)
    return saved, state, folder


def _check_name(adapter_name: object) -> None:
    check_adapter_name(adapter_name, AdapterError)


# ---------------------------------------------------------------------------------------------- loading
def read_pretrained(
    model: nn.Module,
    path_or_repo_id: str | os.PathLike[str],
    *,
    revision: str | None,
    adapter_name: str,
    subfolder: str | None,
    ignore_fingerprint: bool,
    attach_kwargs: dict[str, Any],
    **hub: Any,
) -> tuple[SavedAdapter, dict[str, Any], Any, dict[str, Any]]:
    """Read and check an adapter for the bare backbone ``model``, touching nothing.

    :func:`read_adapter_files`, :func:`check_pretrained` and :func:`~eexit._fingerprint.check_fingerprint` in one
    call, with :func:`eexit.from_pretrained`'s arguments (``hub``: ``cache_dir``, ``token``, ``local_files_only``):
    returns the saved adapter, its tensors, the spec to attach with and the keyword arguments for attach. It loads
    no PEFT adapter (``from_pretrained`` does, between these steps), so for an adapter saved with one
    (``peft_adapter/``) it only accepts the PeftModel already carrying that PEFT adapter: given the plain backbone,
    the fingerprint check refuses it ("plain backbone"). Use :func:`eexit.from_pretrained` to load both.
    """
    _check_name(adapter_name)
    saved, state, _ = read_adapter_files(path_or_repo_id, subfolder=subfolder, revision=revision, **hub)
    spec, attach_kwargs = check_pretrained(model, saved, attach_kwargs)
    check_fingerprint(saved, spec, model, ignore_fingerprint)
    return saved, state, spec, attach_kwargs


def check_pretrained(
    model: nn.Module, saved: SavedAdapter, attach_kwargs: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """Check that ``model`` (a backbone, or a PeftModel around one) can carry the saved adapter: same family,
    head, width and depth. Returns the spec to attach with and the keyword arguments for attach; the weights'
    fingerprint is checked apart (:func:`~eexit._fingerprint.check_fingerprint`)."""
    if not isinstance(model, nn.Module):
        raise AdapterError(f"from_pretrained expects the backbone (a torch.nn.Module), got {type(model).__name__}.")
    base, _ = split_peft(model)
    attach_kwargs = dict(attach_kwargs)
    spec = spec_for(base, saved, attach_kwargs.pop("spec", None), attach_kwargs.pop("backbone", None))
    check_structure(saved, spec, base)
    if "input_size" not in attach_kwargs and None in spec.input_shape(base) and saved.cost_table.input_shape:
        attach_kwargs["input_size"] = tuple(saved.cost_table.input_shape)
    attach_kwargs.setdefault("num_classes", saved.num_classes)
    return spec, attach_kwargs


def install_adapter(ee: EarlyExitModel, saved: SavedAdapter, state: dict[str, Any], adapter_name: str) -> None:
    """Load a read adapter's tensors and records into freshly attached exits (strictly), as ``adapter_name``."""
    try:
        ee.load_adapter_state_dict(state)
    except AdapterError:
        raise
    except EexitError as err:  # a shape or name mismatch: say which files it came from
        raise AdapterError(f"{saved.source}: {err}") from err
    ee.activate(
        AdapterRecord(
            state,
            saved.fit_config,
            list(saved.history or []),
            saved.evaluation,
            saved.exit_config.threshold,
            saved.boosted,
        )
    )
    ee.adapters.rename_active(adapter_name)
    _compare_costs(saved, ee)


def _compare_costs(saved: SavedAdapter, ee: EarlyExitModel) -> None:
    here, then = ee.cost_table.exit_flops if ee.cost_table else [], saved.cost_table.exit_flops
    if len(here) != len(then) or any(not math.isclose(a, b, rel_tol=0.01) for a, b in zip(here, then, strict=False)):
        warnings.warn(
            f"the cost table measured now ({here}) differs from the one saved in {saved.source} ({then}), "
            "e.g. after a torch upgrade; costs are reported from the one measured now.",
            UserWarning,
            stacklevel=3,
        )


def load_adapter(
    ee: EarlyExitModel,
    path_or_repo_id: str | os.PathLike[str],
    adapter_name: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    ignore_fingerprint: bool = False,
) -> None:
    """Add a saved adapter to ``ee`` as ``adapter_name`` (not activated; see ``ee.set_adapter``).

    The adapter must fit: same backbone family, exit blocks, classes, heads and gates, and backbone weights.

    Args:
        ee: the early-exit model to add to.
        path_or_repo_id, revision, subfolder, cache_dir, token, local_files_only, ignore_fingerprint: as in
            :func:`from_pretrained`.
        adapter_name: a name not yet used in ``ee``.

    Raises:
        AdapterError: the files are bad, the name is taken, or the adapter does not fit this model.
    """
    ee.adapters.check_new(adapter_name, AdapterError)
    saved, state, _ = read_adapter_files(
        path_or_repo_id,
        subfolder=subfolder,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
    )
    spec_for(ee.backbone, saved, ee.spec, None)
    check_structure(saved, ee.spec, ee.backbone)
    theirs, ours = saved.exit_config, ee.config
    differ = [
        f"{f}: {getattr(theirs, f)!r} vs {getattr(ours, f)!r}"
        for f in ("gates", "head", "head_hidden", "gate_features")
        if getattr(theirs, f) != getattr(ours, f)
    ]
    if saved.exit_blocks != ee.exit_blocks:
        differ.insert(0, f"exit_blocks: {saved.exit_blocks} vs {ee.exit_blocks}")
    if differ:
        raise AdapterError(
            f"{saved.source} does not fit this model's exits (saved vs here): {'; '.join(differ)}. "
            "Load it with eexit.from_pretrained onto the bare backbone instead."
        )
    check_fingerprint(saved, ee.spec, ee, ignore_fingerprint)
    # The adapter's own τ goes with it: set_adapter switches to it.
    record = AdapterRecord(
        state, saved.fit_config, list(saved.history or []), saved.evaluation, theirs.threshold, saved.boosted
    )
    try:
        ee.add_adapter(adapter_name, record)
    except EexitError as err:
        raise AdapterError(f"{saved.source}: {err}") from None


# ---------------------------------------------------------------------------------------------- pushing
def push_to_hub(
    ee: EarlyExitModel,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    adapter_name: str | None = None,
    base_model: str | None = None,
    base_model_revision: str | None = None,
) -> CommitInfo:
    """Upload an adapter to the Hub: the repo is created if needed, then ONE commit adds the three files.

    The files are built in memory; the card is freshly generated. For a PEFT-wrapped backbone the same commit adds
    its PEFT adapter under ``peft_adapter/`` (written by peft to a temporary folder first), as
    :func:`save_pretrained` lays it out.

    Args:
        ee: the model holding the adapter.
        repo_id: ``"org/name"`` (or ``"name"`` under your user).
        commit_message: default ``"Upload eexit adapter '<name>'"``.
        private: visibility of a newly created repo (an existing repo keeps its own).
        token: Hub token (default: the logged-in one).
        revision: branch to commit to (created if missing); default the main branch.
        create_pr: open a pull request instead of committing directly.
        adapter_name: which adapter to push (default: the active one).
        base_model, base_model_revision: as in :func:`save_pretrained`.

    Returns:
        The ``CommitInfo`` of the commit (its ``commit_url``, ``oid``, and ``pr_url`` with ``create_pr``).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    files = _adapter_files(ee, adapter_name, base_model, base_model_revision)
    peft_files = _peft_files(ee)  # before the repo is created: a PeftModel that cannot be saved is refused first
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(url, "repo_id", None) or repo_id  # "name" becomes "user/name"
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=data)
        for name, data in ((CONFIG_NAME, files.config), (WEIGHTS_NAME, files.tensors), (CARD_NAME, files.card()))
    ]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in peft_files]
    message = commit_message or f"Upload eexit adapter {files.meta['adapter_name']!r}"
    return api.create_commit(
        repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr, repo_type="model"
    )


def _peft_files(ee: EarlyExitModel) -> list[tuple[str, bytes]]:
    """The PEFT adapter's files as ``(path in the repo, bytes)``, for a PEFT-wrapped backbone (else none)."""
    peft_model = _savable_peft(ee, [], Path())
    if peft_model is None:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        folder = stage_peft(Path(tmp), peft_model, "push")
        return [(f"{PEFT_FOLDER}/{p.name}", p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()]

"""Upload a finished stage 9 folder to the Hugging Face Hub (``9_export_hf.py --push-to-hub``).

Only the Hugging Face files go up (``hf_folder_files``: never ``manifest.json`` or ``progress.json``), and
only from a finished export; ``--dry-run`` lists them with their sizes. The Hub is a network boundary:
every failure (offline, no token, a refused token, any other answer) becomes one ``UserError`` that says
what to do, with no traceback; the export itself stays complete either way.

Example::

    python 9_export_hf.py --config configs/tiny/export.yaml --push-to-hub me/dante-tiny --dry-run
"""

from __future__ import annotations

import re
from pathlib import Path

from dante import config as C
from dante.artifacts import stage_dir, stage_done
from dante.errors import UserError
from dante.export.hf_folder import hf_folder_files
from dante.export.stage import plan_lines


def upload_listing(folder: Path) -> tuple[list[str], int]:
    """One printable line per file that would be uploaded, and their total size in bytes."""
    files = hf_folder_files(folder)
    total = sum(f.stat().st_size for f in files)
    return [f"  {f.name}  {f.stat().st_size:,} bytes" for f in files], total


def _hub_failure(err: Exception, repo_id: str) -> str:
    """A one-paragraph reason for a failed upload (no traceback): offline, auth, or the hub's answer."""
    names = {c.__name__ for c in type(err).__mro__}
    if names & {"ConnectError", "ConnectionError", "ConnectTimeout", "NetworkError", "TransportError", "Timeout",
                "OfflineModeIsEnabled", "TimeoutException"}:
        return (f"cannot reach the Hugging Face Hub ({type(err).__name__}: {err}). The export itself is complete; "
                f"upload it later from a machine with network access:\n  python 9_export_hf.py --config <same config> "
                f"--push-to-hub {repo_id}")
    if names & {"LocalTokenNotFoundError"}:
        return "no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        return f"the Hub refused the token for {repo_id} (HTTP {status}): check HF_TOKEN has write access to that namespace"
    return f"upload to {repo_id} failed: {type(err).__name__}: {err}"


def push_to_hub(cfg: C.ExportStageConfig, repo_id: str, private: bool = False, dry_run: bool = False) -> list[str]:
    """Upload the finished export folder (HF files only, never manifest/progress). Returns printable lines."""
    folder = stage_dir(cfg.run, C.EXPORT)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id or ""):
        raise UserError(f"--push-to-hub {repo_id!r}: expected a repository id like your-name/dante-2b")
    if not stage_done(cfg.run, C.EXPORT):
        if dry_run:
            return [f"would upload to {repo_id} after the export finishes:"] + plan_lines(cfg)
        raise UserError(f"{folder} holds no finished export; run this script without --push-to-hub first "
                        "(or with it: the export runs, then the upload)")
    listing, total = upload_listing(folder)
    head = f"{'would upload' if dry_run else 'uploading'} {len(listing)} files ({total:,} bytes) from {folder} to {repo_id}" \
           f"{' (private)' if private else ''}:"
    if dry_run:
        return [head] + listing
    print(f"[09_export] {head}", flush=True)
    from huggingface_hub import HfApi  # only a push needs the Hub client (~0.5 s to import, measured)

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 allow_patterns=[f.name for f in hf_folder_files(folder)],
                                 commit_message=f"Dante export of run {cfg.run.name}")
    except Exception as err:  # network boundary: every failure becomes one clear message, no traceback
        raise UserError(_hub_failure(err, repo_id)) from None
    return [f"uploaded: {getattr(info, 'commit_url', None) or repo_id}"]

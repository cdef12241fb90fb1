"""Checkpoint IO and format: atomic local writes, the run-directory guard, format versions.

A selfsup checkpoint is a Lightning checkpoint plus ``checkpoint["selfsup"]``: ``format`` (:data:`FORMAT`),
``method``, ``backbone`` (the registry spec ``{name, kwargs}``), ``backbones`` (``{which: state-dict
prefix}`` for ``online`` and every declared teacher with a backbone copy), ``num_features``, the run's
config and RNG states. :func:`upgrade_checkpoint` brings older formats to this one in place, so
evaluation, export and resume read every checkpoint selfsup ever wrote:

* format 1 (first MMCR release): flat ``backbone_config``, ``backbone_prefix``, ``feature_dim``, and the
  momentum branch as ``method.momentum.copies.{0,1}.*`` (backbone, projector), which format 2 declares as
  the teacher ``method.teacher.{backbone,projector}.*``;
* format 2: no ``signature`` (:meth:`selfsup.methods.Method.checkpoint_signature`). IMLE's mapping networks then
  computed with an equalised-lr gain of 1.0 (the seed's, since format 3, is sqrt(2)): the upgrade records
  ``signature.mapping_gain = 1.0`` and writes ``gain: 1.0`` into the stored config, so an old IMLE checkpoint is
  rebuilt as it was trained (``selfsup reconstruct``) and a resume with the new default is refused by name.

A checkpoint is first written to a temporary file in the same directory, flushed to disk
(``fsync``) and then renamed over the target, so a crash or a kill never leaves a half-written
``.ckpt``. Remote URLs go through Lightning's own (transactional) writer.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from selfsup.models.registry import backbone_spec

CHECKPOINT_KEY = "selfsup"
FORMAT = 3
_V1_TEACHER = {
    "method.momentum.copies.0.": "method.teacher.backbone.",
    "method.momentum.copies.1.": "method.teacher.projector.",
}


def upgrade_checkpoint(checkpoint: dict) -> dict:
    """Bring a selfsup checkpoint dict to :data:`FORMAT`, in place; returns it.

    Raises ``ValueError`` for a dict that is not a selfsup checkpoint, or one from a newer selfsup.
    """
    meta = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(meta, dict):
        raise ValueError("not a selfsup training checkpoint (no 'selfsup' entry)")
    version = int(meta.get("format", 1))
    if version > FORMAT:
        raise ValueError(f"checkpoint format {version} is newer than this selfsup reads ({FORMAT}); upgrade selfsup")
    if version == 1:
        state = checkpoint.get("state_dict", {})
        renamed = {}
        for k, v in state.items():
            for old, new in _V1_TEACHER.items():
                if k.startswith(old):
                    k = new + k[len(old) :]
                    break
            renamed[k] = v
        checkpoint["state_dict"] = renamed
        meta["backbone"] = backbone_spec(meta.pop("backbone_config"))
        meta["backbones"] = {"online": meta.pop("backbone_prefix", "method.backbone.")}
        if any(k.startswith("method.teacher.backbone.") for k in renamed):
            meta["backbones"]["teacher"] = "method.teacher.backbone."
        meta["num_features"] = meta.pop("feature_dim", None)
        version = 2
    if version == 2:
        meta["signature"] = {}
        if meta.get("method") == "IMLE":
            _legacy_mapping_gain(meta)
    meta["format"] = FORMAT
    return checkpoint


def _legacy_mapping_gain(meta: dict) -> None:
    """A format-2 IMLE checkpoint: its mapping networks computed with gain 1.0 (see the module docstring)."""
    init = ((meta.get("config") or {}).get("method") or {}).get("init_args")
    if isinstance(init, dict) and init.get("ignore_codes"):
        return  # the MAE arm: no mapping network
    meta["signature"]["mapping_gain"] = 1.0
    if isinstance(init, dict):
        latent = init.get("latent")
        latent = dict(latent) if isinstance(latent, dict) else {}
        latent["mapping"] = {**(latent.get("mapping") or {}), "gain": 1.0}
        init["latent"] = latent


def check_compatible(saved: dict, current: dict, path: str = "the checkpoint") -> None:
    """The one resume check: the checkpoint must hold the same method and backbone as the configured run.

    ``saved`` is an upgraded checkpoint's ``selfsup`` entry, ``current`` ``SelfSupModule.checkpoint_meta()``.
    """
    if saved.get("method") != current["method"] or saved.get("backbone") != current["backbone"]:
        raise ValueError(
            f"{path} holds {saved.get('method')} with backbone {saved.get('backbone')}, which differs from the "
            f"configured {current['method']} with backbone {current['backbone']}; resume with the run's own config"
        )
    saved_sig, current_sig = saved.get("signature") or {}, current.get("signature") or {}
    for key in sorted(set(saved_sig) & set(current_sig)):
        if saved_sig[key] != current_sig[key]:
            hint = " (--method.init_args.latent.mapping.gain)" if key == "mapping_gain" else ""
            raise ValueError(
                f"{path} was trained with {key} = {saved_sig[key]}, the configured run has {current_sig[key]}{hint}; "
                "resume with the value the checkpoint was trained with, or start a new run"
            )


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a temporary file + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def existing_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    d = Path(run_dir) / "checkpoints"
    return sorted(d.glob("*.ckpt")) if d.is_dir() else []


def resolve_resume(run_dir: str | os.PathLike, resume: bool | str) -> Optional[str]:
    """Which checkpoint to resume from; refuses to reuse a run directory silently.

    * ``resume`` false and ``run_dir`` already holds checkpoints: error (nothing is overwritten).
    * ``resume`` true: ``run_dir/checkpoints/last.ckpt`` (error if absent).
    * ``resume`` ``auto``: the newest of Lightning's SLURM pre-emption checkpoints (``hpc_ckpt_*.ckpt``) or
      ``last.ckpt`` when there is one, else a fresh start. A requeued SLURM job (``SLURM_RESTART_COUNT`` > 0)
      behaves as ``auto`` so that it continues instead of refusing its own run directory.
    * ``resume`` a path: that file (error if absent).
    """
    if resume is False and os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
        resume = "auto"
    if resume == "auto":
        hpc = sorted(Path(run_dir).glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
        last = Path(run_dir) / "checkpoints" / "last.ckpt"
        return str(hpc[-1]) if hpc else (str(last) if last.is_file() else None)
    if resume is False or resume in ("", "false", "False", None):
        found = existing_checkpoints(run_dir)
        if found:
            raise FileExistsError(
                f"run directory '{run_dir}' already holds checkpoints ({found[0].name}, ...): pass "
                "--trainer.resume true to continue that run, or choose another --trainer.out_dir. Nothing was overwritten."
            )
        return None
    if resume is True or resume in ("true", "True", "last"):
        last = Path(run_dir) / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"--trainer.resume true, but there is no '{last}' to resume from")
        return str(last)
    p = Path(str(resume))
    if not p.is_file():
        raise FileNotFoundError(f"resume checkpoint '{p}' does not exist")
    return str(p)

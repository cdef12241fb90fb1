r"""IMLE-SSL: an MAE whose encoder is modulated by latent codes, trained by implicit maximum likelihood (spec §3).

The model is the :class:`~selfsup.methods.mae.MAE` with a :class:`~selfsup.models.latent.LatentInjector` on chosen
encoder blocks (``out = s(z) + y ⊙ (1 + g(z))``, codes ``z ~ N(0, I)``). Training runs in planned epochs
(:class:`~selfsup.data.rounds.EpochPlan`; the engine draws ``E = examples_per_epoch`` examples per epoch, each used
``k`` or ``k − 1`` times over the run, and makes one view per example, fixed for the epoch)::

    m_i          ← one random mask per example, fixed for the epoch               (from the epoch's generator)
    for each chunk of ``code_batch`` examples, without gradients:
        incumbent ← (index 0, +inf)
        for round r = 0 .. ns/sp − 1:
            Z      ← sp fresh codes per example                                      [n·sp, W, d]
            ℓ[i,j] ← masked-mean MAE loss of example i under (m_i, Z[i·sp + j])      [n, sp]
            keep Z[i, j*] where ℓ[i, j*] < incumbent (strictly; j* the round's first minimum)
    train ``steps`` optimiser steps on minibatches of (view_i, m_i, z_i*): loss = mean_i ℓ_i(z_i*)

``ignore_codes: true`` is the seed's MAE arm: no injector, no search (the seed still ran it and threw it away), the
same data pipeline (one fixed view and mask per example per epoch). Under DDP every rank searches its own share of
the epoch's examples. The chosen codes are per-rank state carried through checkpoints, so a run resumed inside an
epoch trains on exactly the codes the uninterrupted run found.

Logged per epoch: ``epoch/first_loss`` (mean of each example's best code in round 0), ``epoch/end_loss`` (after all
rounds), ``epoch/no_code_loss`` (codes ignored, the seed's ``delta_wrt_no_z`` reference) and ``epoch/codes_s``
(codes scored per second).
"""

from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

from selfsup.data.rounds import EpochPlan
from selfsup.losses.imle import IMLEIncumbent, repeat_examples
from selfsup.losses.mae import mae_loss
from selfsup.methods.base import Batch, EpochExamples
from selfsup.methods.mae import MAE
from selfsup.methods.registry import register_method
from selfsup.models import BackboneSpec
from selfsup.models.latent import LatentConfig, LatentInjector
from selfsup.models.masked_vit import DecoderConfig, Masking, pool_tokens
from selfsup.precision import native_bf16

__all__ = ["IMLE"]


@register_method
class IMLE(MAE):
    """IMLE-SSL on a registry ViT (defaults: the seed's README run).

    Args:
        backbone, mask_ratio, norm_pix_loss, decoder, mae_init, init_from: as :class:`~selfsup.methods.mae.MAE`
            (``init_from``: one of our MAE checkpoints or the official MAE release's full checkpoint with decoder).
        latent: :class:`~selfsup.models.latent.LatentConfig` (``inject: [[11, adain]]``, ``code_dim``, ``mapping``).
        ignore_codes: the MAE arm (no codes, no search).
        examples_per_epoch: ``E`` (``ex_per_epoch``), over all ranks.
        iterations_per_epoch: optimiser steps per epoch asked for (``ipe``); the epoch runs whole passes.
        num_codes: codes tried per example per epoch (``ns``).
        codes_per_round: codes scored per example in one pass (``sp``); ``num_codes`` must be a multiple.
        code_batch: examples per scoring pass (``code_bs``): a pass scores ``code_batch · codes_per_round`` rows.
        latent_lr_mult: learning rate of the mapping networks as a multiple of the MAE's (``lr_z / lr``).
        search_precision: ``auto`` (bf16 autocast where the device computes bf16 natively: CUDA with bf16, a CPU
            with AVX-512-BF16 / AMX; fp32 elsewhere), ``fp32``, ``bf16``, ``fp16``; scores are compared in fp32.
        shuffle: shuffle the example stream and each pass (``shuffle_data``).
    """

    num_views = 1
    tiny = {
        **MAE.tiny,
        "latent": {"inject": [[0, "adain"]], "code_dim": 8, "mapping": {"depth": 2, "hidden": 16}},
        "examples_per_epoch": 48,
        "num_codes": 4,
        "codes_per_round": 2,
    }
    tiny_variants = {"mae_arm": {"ignore_codes": True}}

    def __init__(
        self,
        backbone: Optional[BackboneSpec] = None,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder: Optional[DecoderConfig] = None,
        mae_init: bool = True,
        init_from: Optional[str] = None,
        latent: Optional[Union[LatentConfig, dict]] = None,
        ignore_codes: bool = False,
        examples_per_epoch: int = 2048,
        iterations_per_epoch: int = 32,
        num_codes: int = 128,
        codes_per_round: int = 64,
        code_batch: int = 32,
        latent_lr_mult: float = 1.0,
        search_precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
        shuffle: bool = True,
    ):
        super().__init__(backbone, mask_ratio, norm_pix_loss, decoder, mae_init, init_from=None)
        if isinstance(latent, dict):
            latent = LatentConfig(**latent)
        self.ignore_codes = bool(ignore_codes)
        sp = min(int(codes_per_round), int(num_codes))  # the seed clips sp to ns
        if num_codes < 1 or sp < 1 or num_codes % sp:
            raise ValueError(
                f"num_codes ({num_codes}) must be a positive multiple of codes_per_round ({codes_per_round})"
            )
        if code_batch < 1:
            raise ValueError(f"code_batch must be >= 1, got {code_batch}")
        if search_precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"search_precision must be auto, fp32, bf16 or fp16, got {search_precision!r}")
        self.plan = EpochPlan(int(examples_per_epoch), int(iterations_per_epoch), bool(shuffle))
        self.num_codes, self.codes_per_round, self.code_batch = int(num_codes), sp, int(code_batch)
        self.latent_lr_mult, self.search_precision = float(latent_lr_mult), search_precision
        vit = self.backbone
        self.latent: Optional[LatentInjector] = None
        if not self.ignore_codes:
            self.latent = LatentInjector(vit.embed_dim, len(vit.blocks), latent or LatentConfig()).attach(vit)
        if init_from:
            self.load_mae(init_from)
        # The epoch's state: rows of the epoch's examples, their fixed masks and chosen codes.
        self._epoch: Optional[int] = None
        self._rows: dict[int, int] = {}
        self._masking: Optional[Masking] = None
        self._codes: Optional[Tensor] = None  # [E, W, d]
        self._restored: Optional[dict[str, Tensor]] = None

    # ------------------------------------------------------------------------------ the engine's seams
    def checkpoint_signature(self) -> dict[str, Any]:
        """The mapping networks' equalised-lr gain (``latent.mapping.gain``): checkpoints before format 3 computed
        with 1.0, and a resume must keep the gain its weights were trained with."""
        return {} if self.latent is None else {"mapping_gain": float(self.latent.config.mapping.gain)}

    def epoch_plan(self) -> EpochPlan:
        return self.plan

    def param_groups(self) -> list[dict[str, Any]]:
        mae = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("latent.")]
        groups = [{"name": "mae", "params": mae}]
        if self.latent is not None:
            groups.append(self.latent.param_group(self.latent_lr_mult))
        return groups

    def rank_state(self) -> Optional[dict[str, Tensor]]:
        if self._codes is None:
            return None
        rows = sorted(self._rows, key=self._rows.get)
        return {"epoch": int(self._epoch), "indices": torch.tensor(rows, dtype=torch.long), "codes": self._codes}

    def load_rank_state(self, state: dict[str, Tensor]) -> None:
        self._restored = dict(state)

    def prepare_epoch(self, ex: EpochExamples) -> dict[str, float]:
        """Fix one mask per example and (IMLE arm) search each example's code."""
        b, _ = self.check_views(ex.views)
        x = ex.views[:, 0]
        self._epoch = ex.epoch
        self._rows = {int(i): r for r, i in enumerate(ex.indices.tolist())}
        self._masking = self.draw_masking(b, ex.generator)
        self._codes = None
        if self.latent is None:
            return {}
        restored, self._restored = self._restored, None
        if (
            restored is not None
            and int(restored["epoch"]) == ex.epoch
            and torch.equal(restored["indices"].cpu(), ex.indices.cpu())
        ):
            self._codes = restored["codes"].to(x.device)
            return {}
        return self.search(x, self._masking, ex.generator)

    # ------------------------------------------------------------------------------ the code search
    def _autocast(self, device: torch.device):
        p = self.search_precision
        if p == "auto":
            p = "bf16" if native_bf16(device.type) else "fp32"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p)
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def score_codes(self, imgs: Tensor, masking: Masking, z: Optional[Tensor]) -> Tensor:
        """Per-(example, code) masked-mean loss ``[N, k]`` of ``imgs [N, C, H, W]`` under ``masking`` and codes
        ``z [N·k, W, d]`` (example-major; ``None``: codes ignored, ``k = 1``). One encoder pass: the blocks before
        the first wrapped block run once per example."""
        k = 1 if z is None else z.shape[0] // imgs.shape[0]
        if self.latent is None or z is None:
            latent = self.forward_encoder(imgs, masking.keep)
        else:
            with self.latent.codes(z):
                latent = self.forward_encoder(imgs, masking.keep)  # [N·k, 1 + K, D]
        pred = self.forward_decoder(self.decoder_tokens(latent), repeat_examples(masking.restore, k))
        loss = mae_loss(
            repeat_examples(imgs, k),
            pred,
            repeat_examples(masking.mask, k),
            self.patch_size,
            self.norm_pix_loss,
            reduction="none",
        )  # [N·k]
        return loss.view(imgs.shape[0], k)

    @torch.no_grad()
    def search(self, imgs: Tensor, masking: Masking, generator: torch.Generator) -> dict[str, float]:
        """Each example's best of ``num_codes`` codes (rounds of ``codes_per_round``), kept in ``self._codes``."""
        assert self.latent is not None
        was_training = self.training
        self.eval()  # dropout / drop-path off while scoring (the ViTs here have none by default)
        n, sp = imgs.shape[0], self.codes_per_round
        codes = torch.empty(n, self.latent.num_codes, self.latent.code_dim, device=imgs.device)
        first, end, plain = [], [], []
        t0 = time.perf_counter()
        try:
            with self._autocast(imgs.device):
                for c in range(0, n, self.code_batch):
                    x, m = imgs[c : c + self.code_batch], masking.rows(slice(c, c + self.code_batch))
                    inc = IMLEIncumbent(x.shape[0], imgs.device)
                    for r in range(self.num_codes // sp):
                        z = self.latent.sample_codes(x.shape[0] * sp, generator)  # [n·sp, W, d]
                        scores = self.score_codes(x, m, z).float()  # [n, sp]
                        inc.update(scores, z.view(x.shape[0], sp, *z.shape[1:]))
                        if r == 0:
                            first.append(inc.score.clone())
                    codes[c : c + x.shape[0]] = inc.codes
                    end.append(inc.score)
                    plain.append(self.score_codes(x, m, None).float()[:, 0])
        finally:
            self.train(was_training)
        seconds = time.perf_counter() - t0
        self._codes = codes
        return {
            "first_loss": torch.cat(first).mean().item(),
            "end_loss": torch.cat(end).mean().item(),
            "no_code_loss": torch.cat(plain).mean().item(),
            "codes_s": n * self.num_codes / max(seconds, 1e-9),
        }

    # ------------------------------------------------------------------------------ training
    def training_loss(self, batch: Batch) -> dict[str, Any]:
        self.check_views(batch.views)
        if self._masking is None:
            raise RuntimeError("IMLE trains in planned epochs: prepare_epoch must run first (the engine does)")
        try:
            rows = torch.tensor([self._rows[int(i)] for i in batch.indices.tolist()], device=batch.views.device)
        except KeyError as e:
            raise RuntimeError(f"example {e} was not prepared for epoch {self._epoch}") from None
        x, masking = batch.views[:, 0], self._masking.rows(rows)
        z = None if self._codes is None else self._codes[rows]
        if z is None:
            out = self.forward_loss(x, masking)
        else:
            with self.latent.codes(z):
                out = self.forward_loss(x, masking)
        pooled = pool_tokens(self.backbone, out.latent).detach()
        return {"loss": out.loss, "embeddings": {"backbone": pooled}}

    # ------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def heldout_loss(self, imgs: Tensor, generator: torch.Generator, num_codes: int = 128, chunk: int = 32) -> Tensor:
        """``[N]`` masked loss of ``imgs`` under a fresh random mask each, averaged over ``num_codes`` random codes
        (the expectation under the prior, the seed's ``loss_te``); ``num_codes=0`` or the MAE arm: codes ignored."""
        if self.latent is None or num_codes == 0:
            return super().heldout_loss(imgs, generator, num_codes, chunk)
        out = []
        for c in range(0, imgs.shape[0], chunk):
            x = imgs[c : c + chunk]
            m = self.draw_masking(x.shape[0], generator)
            z = self.latent.sample_codes(x.shape[0] * num_codes, generator)
            out.append(self.score_codes(x, m, z).float().mean(1))
        return torch.cat(out)

    @torch.no_grad()
    def reconstruct_with_codes(
        self, imgs: Tensor, masking: Masking, num_codes: int, generator: torch.Generator
    ) -> Tensor:
        """Predictions ``[N, k, L, p² C]`` of ``imgs`` under one masking and ``k`` random codes each (the grid of
        ``selfsup reconstruct --codes k``); the MAE arm repeats its single prediction."""
        if self.latent is None:
            return self.predict(imgs, masking)[:, None].expand(-1, num_codes, -1, -1)
        z = self.latent.sample_codes(imgs.shape[0] * num_codes, generator)
        with self.latent.codes(z):
            latent = self.forward_encoder(imgs, masking.keep)
        pred = self.forward_decoder(self.decoder_tokens(latent), repeat_examples(masking.restore, num_codes))
        return pred.view(imgs.shape[0], num_codes, *pred.shape[1:])

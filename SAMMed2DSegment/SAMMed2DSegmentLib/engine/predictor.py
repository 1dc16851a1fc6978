"""`SamMed2DPredictor`: the official `SammedPredictor` semantics with input validation.

SAM users know this interface: `set_image` once per slice (the expensive encoder call), then any number of
cheap `predict` calls with points, a box and/or the previous mask. Inputs are validated so that a bad prompt
raises `ValueError` instead of silently producing a wrong mask.

`precision` picks the encoder's arithmetic (see `precision.py`): "fp32" (the default here, the exact
parity-tested path), "bf16"/"fp16" (a separate low-precision forward; the embedding is kept in that
precision), "int8" (that forward with int8 products, fp32 embeddings) or "auto". The prompt encoder and the
mask decoder always run in the model's own dtype (cheap, and where the mask edges are decided). `int8_file`
keeps the quantized int8 weights between starts (`weights/int8_weights.py`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..model.sam import SamMed2D
from .precision import PrecisionChoice, resolve_precision
from .preprocessing import as_rgb_uint8, model_input

if TYPE_CHECKING:
    from ..model.lowp_encoder import LowPrecisionEncoder
    from ..weights.int8_weights import Int8WeightsFile

log = logging.getLogger("SAMMed2D.predictor")

LOW_RES = 64


@dataclass
class DecoderOutput:
    """Everything one decoder call produced, for callers that need more than the selected mask."""

    low_res_all: torch.Tensor  # 1×4×64×64 logits, token 0 = single-mask output
    iou_all: torch.Tensor  # 1×4
    sparse: torch.Tensor
    dense: torch.Tensor


class SamMed2DPredictor:
    def __init__(
        self,
        model: SamMed2D,
        precision: str = "fp32",
        int8_file: Int8WeightsFile | None = None,
        shared_encoders: dict[str, LowPrecisionEncoder] | None = None,
    ) -> None:
        """`shared_encoders`: low-precision encoders already prepared for this same model (unchanged since),
        by precision; this predictor takes its own from there and adds it there (a batch worker's cases)."""
        self.model = model
        self.int8_file = int8_file
        self.shared_encoders = shared_encoders
        self.precision_choice: PrecisionChoice = resolve_precision(precision, self.device)
        self._lowp_encoder = None  # prepared on first use (`lowp_encoder`) or by `prepare_in_background`
        self._preparing: threading.Thread | None = None
        self._cancelled = threading.Event()
        self._prepared = threading.Event()  # a background preparation's encoder is out (or it failed)
        if precision != "fp32":
            log.info("encoder precision %s (%s)", self.precision, self.precision_choice.reason)
        self.reset_image()

    @property
    def precision(self) -> str:
        """The precision the encoder runs in ("fp32", "bf16", "fp16" or "int8"; "auto" already resolved)."""
        return self.precision_choice.precision

    @property
    def embedding_dtype(self) -> torch.dtype:
        """The dtype embeddings are computed and kept in."""
        dtype = self.precision_choice.dtype
        return dtype if self.precision in ("bf16", "fp16") else self.dtype  # int8 keeps fp32 embeddings

    @property
    def lowp_encoder(self) -> LowPrecisionEncoder | None:
        """The low-precision encoder (None at fp32). Its weights (a transposed, cast or quantized copy of the
        encoder's) are prepared on first use, not when the predictor is made: a start whose first masks
        come from cached embeddings never pays for them, and the engine answers sooner. Where
        `prepare_in_background` started them, the first use waits for that instead (not for the int8
        weights' write into the cache, which follows)."""
        if self.precision == "fp32":
            return None
        if self._preparing is not None:
            self._prepared.wait()
            if self._lowp_encoder is None:  # stopped or failed there: prepared anew here
                self._preparing.join()
                self._preparing = None
        if self._lowp_encoder is None and self.shared_encoders is not None:
            self._lowp_encoder = self.shared_encoders.get(self.precision)
        if self._lowp_encoder is None:
            self._lowp_encoder = self._prepare_lowp()
            self._keep_int8_weights(self._lowp_encoder)
        if self.shared_encoders is not None:
            self.shared_encoders.setdefault(self.precision, self._lowp_encoder)
        return self._lowp_encoder

    def prepare_in_background(self) -> None:
        """Start preparing the low-precision weights in a thread (torch releases the GIL): the engine calls
        this right after a model loads, so the user's first click finds them ready (int8 takes seconds on a
        2-core CPU). A failure there is raised again by the first use, which prepares anew. Only on the CPU
        and CUDA: MPS aborts on work from several threads."""
        if self.shared_encoders is not None and self._lowp_encoder is None:
            self._lowp_encoder = self.shared_encoders.get(self.precision)
        if self.precision == "fp32" or self._lowp_encoder is not None or self._preparing is not None:
            return
        if self.device.type not in ("cpu", "cuda"):
            return
        from ..model.lowp_encoder import PreparationCancelled

        cancelled = self._cancelled = threading.Event()
        prepared = self._prepared = threading.Event()

        def prepare() -> None:
            try:
                encoder = self._lowp_encoder = self._prepare_lowp(cancelled)
            except PreparationCancelled:
                log.info("preparing the %s weights stopped: the model was replaced", self.precision)
                return
            except Exception:  # noqa: BLE001 - the first use prepares again and raises it there
                log.exception("preparing the %s weights failed", self.precision)
                return
            finally:
                prepared.set()
            if not cancelled.is_set():  # after the encoder is out: a click need not wait for the disk
                self._keep_int8_weights(encoder)

        self._preparing = threading.Thread(target=prepare, name="SAMMed2D-lowp-weights", daemon=True)
        self._preparing.start()

    def cancel_preparation(self) -> None:
        """Stop a background preparation at the next block (the engine replaces the model): it would hold
        the old model and take the cores the new one's load needs. Returns at once."""
        if self._preparing is not None:
            self._cancelled.set()

    def _prepare_lowp(self, cancelled: threading.Event | None = None) -> LowPrecisionEncoder:
        from ..model.lowp_encoder import LowPrecisionEncoder

        start = time.perf_counter()
        dtype = self.precision_choice.dtype
        kept = self.int8_file.read() if self.int8_file is not None and dtype == torch.qint8 else None
        encoder = LowPrecisionEncoder(self.model.image_encoder, dtype, cancelled=cancelled, int8_weights=kept)
        encoder = encoder.to(self.device)
        log.info("%s weights prepared in %.2f s", self.precision, time.perf_counter() - start)
        return encoder

    def _keep_int8_weights(self, encoder: LowPrecisionEncoder) -> None:
        """Write int8 weights quantized here into the cache for the next start, then drop the values (the
        products are packed). The cache only saves time: no failure here reaches the user."""
        try:
            if encoder.int8_quantized_here and self.int8_file is not None:
                self.int8_file.write(encoder.int8_weights)
        except Exception:  # noqa: BLE001 - e.g. out of memory for the file's bytes
            log.exception("could not keep the int8 weights")
        finally:
            encoder.int8_weights = {}

    # -- image ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def reset_image(self) -> None:
        self.features: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_image: torch.Tensor | None = None

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """Validated image → normalised, resized 1×3×256×256 float32 tensor (on the CPU)."""
        return torch.from_numpy(model_input(as_rgb_uint8(image), self.image_size))

    def set_image(self, image: np.ndarray) -> None:
        """Encode an H×W or H×W×3 uint8 image and keep its embedding for `predict`."""
        rgb = as_rgb_uint8(image)
        x = torch.from_numpy(model_input(rgb, self.image_size))
        if self.precision != "fp32":
            features = self.lowp_encoder(x.to(self.device)).to(self.embedding_dtype)
        else:
            with torch.inference_mode():
                features = self.model.image_encoder(x.to(self.device, self.dtype))
        self.input_image = x
        self.set_embedding(features, rgb.shape[:2])

    def set_embedding(self, features: torch.Tensor, original_size: tuple[int, int]) -> None:
        """Reuse an embedding computed earlier (e.g. from a cache) for an image of `original_size` (H, W).
        A floating-point embedding keeps its dtype (a bf16 one stays bf16; the decoder casts it)."""
        expected = (1, self.model.prompt_encoder.embed_dim, *self.model.prompt_encoder.image_embedding_size)
        if tuple(features.shape) != expected:
            raise ValueError(f"embedding must have shape {expected}, got {tuple(features.shape)}")
        h, w = (int(v) for v in original_size)
        if h < 1 or w < 1:
            raise ValueError(f"original size must be positive, got {original_size}")
        dtype = features.dtype if features.is_floating_point() else self.dtype
        self.features = features.to(self.device, dtype)
        self.original_size = (h, w)

    def get_image_embedding(self) -> torch.Tensor:
        if self.features is None:
            raise RuntimeError("no image set: call set_image() first")
        return self.features

    # -- prompts ----------------------------------------------------------------------------------
    def transform_coords(self, coords: np.ndarray) -> np.ndarray:
        """Original (x, y) pixels → the 256 frame, per axis, in float64 as the official code does."""
        assert self.original_size is not None
        h, w = self.original_size
        out = np.array(coords, dtype=np.float64, copy=True)
        out[..., 0] = out[..., 0] * (self.image_size / w)
        out[..., 1] = out[..., 1] * (self.image_size / h)
        return out

    def transform_boxes(self, boxes: np.ndarray) -> np.ndarray:
        return self.transform_coords(np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2)).reshape(-1, 4)

    def _validate_prompts(
        self,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        box: np.ndarray | None,
        mask_input: np.ndarray | torch.Tensor | None,
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, torch.Tensor | None]:
        assert self.original_size is not None
        h, w = self.original_size
        coords = labels = box_arr = mask = None
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        if point_coords is not None:
            coords = np.asarray(point_coords, dtype=np.float64)
            labels = np.asarray(point_labels)
            if coords.ndim != 2 or coords.shape[1] != 2:
                raise ValueError(f"point_coords must be N×2 (x, y), got shape {coords.shape}")
            if coords.shape[0] == 0:
                raise ValueError("point_coords is empty; pass None for no points")
            if labels.shape != (coords.shape[0],):
                raise ValueError(f"point_labels must have shape ({coords.shape[0]},), got {labels.shape}")
            if not np.isfinite(coords).all():
                raise ValueError("point_coords contains NaN or infinite values")
            if not np.isin(labels, (0, 1)).all():
                raise ValueError(f"point_labels must be 1 (include) or 0 (exclude), got {np.unique(labels)}")
            outside = (
                (coords[:, 0] < -0.5)
                | (coords[:, 0] > w - 0.5)
                | (coords[:, 1] < -0.5)
                | (coords[:, 1] > h - 0.5)
            )
            if outside.any():
                raise ValueError(
                    f"point(s) {coords[outside].tolist()} lie outside the {w}×{h} image (x in [0, {w - 1}], "
                    f"y in [0, {h - 1}])"
                )
            labels = labels.astype(np.int64)
        if box is not None:
            box_arr = np.asarray(box, dtype=np.float64).reshape(-1)
            if box_arr.shape != (4,):
                raise ValueError(f"box must be [x0, y0, x1, y1], got shape {np.shape(box)}")
            if not np.isfinite(box_arr).all():
                raise ValueError("box contains NaN or infinite values")
            x0, y0, x1, y1 = box_arr
            if x1 < x0 or y1 < y0:
                raise ValueError(f"degenerate box {box_arr.tolist()}: need x0 ≤ x1 and y0 ≤ y1")
            if x1 < -0.5 or y1 < -0.5 or x0 > w - 0.5 or y0 > h - 0.5:
                raise ValueError(f"box {box_arr.tolist()} does not overlap the {w}×{h} image")
        if mask_input is not None:
            mask = torch.as_tensor(mask_input)
            if mask.ndim == 3:
                mask = mask[None]
            if tuple(mask.shape) != (1, 1, LOW_RES, LOW_RES):
                raise ValueError(f"mask_input must be 1×64×64 or 1×1×64×64, got {tuple(mask.shape)}")
            if not mask.is_floating_point():
                raise ValueError(f"mask_input must be floating point (probabilities), got {mask.dtype}")
            if not torch.isfinite(mask).all():
                raise ValueError("mask_input contains NaN or infinite values")
        if coords is None and box_arr is None and mask is None:
            raise ValueError("no prompt given: pass points, a box and/or mask_input")
        return coords, labels, box_arr, mask

    # -- prediction -------------------------------------------------------------------------------
    def decode(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | torch.Tensor | None = None,
    ) -> DecoderOutput:
        """Prompt encoder + mask decoder for all four mask tokens (prompts in original pixels)."""
        if self.features is None:
            raise RuntimeError("no image set: call set_image() first")
        coords, labels, box_arr, mask = self._validate_prompts(point_coords, point_labels, box, mask_input)
        device, dtype = self.device, self.dtype
        points_t = box_t = mask_t = None
        if coords is not None:
            c = torch.as_tensor(self.transform_coords(coords), dtype=torch.float32, device=device)
            lab = torch.as_tensor(labels, dtype=torch.int32, device=device)
            points_t = (c[None].to(dtype), lab[None])
        if box_arr is not None:
            box_t = torch.as_tensor(self.transform_boxes(box_arr), dtype=torch.float32, device=device)[None]
            box_t = box_t.to(dtype)
        if mask is not None:
            mask_t = mask.to(device, dtype)
        with torch.inference_mode():
            sparse, dense = self.model.prompt_encoder(points_t, box_t, mask_t)
            low_res, iou = self.model.mask_decoder.predict_masks(
                self.features.to(dtype), self.model.prompt_encoder.get_dense_pe(), sparse, dense
            )
        return DecoderOutput(low_res_all=low_res, iou_all=iou, sparse=sparse, dense=dense)

    def postprocess_masks(self, low_res: torch.Tensor) -> torch.Tensor:
        """64×64 logits → 256×256 → original H×W, bilinear both times (the official two-step rule)."""
        assert self.original_size is not None
        size = self.image_size
        with torch.inference_mode():
            x = F.interpolate(low_res.float(), (size, size), mode="bilinear", align_corners=False)
            return F.interpolate(x, self.original_size, mode="bilinear", align_corners=False)

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Segment the current image → (masks 1×H×W, iou_predictions (1,), low_res_logits 1×64×64).

        With `multimask_output` the best of tokens 1..3 by predicted IoU is returned (the official default;
        the single-mask token 0 of the released checkpoint is likely untrained, see the spec).
        """
        out = self.decode(point_coords, point_labels, box, mask_input)
        if multimask_output:
            iou, best = torch.max(out.iou_all[:, 1:], dim=1)
            low_res = out.low_res_all[:, 1:][torch.arange(best.shape[0]), best][:, None]
        else:
            iou = out.iou_all[:, 0]
            low_res = out.low_res_all[:, :1]
        logits = self.postprocess_masks(low_res)[0]
        if return_logits:
            masks = logits.cpu().numpy()
        else:
            # The official predictor thresholds sigmoid(logits) > 0.5; kept for bit-identical masks.
            masks = (torch.sigmoid(logits) > 0.5).cpu().numpy()
        return masks, iou.float().cpu().numpy(), low_res[0].float().cpu().numpy()

"""Provider ``local``: ID-card OCR on this machine, no account, no network.

The engine is RapidOCR (``rapidocr-onnxruntime`` 1.4): PP-OCRv4 text detection and recognition
and the PP-OCR text-direction classifier, ONNX models that ship inside the wheel, so nothing is
downloaded at run time. Its stages are driven here rather than through its one-call API,
because an ID card needs what that API does not do:

1. **Detect** text lines on the image scaled to :data:`DET_LONG_SIDE` (a card found anywhere in
   a larger photo).
2. **Orientation of the page**, not of each line: the dominant direction of the elongated line
   boxes gives the skew and the 90° turns; the direction classifier's vote over the longest
   lines settles 0° against 180°. Every line — the one-character ones too (男, 汉), which have
   no direction of their own — is then cut out along that one direction.
3. **Recognise** the rectified lines, cut from the full-resolution image, keeping each line's
   per-step character probabilities: a field's row is decoded again within the characters that
   field can hold (``[0-9X]`` for the ID number, the 56 names for ethnicity …), and a reading
   that is none of a field's legal values is replaced by the legal value most likely under the
   line's probabilities (CTC forward score).
4. **Extract** the fields from the boxes in the card's upright frame
   (:mod:`pipeline.providers.cardfields`), with a confidence per field. Where a label was read
   but its value was not (a lone character the detector missed) or a value stops short, that
   stretch of the card is cut out and read again, and the fields are extracted once more.

CPU: onnxruntime runs each model with one intra-op and one inter-op thread (its default would
start a pool per session as large as the machine, and the worker's threads would multiply
that), OpenCV runs single-threaded, and a semaphore lets at most ``os.cpu_count()`` OCR runs go
at once in a process. The engine is loaded once, in the provider's constructor, which the
worker runs once per process; glibc's heap is trimmed after each image (see
:func:`_heap_trimmer`), which keeps a long-running worker's memory flat.

Outcomes: a recognised card side → OK (code ``ok``); an image with no card on it, or one that
cannot be decoded → IMAGE (``no_card`` / ``bad_image``, never retried); a URL that cannot be
fetched → TRANSIENT; the engine failing → ERROR (``engine_error``).
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
import time
import uuid
from importlib import metadata
from typing import Any

import numpy as np

from pipeline.providers.base import ImagePayload, Outcome, ProviderResult
from pipeline.providers.cardfields import Allowed, TextBox, extract

log = logging.getLogger(__name__)

NAME = "local"
ACCOUNT = "local"
OK_CODE = "ok"
NO_CARD_CODE = "no_card"
BAD_IMAGE_CODE = "bad_image"
ENGINE_ERROR_CODE = "engine_error"
FETCH_FAILED_CODE = "fetch_failed"

#: Detection runs on the image scaled so that its longer side is this long: large enough for
#: the text of a card that fills half a phone photo, small enough to keep detection ~0.3 s.
DET_LONG_SIDE = 1152
#: Detection thresholds below RapidOCR's (0.3 / 0.5): a lone character on a busy background
#: (男, 汉) scores low as a box, and what is not text is dropped later by its recognition score.
DET_THRESH = 0.25
DET_BOX_THRESH = 0.35
#: Recognition crops come from the image at most this large (the pipeline's own limit).
REC_LONG_SIDE = 2048
#: Lines recognised per image at most (a busy background can show many text-like shapes).
MAX_LINES = 60
#: Lines the direction classifier votes with.
VOTE_LINES = 8
#: A detected box at least this elongated says which way the text runs.
ELONGATED = 2.0
#: The probability a character missing from the recogniser's dictionary is given when a
#: candidate reading containing it is scored.
UNKNOWN_CHAR_PROB = 1e-4
#: Room added at each end of a line before it is recognised, in line heights.
CROP_PAD = 0.3
#: Lines recognised per model run.
REC_BATCH = 6


def _engine_version() -> str:
    try:
        return metadata.version("rapidocr-onnxruntime")
    except metadata.PackageNotFoundError:  # pragma: no cover - the import would fail first
        return "unknown"


class CardOCR:
    """Detection → page orientation → rectified lines → recognition, for one image at a time
    (thread-safe: the models are shared, every call keeps its own state)."""

    def __init__(self, det_long_side: int = DET_LONG_SIDE) -> None:
        import cv2
        from rapidocr_onnxruntime import RapidOCR
        from rapidocr_onnxruntime.ch_ppocr_det.utils import (
            DetPreProcess,
        )

        cv2.setNumThreads(1)
        self._cv2 = cv2
        # One thread per model run: the worker already runs several images at once.
        self._engine = RapidOCR(
            intra_op_num_threads=1,
            inter_op_num_threads=1,
            det_thresh=DET_THRESH,
            det_box_thresh=DET_BOX_THRESH,
        )
        det = self._engine.text_det
        self._det = det
        # "max" with a limit above DET_LONG_SIDE: the image is only padded to a multiple of 32
        self._det_pre = DetPreProcess(4096, "max", det.mean, det.std)
        self._det_long_side = det_long_side
        self._charset = _Charset(list(self._engine.text_rec.postprocess_op.character))
        self.version = _engine_version()

    def threads(self) -> dict[str, tuple[int, int]]:
        """(intra-op, inter-op) threads of each model's onnxruntime session."""
        out = {}
        for name, infer in (
            ("det", self._det.infer),
            ("cls", self._engine.text_cls.infer),
            ("rec", self._engine.text_rec.session),
        ):
            opts = infer.session.get_session_options()
            out[name] = (opts.intra_op_num_threads, opts.inter_op_num_threads)
        return out

    # -- stages --------------------------------------------------------------------------------
    def _detect(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        scale = self._det_long_side / max(h, w)
        small = self._cv2.resize(
            img,
            (max(32, round(w * scale)), max(32, round(h * scale))),
            interpolation=self._cv2.INTER_AREA if scale < 1 else self._cv2.INTER_LINEAR,
        )
        tensor = self._det_pre(small)
        preds = self._det.infer(tensor)[0]
        boxes, _ = self._det.postprocess_op(preds, small.shape[:2])
        boxes = self._det.filter_tag_det_res(boxes, small.shape[:2])
        if boxes is None or len(boxes) == 0:
            return np.zeros((0, 4, 2), np.float32)
        sx, sy = w / small.shape[1], h / small.shape[0]
        return np.asarray(boxes, np.float32) * np.array([sx, sy], np.float32)

    def _crop(self, img: np.ndarray, quad: np.ndarray, theta: float) -> np.ndarray:
        """The line inside ``quad`` cut out so that it reads left to right along ``theta``."""
        u, v = _frame(quad, theta)
        tl, br = int(np.argmin(u + v)), int(np.argmax(u + v))
        tr, bl = int(np.argmax(u - v)), int(np.argmin(u - v))
        if len({tl, br, tr, bl}) < 4:  # degenerate: fall back to the box's own order
            tl, tr, br, bl = 0, 1, 2, 3
        src = quad[[tl, tr, br, bl]].astype(np.float32)
        # a little room at both ends: the detector's box can stop at the last stroke, or
        # short of it, and a character cut in half is read as another one or not at all
        along = src[1] - src[0]
        along /= max(float(np.linalg.norm(along)), 1e-6)
        pad = CROP_PAD * float(np.linalg.norm(src[3] - src[0]))
        src[[0, 3]] -= along * pad
        src[[1, 2]] += along * pad
        width = int(max(np.linalg.norm(src[0] - src[1]), np.linalg.norm(src[3] - src[2])))
        height = int(max(np.linalg.norm(src[0] - src[3]), np.linalg.norm(src[1] - src[2])))
        width, height = max(width, 4), max(height, 4)
        dst = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
        m = self._cv2.getPerspectiveTransform(src, dst)
        return self._cv2.warpPerspective(
            img,
            m,
            (width, height),
            borderMode=self._cv2.BORDER_REPLICATE,
            flags=self._cv2.INTER_CUBIC,
        )

    def _recognise(self, crops: list[np.ndarray]) -> list[_Line]:
        """Recognition as RapidOCR's, batched by width, but keeping each line's per-step
        probabilities so that a field can be decoded again within its own character set."""
        rec = self._engine.text_rec
        _, img_h, img_w = rec.rec_image_shape[:3]
        ratios = [c.shape[1] / c.shape[0] for c in crops]
        order = np.argsort(ratios)
        out: list[_Line | None] = [None] * len(crops)
        for start in range(0, len(crops), REC_BATCH):
            batch = order[start : start + REC_BATCH]
            max_ratio = max([img_w / img_h] + [ratios[i] for i in batch])
            tensor = np.concatenate(
                [rec.resize_norm_img(crops[i], max_ratio)[np.newaxis, :] for i in batch]
            ).astype(np.float32)
            preds = rec.session(tensor)[0]
            width = tensor.shape[3]
            step = width / preds.shape[1]
            for k, i in enumerate(batch):
                used = min(width, math.ceil(img_h * ratios[i]))
                # every step, the padding's too: the last characters may be emitted past the
                # line's own width
                out[i] = _Line(preds[k], self._charset, step / used)
        return [line for line in out if line is not None]

    def fit(self, img: np.ndarray) -> np.ndarray:
        """The image at most :data:`REC_LONG_SIDE` on its longer side (read and reread use it)."""
        h, w = img.shape[:2]
        if max(h, w) <= REC_LONG_SIDE:
            return img
        s = REC_LONG_SIDE / max(h, w)
        return self._cv2.resize(
            img, (round(w * s), round(h * s)), interpolation=self._cv2.INTER_AREA
        )

    def reread(
        self,
        img: np.ndarray,
        theta: float,
        regions: dict[str, tuple[tuple[float, float, float, float], Allowed]],
    ) -> list[TextBox]:
        """Read rectangles of the upright frame again, each within its own characters (a lone
        character the detector missed); what is read is returned as boxes."""
        t = math.radians(theta)
        c, s = math.cos(t), math.sin(t)
        names, crops, bounds = [], [], []
        for name, ((u0, v0, u1, v1), _) in regions.items():
            pts = [(u0, v0), (u1, v0), (u1, v1), (u0, v1)]
            quad = np.array([[u * c - v * s, u * s + v * c] for u, v in pts], np.float32)
            h, w = img.shape[:2]
            if (
                quad[:, 0].max() < 0
                or quad[:, 1].max() < 0
                or quad[:, 0].min() > w
                or quad[:, 1].min() > h
            ):
                continue
            names.append(name)
            crops.append(self._crop(img, quad, theta))
            bounds.append((u0, v0, u1, v1))
        out = []
        for name, line, (u0, v0, u1, v1) in zip(names, self._recognise(crops), bounds, strict=True):
            text, score, pos = line.decode(regions[name][1])
            if text:
                out.append(
                    TextBox(
                        text,
                        score,
                        u0,
                        v0,
                        u1,
                        v1,
                        char_x=tuple(u0 + p * (u1 - u0) for p in pos),
                        decode=_Redecoder(line, u0, u1),
                        likelihood=line.log_likelihood,
                    )
                )
        return out

    def read(self, img: np.ndarray) -> tuple[list[TextBox], float]:
        """The recognised lines in the upright frame, and the page rotation found (degrees,
        clockwise: the angle the image's text runs at)."""
        quads = self._detect(img)
        if len(quads) > MAX_LINES:
            areas = [_quad_area(q) for q in quads]
            keep = np.argsort(areas)[::-1][:MAX_LINES]
            quads = quads[np.sort(keep)]
        if len(quads) == 0:
            return [], 0.0
        theta = line_direction(quads)
        crops = [self._crop(img, q, theta) for q in quads]

        # 0° or 180°: the direction classifier votes with the longest lines
        order = sorted(
            range(len(crops)), key=lambda i: crops[i].shape[1] / crops[i].shape[0], reverse=True
        )
        sample = [crops[i] for i in order[:VOTE_LINES]]
        _, cls_res, _ = self._engine.text_cls(sample)
        vote = sum(float(s) if str(label) == "180" else -float(s) for label, s in cls_res)
        if vote > 0:
            theta = (theta + 180.0) % 360.0
            crops = [self._cv2.rotate(c, self._cv2.ROTATE_180) for c in crops]

        lines = self._recognise(crops)
        boxes = []
        for quad, line in zip(quads, lines, strict=True):
            u, v = _frame(quad, theta)
            x0, x1 = float(u.min()), float(u.max())
            text, score, pos = line.decode(None)
            if not text:
                continue
            boxes.append(
                TextBox(
                    text,
                    score,
                    x0,
                    float(v.min()),
                    x1,
                    float(v.max()),
                    char_x=tuple(x0 + p * (x1 - x0) for p in pos),
                    decode=_Redecoder(line, x0, x1),
                    likelihood=line.log_likelihood,
                )
            )
        return boxes, theta


class _Charset:
    """The recogniser's characters (index 0 is the CTC blank) and, per allowed set, the
    columns of the probability matrix that set keeps."""

    def __init__(self, characters: list[str]) -> None:
        self.characters = characters
        self.index = {c: i for i, c in enumerate(characters) if i > 0}
        self._columns: dict[Allowed, np.ndarray] = {}

    def columns(self, allowed: Allowed) -> np.ndarray:
        cols = self._columns.get(allowed)
        if cols is None:
            test = allowed if callable(allowed) else set(allowed).__contains__
            keep = [i for i, c in enumerate(self.characters) if i > 0 and test(c)]
            cols = np.array([0, *keep], dtype=np.int64)
            self._columns[allowed] = cols  # a benign race: every thread computes the same
        return cols


class _Line:
    """One recognised line: its per-step probabilities, decoded greedily (CTC best path),
    over every character or over an allowed set only."""

    __slots__ = ("_charset", "_frac", "_probs")

    def __init__(self, probs: np.ndarray, charset: _Charset, frac_per_step: float) -> None:
        self._probs = probs
        self._charset = charset
        self._frac = frac_per_step

    def decode(self, allowed: Allowed | None) -> tuple[str, float, list[float]]:
        """(text, mean probability of its characters, each character's position as a fraction
        of the line's width)."""
        if allowed is None:
            cols, probs = None, self._probs
        else:
            cols = self._charset.columns(allowed)
            probs = self._probs[:, cols]
        best = probs.argmax(axis=1)
        conf = probs.max(axis=1)
        chars, scores, pos = [], [], []
        prev = -1
        for t, i in enumerate(best.tolist()):
            if i != prev and i != 0:
                chars.append(self._charset.characters[int(cols[i]) if cols is not None else i])
                scores.append(float(conf[t]))
                pos.append(min(1.0, (t + 0.5) * self._frac))
            prev = i
        return "".join(chars), (float(np.mean(scores)) if scores else 0.0), pos

    def log_likelihood(self, text: str) -> float:
        """log P(text | line) under CTC (the forward algorithm, rescaled at every step): how
        well a candidate reading — one of a field's legal values — explains the whole line.
        A character the recogniser does not know gets a small floor probability."""
        probs = self._probs
        steps = probs.shape[0]
        if not text:
            return float(np.sum(np.log(np.maximum(probs[:, 0], 1e-30))))
        cols = [self._charset.index.get(c) for c in text]
        n = 2 * len(text) + 1
        emit = np.empty((steps, n), np.float64)
        emit[:, 0::2] = probs[:, [0]]
        for k, col in enumerate(cols):
            emit[:, 2 * k + 1] = probs[:, col] if col is not None else UNKNOWN_CHAR_PROB
        # a state may skip the blank before it unless it repeats the previous character
        skip = np.zeros(n, bool)
        for k in range(1, len(text)):
            skip[2 * k + 1] = text[k] != text[k - 1]
        alpha = np.zeros(n, np.float64)
        alpha[0], alpha[1] = emit[0, 0], emit[0, 1]
        log_scale = 0.0
        for t in range(1, steps):
            nxt = alpha.copy()
            nxt[1:] += alpha[:-1]
            nxt[2:] += np.where(skip[2:], alpha[:-2], 0.0)
            nxt *= emit[t]
            total = nxt.sum()
            if total <= 0:
                return -math.inf
            log_scale += math.log(total)
            alpha = nxt / total
        end = alpha[-1] + (alpha[-2] if n > 1 else 0.0)
        return math.log(end) + log_scale if end > 0 else -math.inf


class _Redecoder:
    """A box's ``decode``: the line decoded again within a character set, in box coordinates."""

    __slots__ = ("_line", "_x0", "_x1")

    def __init__(self, line: _Line, x0: float, x1: float) -> None:
        self._line, self._x0, self._x1 = line, x0, x1

    def __call__(self, allowed: Allowed) -> tuple[str, float, tuple[float, ...]]:
        text, score, pos = self._line.decode(allowed)
        return text, score, tuple(self._x0 + p * (self._x1 - self._x0) for p in pos)


def _frame(quad: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of the points in the frame whose x axis runs along ``theta`` (degrees,
    image coordinates with y down) and whose y axis points to the following line."""
    t = math.radians(theta)
    c, s = math.cos(t), math.sin(t)
    x, y = quad[:, 0].astype(np.float64), quad[:, 1].astype(np.float64)
    return x * c + y * s, -x * s + y * c


def _quad_area(q: np.ndarray) -> float:
    x, y = q[:, 0], q[:, 1]
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


def line_direction(quads: np.ndarray) -> float:
    """The direction the text lines run in, in [0, 180) degrees: the length-weighted axial mean
    of the long edges of the elongated boxes (0 when none is elongated)."""
    sx = sy = 0.0
    for q in quads:
        e1, e2 = q[1] - q[0], q[3] - q[0]
        l1, l2 = float(np.hypot(*e1)), float(np.hypot(*e2))
        long_edge, long_len, short_len = (e1, l1, l2) if l1 >= l2 else (e2, l2, l1)
        if short_len <= 0 or long_len / short_len < ELONGATED:
            continue
        a = math.atan2(float(long_edge[1]), float(long_edge[0]))
        sx += long_len * math.cos(2 * a)
        sy += long_len * math.sin(2 * a)
    if sx == 0 and sy == 0:
        return 0.0
    return math.degrees(math.atan2(sy, sx) / 2) % 180.0


def _heap_trimmer() -> Any:
    """glibc's ``malloc_trim``, or None elsewhere. Every image and text line has tensors of a
    size of its own; glibc keeps the freed memory in its arenas, fragmented, and a worker's
    resident size climbs past 1 GB after a few dozen photos. Trimming after each image keeps it
    flat (about 100 MB above the models here) for a few milliseconds."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _heap_trimmer()


def decode_image(data: bytes) -> np.ndarray:
    """BGR pixels of a JPEG, PNG or BMP (a PDF: its first page). Raises ValueError."""
    from PIL import Image, UnidentifiedImageError

    from pipeline.domain.images import ImageLimits, ImageRejected, prepare, sniff

    if sniff(data[:1024]) == "pdf":
        try:
            data = prepare(data, ImageLimits(reject_grayscale=False)).data
        except ImageRejected as exc:
            raise ValueError(f"cannot render the PDF ({exc.reason})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise ValueError("the image cannot be decoded") from None
    return np.ascontiguousarray(rgb[:, :, ::-1])


class LocalOCRClient:
    """The ``local`` provider: the same protocol and outcome taxonomy as the remote ones."""

    name = NAME
    #: no balance query and no quota: `balance()` makes no request
    has_balance = False

    def __init__(
        self, *, parallel: int | None = None, timeout: float = 30.0, name: str = NAME
    ) -> None:
        self.name = name
        self.account = ACCOUNT
        self._timeout = timeout
        self._ocr = CardOCR()
        #: OCR runs at once in this process: one per core, whatever the worker's concurrency
        self._parallel = parallel or os.cpu_count() or 1
        self._slots = threading.BoundedSemaphore(self._parallel)
        self._http: Any = None

    @property
    def engine(self) -> CardOCR:
        return self._ocr

    @property
    def parallel(self) -> int:
        """OCR runs this process lets go at once."""
        return self._parallel

    def __repr__(self) -> str:
        return f"LocalOCRClient(engine=rapidocr-onnxruntime {self._ocr.version})"

    def submit(self, image: ImagePayload) -> ProviderResult:
        return self.send(self.prepare(image))

    def prepare(self, image: ImagePayload) -> ImagePayload:
        """Nothing to encode: :meth:`send` decodes the image (no rate-limiter slot to prepare
        for: the local engine has none)."""
        return image

    def _fetch(self, url: str) -> bytes:
        if self._http is None:
            from pipeline.providers.http import make_client

            self._http = make_client(self._timeout, None)
        resp = self._http.get(url)
        resp.raise_for_status()
        return resp.content

    def send(self, call: ImagePayload) -> ProviderResult:
        sent = int(time.time())
        ocrid = f"local-{uuid.uuid4().hex}"
        data = call.data
        if data is None:
            try:
                data = self._fetch(call.url or "")
            except Exception as exc:  # noqa: BLE001 - the class only: a URL carries a signature
                return ProviderResult(
                    Outcome.TRANSIENT,
                    FETCH_FAILED_CODE,
                    f"cannot fetch the image ({type(exc).__name__})",
                    sent_at=sent,
                )
        started = time.thread_time()
        try:
            img = decode_image(data)
        except ValueError as exc:
            return ProviderResult(
                Outcome.IMAGE, BAD_IMAGE_CODE, str(exc), ocrid=ocrid, sent_at=sent
            )
        try:
            with self._slots:
                img = self._ocr.fit(img)
                boxes, rotation = self._ocr.read(img)
                reading = extract(boxes)
                if reading.side is not None and reading.retry:
                    more = self._ocr.reread(img, rotation, reading.retry)
                    if more:
                        boxes = boxes + more
                        reading = extract(boxes, side=reading.side)
        except Exception as exc:  # noqa: BLE001 - onnxruntime/OpenCV failures, by class only
            log.warning("local OCR failed (%s)", type(exc).__name__)
            return ProviderResult(
                Outcome.ERROR,
                ENGINE_ERROR_CODE,
                f"the OCR engine failed ({type(exc).__name__})",
                ocrid=ocrid,
                sent_at=sent,
            )
        finally:
            del img
            if _malloc_trim is not None:
                _malloc_trim(0)
        raw: dict[str, Any] = {
            "engine": f"rapidocr-onnxruntime {self._ocr.version}",
            "rotation": round(rotation, 1),
            "cpu_ms": round((time.thread_time() - started) * 1000),
            "side": reading.side,
            "fields": reading.fields,
            "confidence": reading.confidence,
            "lines": [
                {
                    "text": b.text,
                    "score": round(b.score, 4),
                    "box": [round(b.x0), round(b.y0), round(b.x1), round(b.y1)],
                }
                for b in boxes
            ],
        }
        if reading.side is None:
            return ProviderResult(
                Outcome.IMAGE,
                NO_CARD_CODE,
                f"no ID card recognised in the image: {reading.why}",
                ocrid=ocrid,
                raw=raw,
                sent_at=sent,
            )
        return ProviderResult(
            outcome=Outcome.OK,
            code=OK_CODE,
            msg=f"{reading.side} side recognised ({len(boxes)} text lines)",
            ocrid=ocrid,
            side=reading.side,
            fields=dict(reading.fields),
            extra={"confidence": dict(reading.confidence)},
            raw=raw,
            sent_at=sent,
        )

    def balance(self) -> int | None:
        """No paid quota: nothing to count."""
        return None

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

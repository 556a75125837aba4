"""Train the router's text/visual projections and uncertainty head without labels (DESIGN.md §4).

Two teachers, both frozen, both computed once before any step:
1. dense CLIP relevance (MaskCLIP): the CLIP image tower's patch embeddings, taken through the
   value path of its last attention block (no query-key mixing, no residual, no MLP: the
   spatially faithful variant), then ln_post and the image projection, cosine to the prompt's
   CLIP text embedding. Resized from the CLIP patch grid to SAM2's G x G token grid. The
   router's `relevance` term is pulled towards it (MSE of standardised maps = 2 * (1 - corr)).
2. the unpruned model's masks: the keep-1.0 tracker from a first-frame point. Tokens inside the
   mask (pooled to the grid, dilated) are "important"; a pairwise logistic ranking loss on the
   router's learned score (weights, all terms, unc_head) puts them above the rest, which is
   what top-k needs. The prior term is left out of the loss: it has no parameters.
Only the router trains; SAM2 and CLIP never get gradients. Because the teachers are cached,
a step is one router forward on a few frames: thousands of steps cost seconds.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fastsam2.export.graphs.router import PRIOR_BONUS, Router, _standardise
# the weights file lives in export, which reads it; calibrate_cli saves through this module
from fastsam2.export.router_weights import load_router, save_router  # noqa: F401
from fastsam2.runtime.errors import InputError

log = logging.getLogger(__name__)

DILATION = 1  # tokens around the mask count as important: the decoder needs the boundary
MAX_PAIRS_SIDE = 256  # positives and negatives sampled per frame and step for the ranking loss
W_DECAY = 1e-3  # the ranking loss rewards ever larger weights once ranks are right


@dataclass
class TeacherData:
    """Everything the router sees and is taught, for F frames of all sequences."""

    feat: torch.Tensor  # [F, C, G, G] SAM2 image features
    prev: torch.Tensor  # [F, 1, 4G, 4G] previous frame's mask logits (zeros on each first frame)
    text: torch.Tensor  # [F, D] each frame's sequence prompt embedding (unit norm)
    prior: torch.Tensor  # [F, T] the router's prior term (parameter-free)
    important: torch.Tensor  # [F, T] bool, teacher 2
    prompt_emb: torch.Tensor  # [P, D] every distinct prompt
    clip_rel: torch.Tensor  # [P, F, T] teacher 1, standardised, for every prompt on every frame
    prompts: list = field(default_factory=list)
    starts: list = field(default_factory=list)  # per sequence: the first-frame point used


# -- teacher 1: dense CLIP relevance --------------------------------------------------------

def _clip_input(visual, rgb: np.ndarray) -> torch.Tensor:
    """Squash-resize like SAM2 does (no crop), so the CLIP patch grid covers the same frame."""
    from PIL import Image

    size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = np.asarray(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), np.float32)
    std = np.asarray(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), np.float32)
    img = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BICUBIC), np.float32) / 255.0
    return torch.from_numpy(((img - mean) / std).transpose(2, 0, 1)[None].copy())


@torch.no_grad()
def clip_dense_embeddings(clip_model, rgb: np.ndarray) -> torch.Tensor:
    """[gh, gw, E] unit-norm patch embeddings in CLIP's joint image-text space (MaskCLIP)."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = clip_model.visual
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
        raise InputError(f"dense CLIP relevance needs an open_clip ViT image tower without "
                         f"attentional pooling; this model has {type(visual).__name__}")
    x = visual._embeds(_clip_input(visual, rgb))
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for blk in blocks[:-1]:
        x = blk(x)
    if not batch_first:
        x = x.transpose(0, 1)
    last = blocks[-1]
    if isinstance(last, ResidualAttentionBlock) and isinstance(last.attn, torch.nn.MultiheadAttention):
        # MaskCLIP: the value embedding through out_proj; attention pooling would mix every
        # patch with the class token and wash the map out.
        attn, d = last.attn, last.attn.embed_dim
        v = F.linear(last.ln_1(x), attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:])
        y = last.ls_1(attn.out_proj(v))
    else:  # other block types: the plain patch tokens after the last block
        y = last(x)
    y = visual.ln_post(y)[:, 1:]
    if visual.proj is not None:
        y = y @ visual.proj
    gh = visual.grid_size[0] if hasattr(visual, "grid_size") else int(math.isqrt(y.shape[1]))
    y = y[0].reshape(gh, -1, y.shape[-1])
    return y / (y.norm(dim=-1, keepdim=True) + 1e-6)


def clip_relevance(dense: torch.Tensor, text_emb: torch.Tensor, grid: int) -> torch.Tensor:
    """Cosine of each patch to the text, resized to the SAM2 token grid: [T] (raw cosine)."""
    t = text_emb.reshape(-1) / (text_emb.norm() + 1e-6)
    cos = (dense @ t)[None, None]  # [1, 1, gh, gw]
    return F.interpolate(cos, size=(grid, grid), mode="bilinear", align_corners=False).reshape(-1)


# -- teacher 2: the unpruned model's masks ----------------------------------------------------

def mask_importance(low_res_logits: np.ndarray, grid: int, dilation: int = DILATION) -> torch.Tensor:
    """[T] bool: tokens at least half covered by the mask, grown by `dilation` tokens."""
    m = torch.from_numpy(np.asarray(low_res_logits, np.float32).reshape(1, 1, *low_res_logits.shape[-2:]) > 0)
    m = (F.avg_pool2d(m.float(), low_res_logits.shape[-1] // grid) >= 0.5).float()
    if dilation > 0:
        m = F.max_pool2d(m, 2 * dilation + 1, stride=1, padding=dilation)
    return m.reshape(-1) > 0


def _frames(source, max_frames: int):
    """RGB frames of one sequence: a FrameSource ((i, rgb) pairs) or any iterable of arrays."""
    for n, item in enumerate(source):
        if n >= max_frames:
            break
        yield item[1] if isinstance(item, tuple) else item


def _as_sequences(frames_iterable) -> list:
    from fastsam2.runtime.video import FrameSource

    if isinstance(frames_iterable, (FrameSource, np.ndarray)):
        return [frames_iterable]
    seqs = list(frames_iterable)
    if seqs and isinstance(seqs[0], (np.ndarray, tuple)):
        return [seqs]  # one sequence given as a list of frames
    return seqs


class LastOutputs:
    """A graph session that keeps its last outputs (the encoder's features for the teachers)."""

    def __init__(self, session):
        self.session, self.last = session, None
        self.input_names, self.output_names = session.input_names, session.output_names

    def run(self, feeds: dict) -> dict:
        self.last = self.session.run(feeds)
        return self.last


@torch.no_grad()
def collect_teachers(pruned, text_encoder, frames_iterable, prompts, points=None,
                     max_frames: int = 32, dilation: int = DILATION) -> TeacherData:
    """Run both frozen teachers over every sequence; `points` are (x, y) input pixels or None
    per sequence (None: the CLIP relevance argmax of the first frame starts the track)."""
    from fastsam2.export.torch_backend import torch_sessions
    from fastsam2.runtime.session import Session

    seqs = _as_sequences(frames_iterable)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not seqs:
        raise InputError("no frame sequences given")
    if len(prompts) not in (1, len(seqs)):
        raise InputError(f"give one prompt, or one per sequence: {len(prompts)} prompts for {len(seqs)} sequences")
    points = [None] * len(seqs) if points is None else list(points)
    if len(points) not in (1, len(seqs)):
        raise InputError(f"give one point per sequence: {len(points)} points for {len(seqs)} sequences")
    if max_frames < 1:
        raise InputError(f"--max-frames must be >= 1, got {max_frames}")
    router = pruned.router
    dim = int(text_encoder.info["dim"])
    if dim != router.text_dim:
        raise InputError(f"the text model embeds in {dim} dims but the router expects {router.text_dim}")
    unique = list(dict.fromkeys(prompts))
    emb = text_encoder.encode(unique)
    prompt_emb = torch.from_numpy(np.stack([emb[p] for p in unique]))
    G = pruned.geometry["G"]
    rows = {k: [] for k in ("feat", "prev", "text", "important", "clip")}
    starts = []
    for si, seq in enumerate(seqs):
        prompt = prompts[si % len(prompts)]
        pi = unique.index(prompt)
        point = points[si % len(points)]
        total = getattr(seq, "num_frames", None)  # the pointer window depends on video length, as in SAM2
        graphs = torch_sessions(pruned)
        graphs["image_encoder"] = encoder = LastOutputs(graphs["image_encoder"])
        session = Session(graphs, pruned.constants(), pruned.settings, keep=1.0, backend="torch",
                          num_frames=None if total is None else min(total, max_frames))
        prev = np.zeros((1, 1, 4 * G, 4 * G), np.float32)
        n = 0
        for t, rgb in enumerate(_frames(seq, max_frames)):
            dense = clip_dense_embeddings(text_encoder.model, rgb)
            rel = torch.stack([clip_relevance(dense, e, G) for e in prompt_emb])  # [P, T]
            if t == 0:
                h, w = rgb.shape[:2]
                if point is None:  # search-and-track from the CLIP teacher, not the untrained router
                    i = int(torch.argmax(rel[pi]))
                    point = ((i % G + 0.5) * w / G, (i // G + 0.5) * h / G)
                starts.append([round(float(point[0]), 1), round(float(point[1]), 1)])
                session.add_prompt(1, points=[tuple(point)])
            logits = session.push(rgb).objects[1].logits[None, None]
            rows["feat"].append(torch.from_numpy(encoder.last["feat"][0].copy()))
            rows["prev"].append(torch.from_numpy(prev[0].copy()))
            rows["text"].append(prompt_emb[pi])
            rows["important"].append(mask_importance(logits, G, dilation))
            rows["clip"].append(_standardise(rel))
            prev = logits
            n += 1
        if n == 0:
            raise InputError(f"sequence {si} has no frames")
        log.info(f"sequence {si}: {n} frames, prompt {prompt!r}, start point {starts[-1]}")
    feat, prev = torch.stack(rows["feat"]), torch.stack(rows["prev"])
    text = torch.stack(rows["text"])
    prior = router.terms(feat, text, prev)[3]
    return TeacherData(feat=feat, prev=prev, text=text, prior=prior,
                       important=torch.stack(rows["important"]), prompt_emb=prompt_emb,
                       clip_rel=torch.stack(rows["clip"], dim=1), prompts=unique, starts=starts)


# -- losses and the metric ---------------------------------------------------------------------

def _learned_scores(router: Router, data: TeacherData, idx) -> torch.Tensor:
    # Router.forward itself, minus the constant prior bonus: the loss sees exactly what top-k sees.
    scores, _ = router(data.feat[idx], data.text[idx], data.prev[idx])
    return scores - PRIOR_BONUS * data.prior[idx]


def router_losses(router: Router, data: TeacherData, idx, gen: torch.Generator):
    """(text distillation loss, ranking loss) on the frames `idx`."""
    feat, prev = data.feat[idx], data.prev[idx]
    text_losses = []
    for p in range(len(data.prompts)):
        rel = router.terms(feat, data.prompt_emb[p:p + 1].expand(len(idx), -1), prev)[1]
        text_losses.append(((_standardise(rel) - data.clip_rel[p, idx]) ** 2).mean())
    scores = _learned_scores(router, data, idx)
    ranks = []
    for row, imp in zip(scores, data.important[idx]):
        pos, neg = torch.nonzero(imp)[:, 0], torch.nonzero(~imp)[:, 0]
        if len(pos) == 0 or len(neg) == 0:
            continue  # object lost, or everywhere: nothing to rank on this frame
        pos = pos[torch.randint(len(pos), (min(len(pos), MAX_PAIRS_SIDE),), generator=gen)]
        neg = neg[torch.randint(len(neg), (min(len(neg), MAX_PAIRS_SIDE),), generator=gen)]
        ranks.append(F.softplus(row[neg][None, :] - row[pos][:, None]).mean())
    rank = torch.stack(ranks).mean() if ranks else scores.sum() * 0
    return torch.stack(text_losses).mean(), rank


@torch.no_grad()
def importance_recall(router: Router, data: TeacherData, k: int | None = None, with_prior: bool = True) -> float:
    """Mean over frames of |top-k(scores) ∩ important| / |important|.

    k=None uses k = |important| per frame (R-precision): chance level is the important fraction,
    1.0 is a perfect ranking, whatever the mask size.
    """
    idx = torch.arange(len(data.feat))
    scores = router(data.feat, data.text, data.prev)[0] if with_prior else _learned_scores(router, data, idx)
    vals = []
    for row, imp in zip(scores, data.important):
        n = int(imp.sum())
        if n == 0:
            continue
        top = torch.topk(row, min(n if k is None else k, row.numel())).indices
        vals.append(float(imp[top].sum()) / n)
    return float(np.mean(vals)) if vals else float("nan")


def _evaluate(router, data, text_weight, rank_weight) -> dict:
    with torch.no_grad():
        text, rank = router_losses(router, data, torch.arange(len(data.feat)), torch.Generator().manual_seed(0))
    return {"text": float(text), "rank": float(rank), "loss": float(text_weight * text + rank_weight * rank)}


# -- training --------------------------------------------------------------------------------

def fit_router(router: Router, data: TeacherData, steps: int = 200, lr: float = 5e-3, seed: int = 0,
               batch: int = 8, text_weight: float = 1.0, rank_weight: float = 1.0) -> dict:
    """Adam on the router's parameters only; returns the history."""
    if steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}")
    if not lr > 0:
        raise InputError(f"--lr must be > 0, got {lr}")
    gen = torch.Generator().manual_seed(seed)
    history = {"step": [], "loss": [], "text": [], "rank": []}
    before = _evaluate(router, data, text_weight, rank_weight)
    recall_before = (importance_recall(router, data), importance_recall(router, data, with_prior=False))
    router.train()
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    n = len(data.feat)
    for step in range(steps):
        idx = torch.randperm(n, generator=gen)[:batch] if n > batch else torch.arange(n)
        text, rank = router_losses(router, data, idx, gen)
        loss = text_weight * text + rank_weight * rank + W_DECAY * (router.weights ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            # each term is a "keep me" cue by construction; a negative weight would turn the
            # text term into "avoid the prompt" when the two teachers disagree (random weights)
            router.weights.clamp_(min=0.0)
        for key, v in (("step", step), ("loss", loss.item()), ("text", text.item()), ("rank", rank.item())):
            history[key].append(v)
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log.info(f"step {step + 1}/{steps}: loss {history['loss'][-1]:.4f} "
                     f"(text {history['text'][-1]:.4f}, rank {history['rank'][-1]:.4f})")
    router.eval()
    with torch.no_grad():
        router.trained.fill_(True)
    history.update(initial=before, final=_evaluate(router, data, text_weight, rank_weight),
                   recall_before=recall_before[0], recall_after=importance_recall(router, data),
                   recall_learned_before=recall_before[1],
                   recall_learned_after=importance_recall(router, data, with_prior=False),
                   frames=n, important_fraction=float(data.important.float().mean()),
                   prompts=list(data.prompts), starts=list(data.starts))
    return history


def train_router(pruned, text_encoder, frames_iterable, prompts, points=None, steps: int = 200,
                 lr: float = 5e-3, seed: int = 0, max_frames: int = 32, batch: int = 8,
                 dilation: int = DILATION, text_weight: float = 1.0, rank_weight: float = 1.0):
    """Teachers + training on a copy of `pruned.router` (pruned is left unchanged).

    frames_iterable: one sequence (a FrameSource or a list of RGB uint8 arrays) or a list of
    them; prompts: one text, or one per sequence; points: None or one (x, y) per sequence.
    Returns (router with trained=True, history).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        data = collect_teachers(pruned, text_encoder, frames_iterable, prompts, points,
                                max_frames=max_frames, dilation=dilation)
        router = copy.deepcopy(pruned.router)
        history = fit_router(router, data, steps, lr, seed, batch, text_weight, rank_weight)
    return router, history

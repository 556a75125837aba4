"""Graph `router`: scores every token of a frame (paper, Methodology).

score = w_v * visual + w_t * text + w_u * uncertainty + prior_bonus * prior
- visual: local context from the features: 3x3 neighbour dissimilarity (1 - cosine to the mean
  of the 8 neighbours) and edge energy (central-difference gradient of the unit features).
- text: cos(P_v token, P_t text_emb), with learned projections P_v, P_t. Untrained, this term
  is noise; the manifest's `router_trained` says so and the runtime prints it.
- uncertainty: binary entropy of sigmoid(prev_mask_logits) pooled to the token grid (object
  boundaries, ambiguous regions), plus a tiny learned head on the features.
- prior: tokens in and near the previous mask (dilated by `prior_margin` tokens) get a large
  bonus so they are always kept first: losing them loses the object.
Each term is standardised over the frame so the weights compare like with like.
Top-k is not in the graph: TensorRT's TopK caps K at 3840 (< 4096 tokens), so the runtime
does it in numpy.
"""

import torch
import torch.nn.functional as F
from torch import nn

PRIOR_BONUS = 1.0e3


def _standardise(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    std = ((x - mean) ** 2).mean(dim=-1, keepdim=True).sqrt()
    return (x - mean) / (std + 1e-6)


class Router(nn.Module):
    def __init__(self, feat_dim: int = 256, text_dim: int = 512, proj_dim: int = 256,
                 w_visual: float = 1.0, w_text: float = 1.0, w_uncertainty: float = 1.0,
                 prior_margin: int = 2, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.text_dim = text_dim
        self.proj_v = nn.Linear(feat_dim, proj_dim)
        self.proj_t = nn.Linear(text_dim, proj_dim)
        self.unc_head = nn.Linear(feat_dim, 1)
        with torch.no_grad():
            for lin in (self.proj_v, self.proj_t):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) / lin.in_features ** 0.5)
                lin.bias.zero_()
            self.unc_head.weight.zero_()  # starts as the pure entropy term
            self.unc_head.bias.zero_()
        self.weights = nn.Parameter(torch.tensor([w_visual, w_text, w_uncertainty]))
        self.prior_margin = prior_margin
        self.register_buffer("trained", torch.zeros((), dtype=torch.bool))

    def terms(self, feat, text_emb, prev_mask_logits):
        """The raw terms: visual [1, T] (from the features alone), text relevance, uncertainty
        and prior (0/1) [B, T] (one row per object: its text and its previous mask)."""
        b, c, h, w = feat.shape
        unit = feat / (feat.norm(dim=1, keepdim=True) + 1e-6)
        # mean of the 8 neighbours: 3x3 sum minus the centre, edges replicate-padded
        padded = F.pad(unit, (1, 1, 1, 1), mode="replicate")
        neigh = (F.avg_pool2d(padded, 3, stride=1) * 9 - unit) / 8
        neigh = neigh / (neigh.norm(dim=1, keepdim=True) + 1e-6)
        dissim = 1 - (unit * neigh).sum(dim=1)
        gx = padded[:, :, 1:-1, 2:] - padded[:, :, 1:-1, :-2]
        gy = padded[:, :, 2:, 1:-1] - padded[:, :, :-2, 1:-1]
        edge = ((gx ** 2).sum(dim=1) + (gy ** 2).sum(dim=1)).sqrt()
        visual = _standardise(dissim.reshape(b, -1)) + _standardise(edge.reshape(b, -1))

        tok = feat.flatten(2).transpose(1, 2)  # [1, T, C]
        pv = self.proj_v(tok)
        pt = self.proj_t(text_emb)[:, None, :]
        relevance = (pv * pt).sum(-1) / (pv.norm(dim=-1) * pt.norm(dim=-1) + 1e-6)

        p = torch.sigmoid(prev_mask_logits).clamp(1e-6, 1 - 1e-6)
        ent = -(p * torch.log(p) + (1 - p) * torch.log(1 - p))
        stride = prev_mask_logits.shape[-1] // w
        ent = F.avg_pool2d(ent, stride).flatten(1)
        uncertainty = ent + self.unc_head(tok)[..., 0]

        inside = F.max_pool2d((prev_mask_logits > 0).float(), stride)
        k = 2 * self.prior_margin + 1
        prior = F.max_pool2d(inside, k, stride=1, padding=self.prior_margin).flatten(1)
        return visual, relevance, uncertainty, prior

    def forward(self, feat, text_emb, prev_mask_logits):
        visual, relevance, uncertainty, prior = self.terms(feat, text_emb, prev_mask_logits)
        w = self.weights
        scores = (w[0] * _standardise(visual) + w[1] * _standardise(relevance)
                  + w[2] * _standardise(uncertainty) + PRIOR_BONUS * prior)
        return scores, relevance


class RouterGraph(nn.Module):
    """The exported wrapper; the router is its own module so calibration can train it."""

    def __init__(self, router: Router):
        super().__init__()
        self.router = router

    def forward(self, feat, text_emb, prev_mask_logits):
        return self.router(feat, text_emb, prev_mask_logits)

"""Graph `memory_encoder`: SAM2's `_encode_new_memory` for a frame's objects (the batch B).

Takes the low-resolution mask logits and upsamples them inside the graph (SAM2 feeds the
bilinear-upsampled logits, so doing it here keeps the runtime free of a full-size resize).
`binarize` reproduces `binarize_mask_from_pts_for_mem_enc`: on frames the user clicked, SAM2
encodes the thresholded mask instead of its sigmoid.
"""

import torch
import torch.nn.functional as F
from torch import nn


class MemoryEncoderGraph(nn.Module):
    def __init__(self, sam2_model):
        super().__init__()
        self.sam = sam2_model
        self.image_size = int(sam2_model.image_size)

    def forward(self, feat, mask_logits, object_score, binarize):
        sam = self.sam
        hr = F.interpolate(mask_logits, size=(self.image_size, self.image_size),
                           mode="bilinear", align_corners=False)
        mask = torch.where(binarize.reshape(1, 1, 1, 1) > 0.5, (hr > 0).float(), torch.sigmoid(hr))
        if sam.sigmoid_scale_for_mem_enc != 1.0:
            mask = mask * sam.sigmoid_scale_for_mem_enc
        if sam.sigmoid_bias_for_mem_enc != 0.0:
            mask = mask + sam.sigmoid_bias_for_mem_enc
        # sam.memory_encoder(feat, mask, skip_mask_sigmoid=True)["vision_features"], with the one
        # frame's features expanded to the objects' batch first: OpenVINO's CPU plugin (2026.4)
        # fuses the sum of the two convs and then refuses a broadcast one ("Can not clone with
        # new dims"), also when the expand comes after the conv (it folds it away)
        me = sam.memory_encoder
        masks = me.mask_downsampler(mask)
        x = me.pix_feat_proj(feat.expand(masks.shape[0], -1, -1, -1)) + masks
        maskmem = me.out_proj(me.fuser(x))
        if sam.no_obj_embed_spatial is not None:
            is_obj = (object_score > 0).float()  # [1, 1]
            maskmem = maskmem + (1 - is_obj[..., None, None]) * sam.no_obj_embed_spatial[..., None, None]
        return maskmem

"""Graph `mask_decoder`: prompt encoder + SAM mask decoder + object-pointer projection.

All four mask tokens are returned (token 0 = single mask, 1..3 = multimask) with their IoU and
projected object pointers; the runtime picks single/multimask, applies the dynamic stability
fallback and the no-object handling exactly as SAM2 does (runtime/sam2_math.py). Keeping that
choice out of the graph keeps the graph free of data-dependent control flow.
"""

from torch import nn


class MaskDecoderGraph(nn.Module):
    def __init__(self, sam2_model):
        super().__init__()
        self.sam = sam2_model

    def forward(self, feat, high_res_0, high_res_1, point_coords, point_labels, mask_input,
                has_mask_input):
        pe = self.sam.sam_prompt_encoder
        # SAM2 never passes boxes to the prompt encoder (a box is two points labelled 2 and 3),
        # so the points are always padded with one "not a point" entry, as here.
        sparse = pe._embed_points(point_coords, point_labels, pad=True)
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            1, -1, pe.image_embedding_size[0], pe.image_embedding_size[1])
        has = has_mask_input.reshape(1, 1, 1, 1)
        dense = has * pe.mask_downscaling(mask_input) + (1 - has) * no_mask
        masks, iou, tokens, object_score = self.sam.sam_mask_decoder.predict_masks(
            image_embeddings=feat,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            repeat_image=False,
            high_res_features=[high_res_0, high_res_1],
        )
        obj_ptrs = self.sam.obj_ptr_proj(tokens)
        return masks, iou, obj_ptrs, object_score

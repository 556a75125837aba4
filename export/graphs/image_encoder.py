"""Graph `image_encoder`: Hiera + FPN neck + the decoder's conv_s0/conv_s1, as `forward_image`.

The positional encodings of the neck depend only on the image size: they are not outputs but
constants stored once in the bundle (see export/model.py).
"""

import torch
from torch import nn


class ImageEncoderGraph(nn.Module):
    def __init__(self, sam2_model):
        super().__init__()
        self.sam = sam2_model

    def forward(self, image: torch.Tensor):
        out = self.sam.forward_image(image)  # applies conv_s0/conv_s1 to levels 0 and 1
        fpn = out["backbone_fpn"]
        return fpn[-1], fpn[0], fpn[1]

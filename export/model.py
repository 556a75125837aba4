"""The pruned SAM2: the official model cut into the five graphs, plus the router and constants.

`PrunedSAM2` is the one object export, the PyTorch reference loop and the tests share.
"""

from __future__ import annotations

import numpy as np
import torch

from fastsam2.export.graphs.image_encoder import ImageEncoderGraph
from fastsam2.export.graphs.mask_decoder import MaskDecoderGraph
from fastsam2.export.graphs.memory_attention import MemoryAttentionGraph
from fastsam2.export.graphs.memory_encoder import MemoryEncoderGraph
from fastsam2.export.graphs.router import Router, RouterGraph
from fastsam2.export.sam2_loader import LoadedSAM2, model_settings
from fastsam2.runtime.contract import GRAPH_ORDER, geometry


class PrunedSAM2:
    def __init__(self, loaded: LoadedSAM2, router: Router | None = None, text_dim: int = 512):
        self.loaded = loaded
        sam = loaded.model
        self.sam = sam
        self.settings = model_settings(sam)
        self.settings["text_dim"] = int(text_dim)
        self.geometry = geometry(int(sam.image_size), text_dim)
        self.router = router if router is not None else Router(feat_dim=sam.hidden_dim, text_dim=text_dim)
        self.router.eval()
        self.graphs = {
            "image_encoder": ImageEncoderGraph(sam).eval(),
            "router": RouterGraph(self.router).eval(),
            "memory_attention": MemoryAttentionGraph(sam).eval(),
            "memory_encoder": MemoryEncoderGraph(sam).eval(),
            "mask_decoder": MaskDecoderGraph(sam).eval(),
        }
        assert tuple(self.graphs) == GRAPH_ORDER
        # ONNX Runtime-only variants (contrib ops TensorRT cannot parse), same inputs/outputs
        self.ort_variants = {"memory_attention": MemoryAttentionGraph(sam, fused=True).eval()}
        self._constants = None

    @property
    def router_trained(self) -> bool:
        return bool(self.router.trained.item())

    @torch.inference_mode()
    def constants(self) -> dict:
        """Everything the loop needs that does not depend on the frame, as float32 numpy."""
        if self._constants is not None:
            return self._constants
        sam = self.sam
        S, G = self.geometry["S"], self.geometry["G"]
        # the neck's sine encodings depend only on shapes: run it once on zeros
        out = sam.image_encoder(torch.zeros(1, 3, S, S))
        vision_pos = out["vision_pos_enc"][-1]  # [1, 256, G, G]
        maskmem_pos = sam.memory_encoder.position_encoding(torch.zeros(1, sam.mem_dim, G, G))
        c = {
            "vision_pos": vision_pos.reshape(vision_pos.shape[1], -1).T,
            "no_mem_embed": sam.no_mem_embed.reshape(-1),
            "maskmem_pos": maskmem_pos.reshape(maskmem_pos.shape[1], -1).T,
            "maskmem_tpos_enc": sam.maskmem_tpos_enc.reshape(sam.num_maskmem, -1),
            "no_obj_ptr": (sam.no_obj_ptr.reshape(-1) if hasattr(sam, "no_obj_ptr")
                           else torch.zeros(sam.hidden_dim)),
            "mask_downsample_w": sam.mask_downsample.weight.reshape(4, 4),
            "mask_downsample_b": sam.mask_downsample.bias.reshape(1),
        }
        if isinstance(sam.obj_ptr_tpos_proj, torch.nn.Linear):
            c["obj_ptr_tpos_w"] = sam.obj_ptr_tpos_proj.weight
            c["obj_ptr_tpos_b"] = sam.obj_ptr_tpos_proj.bias
        self._constants = {k: np.ascontiguousarray(v.detach().float().numpy()) for k, v in c.items()}
        return self._constants
